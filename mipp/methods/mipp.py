"""MIPP's network-level selection: TERC layer by layer from the output back (spec steps 1-7).

    selection = select_mipp(ctx)       # ctx: mipp.methods.context.SelectionContext

`_mipp_pass` is one sweep over the network; `search_tol` is the target search (the `tol`
that removes `config.target` of the units); `select_mipp` runs one or the other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import torch

from mipp.activations import capture_unit_activations
from mipp.config import PruneConfig
from mipp.method_registry import register_method
from mipp.methods.context import Selection, SelectionContext, removed_fraction
from mipp.progress import Phase
from mipp.terc import LayerDecision, _Test, terc_select

log = logging.getLogger("mipp.selection")


def _mipp_pass(ctx: SelectionContext, acts: dict[str, torch.Tensor], logits: torch.Tensor,
               config: PruneConfig, report: Callable[[float, str], None],
               counts: Mapping[str, int] | None = None,
               memos: dict | None = None) -> dict[str, LayerDecision]:
    """One TERC sweep over the network, from the output back to the input.

    counts: units to keep per group (from the allocator); each decision is brought to its
    count before the layer below is decided, so that layer reconstructs what is really kept.
    memos: shared by the sweeps of a target search; a layer whose target (the kept units above
    it) is unchanged reuses its fits and tests (`terc_select`'s memo).
    """
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
        memo = None
        if memos is not None:
            above = tuple(tuple(decided[n].kept) for n in dict.fromkeys(
                owner.get(c) for c in group.consumers) if n in decided and n != group.name)
            memo = memos.setdefault((group.name, above), {})
        decision = terc_select(x, y.to(ctx.device), config, seed=config.seed + index,
                               progress=layer_progress, memo=memo, y_is_logits=not targets)
        if counts is not None:
            decision = _at_count(decision, counts[group.name])
        decided[group.name] = decision
        done += group.size
    return decided


@register_method("mipp", kind="chooses", decides_counts=True)
def choose_mipp(ctx: SelectionContext, counts: Mapping[str, int] | None) -> Selection:
    """MIPP: TERC on mutual information, from the output back; decides its own counts."""
    if counts is None:
        return select_mipp(ctx)
    ctx.progress(Phase.CAPTURING, 0.0, "recording activations")
    started = time.perf_counter()
    acts, logits = capture_unit_activations(ctx.model, ctx.groups, ctx.x, device=ctx.device)
    capture = time.perf_counter() - started
    decisions = _mipp_pass(ctx, acts, logits, ctx.config,
                           lambda f, m: ctx.progress(Phase.SELECTING, f, m), counts=counts)
    return _selection([decisions], ctx.config.tol, capture)


def _at_count(decision: LayerDecision, count: int) -> LayerDecision:
    """`decision` with exactly `count` units kept: TERC's kept units first, the most
    informative (latest in MI order) among them; then its pruned units, latest first.
    Constant units rank lowest."""
    ranking = [u for u in decision.constant if u not in decision.order] + list(decision.order)
    ranking += [u for u in range(decision.size) if u not in set(ranking)]
    kept = set(decision.kept)
    preferred = [u for u in reversed(ranking) if u in kept] + \
        [u for u in reversed(ranking) if u not in kept]
    chosen = sorted(preferred[:count])
    return dataclasses.replace(decision, kept=chosen,
                               pruned=[u for u in range(decision.size) if u not in set(chosen)])


def select_mipp(ctx: SelectionContext) -> Selection:
    """MIPP: TERC with MI ordering, layer by layer from the output back (spec steps 1-7).

    With `config.target`, `tol` is searched (`search_tol`) until the fraction of units removed
    is within 0.02 of the target.
    """
    ctx.progress(Phase.CAPTURING, 0.0, "recording activations")
    started = time.perf_counter()
    acts, logits = capture_unit_activations(ctx.model, ctx.groups, ctx.x, device=ctx.device)
    capture = time.perf_counter() - started
    ctx.progress(Phase.CAPTURING, 1.0, f"{len(ctx.x)} samples, {len(ctx.groups)} layers")
    config = ctx.config
    if config.target is None:
        decisions = _mipp_pass(ctx, acts, logits, config,
                               lambda f, m: ctx.progress(Phase.SELECTING, f, m))
        return _selection([decisions], config.tol, capture)
    tol, decisions, sweeps = search_tol(ctx, acts, logits)
    return _selection(sweeps, tol, capture, chosen=decisions)


MAX_SWEEPS = 4


def search_tol(ctx: SelectionContext, acts: dict[str, torch.Tensor], logits: torch.Tensor
               ) -> tuple[float, dict[str, LayerDecision], list[dict[str, LayerDecision]]]:
    """The target search: the `tol` whose sweep removes `ctx.config.target` of all units.

    One sweep at `config.tol` records every test's loss increase; the next tol is the one at
    which those tests, replayed (`_tol_for`), remove the target's share of units; a sweep
    there verifies it. The sweeps share their fits: a layer
    whose target is unchanged reuses its reference fit and every test already made, so a
    verifying sweep pays only for the tests that differ. At most MAX_SWEEPS sweeps, stopping
    within 0.02 of the target; returns the closest sweep's tol and decisions, and every
    sweep's decisions (for the phase split).
    acts/logits: from `capture_unit_activations`.
    """
    config = ctx.config
    total = sum(g.size for g in ctx.groups)
    goal = config.target * total  # units to remove
    tried: list[tuple[float, float, dict[str, LayerDecision]]] = []
    memos: dict = {}
    low, high = 0.0, math.inf  # tols known to remove too few / too many
    low_fraction, high_fraction = 0.0, 1.0  # what they removed
    tol = config.tol if config.tol > 0 else 0.05
    for sweep in range(MAX_SWEEPS):
        # "sweep i/n" and the tol tried lead every message, so a progress bar or a job log
        # shows where the search is (n is the most sweeps it may take; later sweeps reuse the
        # earlier ones' fits and are usually much shorter).
        def report(f, m, sweep=sweep, tol=tol):
            ctx.progress(Phase.SELECTING, (sweep + f) / MAX_SWEEPS,
                         f"sweep {sweep + 1}/{MAX_SWEEPS} tol={tol:.3g}: {m}")
        decisions = _mipp_pass(ctx, acts, logits, config.model_copy(update={"tol": tol}), report,
                               memos=memos)
        fraction = removed_fraction(ctx.groups, {n: d.kept for n, d in decisions.items()})
        tried.append((tol, fraction, decisions))
        fits = sum(d.fits for d in decisions.values())
        widths = ", ".join(f"{g.name} {g.size}->{len(decisions[g.name].kept)}"
                           for g in ctx.groups)
        removed = sum(g.size - len(decisions[g.name].kept) for g in ctx.groups)
        summary = (f"sweep {sweep + 1}/{MAX_SWEEPS} tol={tol:.3g}: {removed}/{total} units "
                   f"removed ({fraction:.1%}; target {config.target:.1%} +- 2%; {widths}), "
                   f"{fits} new fine-tunes")
        log.info("target search %s", summary)  # a milestone for the job's log
        ctx.progress(Phase.SELECTING, (sweep + 1) / MAX_SWEEPS, summary)
        if abs(fraction - config.target) <= 0.02:
            break
        if fraction < config.target:
            if tol >= low:
                low, low_fraction = tol, fraction
        elif tol <= high:
            high, high_fraction = tol, fraction
        if low > 0 and high < math.inf:
            # Bracketed: interpolate the measured fractions in log tol (regula falsi). The
            # replay of one sweep's tests ignores that a layer's references change with the
            # layers above it; near the target that error is the size of the band (target
            # 0.5 on LeNet-5 went 54.0% -> 42.9% -> 54.0% on replayed tols).
            share = (config.target - low_fraction) / max(high_fraction - low_fraction, 1e-9)
            share = min(max(share, 0.1), 0.9)  # stay inside the bracket
            tol = math.exp(math.log(low) + share * (math.log(high) - math.log(low)))
            continue
        predicted = _tol_for(decisions, goal, config)
        if not low < predicted < high:  # the prediction left the bracket
            predicted = tol * 4 if high == math.inf else tol / 4
        tol = predicted
    tol, fraction, decisions = min(tried, key=lambda t: abs(t[1] - config.target))
    if abs(fraction - config.target) > 0.02:
        tol, decisions = _adjusted(decisions, goal, config)
        adjusted = removed_fraction(ctx.groups, {n: d.kept for n, d in decisions.items()})
        log.info("target search: no sweep landed within 0.02 (closest %.1f%%); its tests "
                 "replayed at tol=%.3g remove %.1f%%", 100 * fraction, tol, 100 * adjusted)
        fraction = adjusted
    log.info("target search chose tol=%.3g after %d sweeps: removes %.1f%% of units",
             tol, len(tried), 100 * fraction)
    return tol, decisions, [t[2] for t in tried]


def _replayed(decisions: Mapping[str, LayerDecision], tol: float, config: PruneConfig
              ) -> dict[str, set[int]]:
    """The units each layer's recorded tests, replayed at `tol`, remove.

    A test's loss increase is cumulative (all units pruned so far plus the candidate), so each
    recorded increase is split into the budget already spent when it ran (the increase of the
    last pruned unit before it) and the candidate's own share; a replay at another tol walks
    the same order, spending the shares of the units it prunes. Constant units are removed at
    any tol; each layer keeps at least min_units.
    """
    critical = _Test(config).critical / config.repeats ** 0.5
    out: dict[str, set[int]] = {}
    for name, d in decisions.items():
        scale = max(d.mi if config.tol_scale == "mi" else d.loss_ref, 0.0)
        tested = {t["unit"] for t in d.units}
        removed = {u for u in d.pruned if u not in tested}  # constants
        spent_then, spent_now = 0.0, 0.0
        room = d.size - min(d.size, config.min_units)
        for t in d.units:
            share = t["mean_d"] - spent_then
            if not t["kept"]:
                spent_then = t["mean_d"]
            if len(removed) < room and spent_now + share - critical * t["sd_d"] <= tol * scale:
                removed.add(t["unit"])
                spent_now += share
        out[name] = removed
    return out


def _tol_for(decisions: Mapping[str, LayerDecision], goal: float, config: PruneConfig) -> float:
    """The tol at which the recorded tests, replayed (`_replayed`), remove `goal` units in all
    (log-scale bisection on the replay)."""

    def removed_at(tol: float) -> int:
        return sum(len(r) for r in _replayed(decisions, tol, config).values())

    low, high = 1e-6, 10.0
    if removed_at(high) < goal:
        return high
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if removed_at(mid) < goal else (low, mid)
    return high


def _adjusted(decisions: dict[str, LayerDecision], goal: float, config: PruneConfig
              ) -> tuple[float, dict[str, LayerDecision]]:
    """The closest sweep brought to `goal` units removed without another sweep: its own tests
    replayed at the tol that removes `goal` (the units nearest their layer's threshold go or
    come back first). Used only when no sweep landed within the band: a layer's references
    were fitted with the sweep's own kept set above it, not the adjusted one."""
    tol = _tol_for(decisions, goal, config)
    removed = _replayed(decisions, tol, config)
    out = {}
    for name, d in decisions.items():
        kept = [u for u in range(d.size) if u not in removed[name]]
        out[name] = dataclasses.replace(d, kept=kept, pruned=sorted(removed[name]))
    return tol, out


def _selection(sweeps: list[dict[str, LayerDecision]], tol: float, capture_seconds: float,
               chosen: dict[str, LayerDecision] | None = None) -> Selection:
    """The Selection of `chosen` (default: the last sweep), with the phase seconds of every
    sweep summed (activations: the one recording of all layers)."""
    decisions = chosen if chosen is not None else sweeps[-1]
    layers = {name: {**d.summary(), "tol": tol, "order": d.order, "tests": d.units}
              for name, d in decisions.items()}
    phases = {"activations": capture_seconds}
    for sweep in sweeps:
        for d in sweep.values():
            for name, seconds in d.phases.items():
                phases[name] = phases.get(name, 0.0) + seconds
    return Selection(keep={name: d.kept for name, d in decisions.items()}, layers=layers,
                     phases={k: round(v, 3) for k, v in phases.items()})
