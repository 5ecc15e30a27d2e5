"""The registry of selection methods: names without torch, methods once the engine loads.

Every file in `mipp/methods/` (but the infrastructure below) is one method and registers
itself under its own file name when `mipp.methods` is imported:

    @register_method("l1", kind="scores")
    def l1_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:   # a score per unit
        ...

A method either scores units (`kind="scores"`: `ctx -> {group name: 1-D tensor}`, higher =
more worth keeping; the allocator in mipp.methods.allocation turns scores into kept sets) or
chooses them itself (`kind="chooses"`: `(ctx, counts) -> Selection`, with `counts` the units to
keep per group from the allocator, or None where the method decides how many:
`decides_counts=True`, MIPP). `method_names()` lists the files and the methods registered at
run time without importing torch, so the API process and `mipp --help` can offer them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mipp.errors import ConfigError

# Modules of mipp/methods/ that are not methods.
INFRASTRUCTURE = frozenset({"allocation", "context", "scoring"})


@dataclass(frozen=True)
class Method:
    """A registered method. `rounds` > 1: an iterative scorer (SynFlow); the allocator prunes
    to a shrinking share and rescores that many times, with `ctx.alive` set each round."""

    name: str
    kind: Literal["scores", "chooses"]
    fn: Callable
    summary: str
    rounds: int = 1
    decides_counts: bool = False


_REGISTERED: dict[str, Method] = {}


def register_method(name: str, *, kind: Literal["scores", "chooses"], rounds: int = 1,
                    decides_counts: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as method `name` (its docstring's first line is its summary)."""
    if kind not in ("scores", "chooses"):
        raise ValueError(f"kind must be 'scores' or 'chooses', not {kind!r}")
    if decides_counts and kind != "chooses":
        raise ValueError("decides_counts applies to a method of kind 'chooses'")
    if not name or not name.replace("_", "").replace("-", "").isalnum() or ":" in name:
        raise ValueError(f"method name {name!r}: use letters, digits, '-' and '_'")

    def register(fn: Callable) -> Callable:
        summary = (fn.__doc__ or name).strip().splitlines()[0]
        _REGISTERED[name] = Method(name, kind, fn, summary, rounds, decides_counts)
        return fn
    return register


def method_files() -> tuple[str, ...]:
    """The method files of mipp/methods/ by name, found without importing them (or torch)."""
    spec = importlib.util.find_spec("mipp.methods")
    found = pkgutil.iter_modules(list(spec.submodule_search_locations or []))
    return tuple(sorted(m.name for m in found
                        if not m.name.startswith("_") and m.name not in INFRASTRUCTURE))


def method_names() -> tuple[str, ...]:
    """Every method a config may name: MIPP first, then the others alphabetically."""
    names = set(method_files()) | set(_REGISTERED)
    return tuple(sorted(names, key=lambda n: (n != "mipp", n)))


def get_method(name: str) -> Method:
    """The registered method `name` (imports mipp.methods, so torch). Raises ConfigError."""
    importlib.import_module("mipp.methods")
    try:
        return _REGISTERED[name]
    except KeyError:
        raise ConfigError(f"method {name!r} is not available; choose one of "
                          f"{', '.join(method_names())}") from None


def registered() -> dict[str, Method]:
    """All methods registered so far, by name (after `import mipp.methods`: all of them)."""
    importlib.import_module("mipp.methods")
    return dict(_REGISTERED)


def unregister_method(name: str) -> None:
    """Forget a method registered at run time (a plugin unloaded, a test's tiny method)."""
    _REGISTERED.pop(name, None)
