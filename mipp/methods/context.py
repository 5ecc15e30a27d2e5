"""What every selection method sees and returns: `SelectionContext -> Selection`.

    ctx = SelectionContext(model, groups, x, y, PruneConfig(method="l1", target=0.5))
    selection = select(ctx)            # Selection(keep={"fc1": [...], ...}, layers={...})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mipp.config import PruneConfig
from mipp.errors import ConfigError
from mipp.groups import UnitGroup
from mipp.progress import ProgressCallback, no_progress


@dataclass
class SelectionContext:
    """What a selection method sees. `model` must not be modified.

    x, y: calibration inputs (n, ...) and labels (n,) on the CPU; counts: optional units to
    keep per group name.
    """

    model: nn.Module
    groups: list[UnitGroup]
    x: torch.Tensor
    y: torch.Tensor
    config: PruneConfig
    device: torch.device = torch.device("cpu")
    counts: dict[str, int] | None = None
    progress: ProgressCallback = no_progress

    def keep_count(self, group: UnitGroup) -> int:
        """Units to keep in `group`: the given count, else (1 - target) of its units, >= 1."""
        if self.counts is not None:
            if group.name not in self.counts:
                raise ConfigError(f"counts: no unit count for layer {group.name!r}")
            return max(1, min(group.size, int(self.counts[group.name])))
        if self.config.target is None:
            raise ConfigError(f"method {self.config.method!r} needs `target` or per-layer counts")
        return max(1, int(round(group.size * (1 - self.config.target))))


@dataclass
class Selection:
    """Kept unit indices per group name, and per-layer figures for the report."""

    keep: dict[str, list[int]]
    layers: dict[str, dict] = field(default_factory=dict)


Selector = Callable[[SelectionContext], Selection]
SELECTORS: dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    def register(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn
    return register


def select(ctx: SelectionContext) -> Selection:
    """Run the method named by `ctx.config.method`."""
    try:
        selector = SELECTORS[ctx.config.method]
    except KeyError:
        raise ConfigError(f"method {ctx.config.method!r} is not available; "
                          f"choose one of {sorted(SELECTORS)}") from None
    return selector(ctx)


def removed_fraction(groups: list[UnitGroup], keep: dict[str, list[int]]) -> float:
    total = sum(g.size for g in groups)
    kept = sum(len(keep.get(g.name, range(g.size))) for g in groups)
    return 1 - kept / total if total else 0.0
