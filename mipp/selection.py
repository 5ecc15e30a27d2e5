"""Selection methods behind one contract: `SelectionContext -> Selection` (kept units per group).

MIPP and every baseline register here, so the engine, the CLI, the service and the benchmark
treat them alike:

    @register_selector("l1")
    def select_l1(ctx: SelectionContext) -> Selection:
        return Selection(keep={g.name: top_k(scores(g), ctx.keep_count(g)) for g in ctx.groups})

A baseline keeps `ctx.counts[group]` units when counts are given (the paper's protocol: the
per-layer counts MIPP chose), else removes `ctx.config.target` of all units with its own
per-layer choice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mipp.activations import capture_unit_activations
from mipp.config import PruneConfig
from mipp.errors import ConfigError
from mipp.groups import UnitGroup
from mipp.progress import Phase, ProgressCallback, no_progress
from mipp.terc import LayerDecision, terc_select

log = logging.getLogger("mipp.selection")


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


def _mipp_pass(ctx: SelectionContext, acts: dict[str, torch.Tensor], logits: torch.Tensor,
               config: PruneConfig, report: Callable[[float, str], None]) -> dict[str, LayerDecision]:
    """One TERC sweep over the network, from the output back to the input."""
    owner = {member: g.name for g in ctx.groups for member in g.members}
    decided: dict[str, LayerDecision] = {}
    total = sum(g.size for g in ctx.groups)
    size = {g.name: g.size for g in ctx.groups}
    done = 0
    for index, group in enumerate(reversed(ctx.groups)):
        removed = sum(size[name] - len(d.kept) for name, d in decided.items())
        targets = []
        for next_name in dict.fromkeys(owner.get(c) for c in group.consumers):
            if next_name is None or next_name == group.name:
                continue
            kept = decided[next_name].kept if next_name in decided else slice(None)
            targets.append(acts[next_name][:, kept])
        # The last hidden layer (or a group whose consumers are all unprunable) targets the logits.
        y = torch.cat(targets, dim=1) if targets else logits
        x = acts[group.name].to(ctx.device)

        def layer_progress(fraction: float, message: str, group=group, done=done,
                           removed=removed) -> None:
            report((done + fraction * group.size) / total,
                   f"{group.name}: {message}; {removed} units removed so far")
        decided[group.name] = terc_select(x, y.to(ctx.device), config, seed=config.seed + index,
                                          progress=layer_progress)
        done += group.size
    return decided


@register_selector("mipp")
def select_mipp(ctx: SelectionContext) -> Selection:
    """MIPP: TERC with MI ordering, layer by layer from the output back (spec steps 1-7).

    With `config.target`, `tol` is searched (log-scale bisection, at most 6 sweeps) until the
    fraction of units removed is within 0.02 of the target; the closest sweep is returned.
    """
    ctx.progress(Phase.CAPTURING, 0.0, "recording activations")
    acts, logits = capture_unit_activations(ctx.model, ctx.groups, ctx.x, device=ctx.device)
    ctx.progress(Phase.CAPTURING, 1.0, f"{len(ctx.x)} samples, {len(ctx.groups)} layers")
    config = ctx.config
    if config.target is None:
        decisions = _mipp_pass(ctx, acts, logits, config,
                               lambda f, m: ctx.progress(Phase.SELECTING, f, m))
        return _selection(decisions, config.tol)

    tried: list[tuple[float, float, dict[str, LayerDecision]]] = []
    low, high = None, None
    tol = config.tol if config.tol > 0 else 0.05
    max_sweeps = 6
    for sweep in range(max_sweeps):
        # "sweep i/n" and the tol tried lead every message, so a progress bar or a job log
        # shows where the search is (n is the most sweeps it may take).
        def report(f, m, sweep=sweep, tol=tol):
            ctx.progress(Phase.SELECTING, (sweep + f) / max_sweeps,
                         f"sweep {sweep + 1}/{max_sweeps} tol={tol:.3g}: {m}")
        decisions = _mipp_pass(ctx, acts, logits, config.model_copy(update={"tol": tol}), report)
        fraction = removed_fraction(ctx.groups, {n: d.kept for n, d in decisions.items()})
        tried.append((tol, fraction, decisions))
        summary = (f"sweep {sweep + 1}/{max_sweeps} tol={tol:.3g}: removes {fraction:.1%} of "
                   f"units (target {config.target:.1%} +- 2%)")
        log.info("target search %s", summary)  # a milestone for the job's log
        ctx.progress(Phase.SELECTING, (sweep + 1) / max_sweeps, summary)
        if abs(fraction - config.target) <= 0.02:
            break
        if fraction < config.target:
            low = tol
            tol = tol * 4 if high is None else math.sqrt(tol * high)
        else:
            high = tol
            tol = tol / 4 if low is None else math.sqrt(low * tol)
    tol, fraction, decisions = min(tried, key=lambda t: abs(t[1] - config.target))
    log.info("target search chose tol=%.3g after %d sweeps: removes %.1f%% of units",
             tol, len(tried), 100 * fraction)
    return _selection(decisions, tol)


def _selection(decisions: dict[str, LayerDecision], tol: float) -> Selection:
    layers = {name: {**d.summary(), "tol": tol, "order": d.order, "tests": d.units}
              for name, d in decisions.items()}
    return Selection(keep={name: d.kept for name, d in decisions.items()}, layers=layers)


# Imported last: mipp.baselines registers its selectors with the decorator defined above.
import mipp.baselines  # noqa: E402, F401
