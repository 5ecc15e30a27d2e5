"""MIPP's network-level selection: TERC layer by layer from the output back (spec steps 1-7).

    selection = select_mipp(ctx)       # ctx: mipp.methods.context.SelectionContext

`_mipp_pass` is one sweep over the network; `search_tol` is the target search (a sweep, more
while the target lies above what it removed, the last one's tests replayed at the `tol` that
removes `config.target` of the units, verified);
`select_mipp` runs one or the other.
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
from mipp.terc import LayerDecision, PhaseClock, _Test, measure_removal, terc_select

log = logging.getLogger("mipp.selection")


def _mipp_pass(ctx: SelectionContext, acts: dict[str, torch.Tensor], logits: torch.Tensor,
               config: PruneConfig, report: Callable[[float, str], None],
               counts: Mapping[str, int] | None = None,
               memos: dict | None = None,
               memo_of: dict[str, dict] | None = None) -> dict[str, LayerDecision]:
    """One TERC sweep over the network, from the output back to the input.

    counts: units to keep per group (from the allocator); each decision is brought to its
    count before the layer below is decided, so that layer reconstructs what is really kept.
    memos: shared by sweeps; a layer whose target (the kept units above it) is unchanged
    reuses its fits and tests (`terc_select`'s memo). memo_of: filled with each layer's memo
    of this sweep (a target search verifies replayed sets against those references).
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
            targets.append(acts[next_name][:, kept].flatten(1))  # (n, kept x cells)
        # The last hidden layer (or a group whose consumers are all unprunable) targets the logits.
        y = torch.cat(targets, dim=1) if targets else logits
        x = acts[group.name]
        features = x.shape[2] if x.dim() == 3 else 1  # a conv channel's grid cells
        x = x.flatten(1).to(ctx.device)

        def layer_progress(fraction: float, message: str, group=group, done=done,
                           removed=removed) -> None:
            report((done + fraction * group.size) / total,
                   f"{group.name}: {message}; {removed} units removed so far")
        memo = None
        if memos is not None:
            above = tuple(tuple(decided[n].kept) for n in dict.fromkeys(
                owner.get(c) for c in group.consumers) if n in decided and n != group.name)
            memo = memos.setdefault((group.name, above), {})
            if memo_of is not None:
                memo_of[group.name] = memo
        decision = terc_select(x, y.to(ctx.device), config, seed=config.seed + index,
                               progress=layer_progress, memo=memo, y_is_logits=not targets,
                               features=features)
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
    acts, logits = capture_unit_activations(ctx.model, ctx.groups, ctx.x, device=ctx.device,
                                            grid=ctx.config.reconstructor.conv_grid)
    capture = time.perf_counter() - started
    decisions = _mipp_pass(ctx, acts, logits, ctx.config,
                           lambda f, m: ctx.progress(Phase.SELECTING, f, m), counts=counts)
    return _selection(decisions, ctx.config.tol, capture)


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

    With `config.target`, `search_tol` finds the `tol` whose selection removes the target's
    fraction of units (within 0.02): a sweep, fresh sweeps while the target lies above what
    the last removed, and a replay of the last one's tests.
    """
    ctx.progress(Phase.CAPTURING, 0.0, "recording activations")
    started = time.perf_counter()
    acts, logits = capture_unit_activations(ctx.model, ctx.groups, ctx.x, device=ctx.device,
                                            grid=ctx.config.reconstructor.conv_grid)
    capture = time.perf_counter() - started
    ctx.progress(Phase.CAPTURING, 1.0, f"{len(ctx.x)} samples, {len(ctx.groups)} layers")
    config = ctx.config
    if config.target is None:
        decisions = _mipp_pass(ctx, acts, logits, config,
                               lambda f, m: ctx.progress(Phase.SELECTING, f, m))
        return _selection(decisions, config.tol, capture)
    tol, decisions = search_tol(ctx, acts, logits)
    return _selection(decisions, tol, capture)


TOL_FLOOR = 1e-6  # the smallest tol a replay tries
MAX_SWEEPS = 3  # a target above what a sweep removes gets a fresh sweep, at most this many in all
SWEEP_SHARES = (0.0, 0.6, 0.8, 0.9)  # where sweep k's progress starts; verification: 0.9-1.0
VERIFY_ROUNDS = 3


def search_tol(ctx: SelectionContext, acts: dict[str, torch.Tensor], logits: torch.Tensor
               ) -> tuple[float, dict[str, LayerDecision]]:
    """The target search: a sweep, its tests replayed at the tol that removes
    `ctx.config.target` of all units, the replayed sets verified.

    1. One sweep at `config.tol` (0.05 if zero) records every test's loss increase. Within
       0.02 of the target it is the selection.
    2. A target above what the sweep removes (by more than 0.02) gets a fresh sweep at the tol
       the replay of the last sweep's tests asks for, at most MAX_SWEEPS sweeps in all. A
       replay upwards would decide each layer against a reference fitted for the wider layers
       the sweep kept above it: measured on LeNet-5/MNIST over 5 seeds, a one-sweep replay from
       ~83% up to 90% and 95% lost 1.6 and 17.5 points of retrained accuracy against a search by
       fresh sweeps (BENCHMARKS.md section 1). Layers whose target is unchanged reuse their fits
       (`_mipp_pass`'s memos), so the output layer's walk is not paid twice.
    3. Otherwise the last sweep's recorded tests are replayed (`_replayed`) at the tol that
       removes the target's share of units (`_tol_for`): the selection lands on the target by
       construction.
    4. Verification: each layer whose replayed set differs from what the sweep already
       measured gets one masked fine-tune (R repeats) of that set against the layer's reference
       (`measure_removal`); it passes when the sweep's own rule would prune the set at the
       replayed tol. A layer that fails has its replayed costs scaled up by measured /
       predicted and the tol is solved again; at most VERIFY_ROUNDS rounds, each costing at
       most one fine-tune a layer. A layer still failing after the last round is kept as
       replayed and its report says so (`replay.verification.passed` false).

    The references are the last sweep's: fitted with that sweep's kept sets above each layer,
    not the replayed ones. Returns the chosen tol and decisions; a replayed decision's `replay`
    field says so (and how many sweeps ran), and its fits, seconds and phases include its
    verification's. acts/logits: from `capture_unit_activations`.
    """
    config = ctx.config
    total = sum(g.size for g in ctx.groups)
    goal = config.target * total  # units to remove
    tol = config.tol if config.tol > 0 else 0.05
    memos: dict = {}
    earlier: dict[str, LayerDecision] = {}  # the earlier sweeps' cost, summed per layer
    for sweep in range(1, MAX_SWEEPS + 1):
        memo_of: dict[str, dict] = {}
        start, end = SWEEP_SHARES[sweep - 1], SWEEP_SHARES[sweep]

        # "sweep i/n tol=..." leads every message of a sweep, "verify i/n" every message after
        # the last, so a progress bar or a job log shows where the search is.
        def report(f, m, sweep=sweep, tol=tol, start=start, end=end):
            ctx.progress(Phase.SELECTING, start + (end - start) * f,
                         f"sweep {sweep}/{MAX_SWEEPS} tol={tol:.3g}: {m}")
        swept = _with_cost_of(earlier, _mipp_pass(
            ctx, acts, logits, config.model_copy(update={"tol": tol}), report, memos=memos,
            memo_of=memo_of), sweep)
        earlier = swept
        fraction = removed_fraction(ctx.groups, {n: d.kept for n, d in swept.items()})
        summary = (f"sweep {sweep}/{MAX_SWEEPS} tol={tol:.3g}: {_removed_summary(ctx, swept)} "
                   f"(target {config.target:.1%} +- 2%), "
                   f"{sum(d.fits for d in swept.values())} fine-tunes")
        log.info("target search %s", summary)  # a milestone for the job's log
        ctx.progress(Phase.SELECTING, end, summary)
        if abs(fraction - config.target) <= 0.02:
            log.info("target search chose tol=%.3g after %d sweep(s): removes %.1f%% of units",
                     tol, sweep, 100 * fraction)
            return tol, swept
        next_tol = _tol_for(swept, goal, config)
        if fraction > config.target or sweep == MAX_SWEEPS or next_tol <= tol:
            break
        tol = next_tol
    chosen_tol, chosen = _verified_replay(ctx, swept, memo_of, goal, tol)
    fraction = removed_fraction(ctx.groups, {n: d.kept for n, d in chosen.items()})
    failed = [n for n, d in chosen.items() if not d.replay["verification"]["passed"]]
    log.info("target search chose tol=%.3g after %d sweep(s) and a replay: removes %.1f%% of "
             "units; %s", chosen_tol, sweep, 100 * fraction,
             f"verification failed in {', '.join(failed)}" if failed else "every layer verified")
    return chosen_tol, chosen


def _with_cost_of(earlier: Mapping[str, LayerDecision], swept: dict[str, LayerDecision],
                  sweeps: int) -> dict[str, LayerDecision]:
    """`swept` with the fits, seconds and phases of the earlier sweeps (`earlier`) added per
    layer, and `sweeps` set, so that a report counts the whole search's cost."""
    out = {}
    for name, d in swept.items():
        before = earlier.get(name)
        if before is None:
            out[name] = dataclasses.replace(d, sweeps=sweeps)
            continue
        phases = dict(before.phases)
        for phase, seconds in d.phases.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
        out[name] = dataclasses.replace(d, fits=before.fits + d.fits, phases=phases,
                                        seconds=before.seconds + d.seconds, sweeps=sweeps)
    return out


def _removed_summary(ctx: SelectionContext, decisions: Mapping[str, LayerDecision]) -> str:
    """"113/226 units removed (50.0%; conv1 6->3, ...)"."""
    total = sum(g.size for g in ctx.groups)
    removed = sum(g.size - len(decisions[g.name].kept) for g in ctx.groups)
    widths = ", ".join(f"{g.name} {g.size}->{len(decisions[g.name].kept)}" for g in ctx.groups)
    return f"{removed}/{total} units removed ({removed / total:.1%}; {widths})"


def _verified_replay(ctx: SelectionContext, swept: dict[str, LayerDecision],
                     memo_of: Mapping[str, dict], goal: float, sweep_tol: float
                     ) -> tuple[float, dict[str, LayerDecision]]:
    """Steps 3 and 4 of `search_tol`: the last sweep's tests replayed at the tol that removes
    `goal` units, each layer's replayed set verified by one masked fine-tune, failing layers'
    costs scaled and the tol solved again, at most VERIFY_ROUNDS times."""
    config = ctx.config
    factors = {name: 1.0 for name in swept}
    clocks = {name: PhaseClock() for name in swept}
    fits = {name: 0 for name in swept}
    checks: dict[str, dict] = {}
    for round_ in range(VERIFY_ROUNDS):
        tol, replayed, spent = _replay_at_goal(swept, goal, config, factors)
        verify_start = SWEEP_SHARES[-1]
        ctx.progress(Phase.SELECTING, verify_start + (1 - verify_start) * round_ / VERIFY_ROUNDS,
                     f"verify {round_ + 1}/{VERIFY_ROUNDS} tol={tol:.3g}: replay "
                     f"{_removed_summary(ctx, replayed)}")
        failed = []
        for name, d in replayed.items():
            removed = sorted(d.pruned)
            if not set(removed) - set(swept[name].constant):  # nothing tested goes: nothing lost
                checks[name] = {"mean_d": 0.0, "sd_d": 0.0, "threshold": tol * _scale(d, config),
                                "passed": True, "finetuned": False}
                continue
            check = measure_removal(memo_of[name], removed, config, tol, clocks[name])
            fits[name] += check.pop("fits")
            checks[name] = check
            if not check["passed"]:
                failed.append(name)
                # The replay under-estimated this layer's loss: scale its costs by what the
                # fine-tune measured (at least 1.25x, so that the next round moves).
                predicted = max(spent[name], 0.25 * check["threshold"], 1e-12)
                factors[name] *= max(check["mean_d"] / predicted, 1.25)
        fine_tunes = sum(fits.values())
        message = (f"verify {round_ + 1}/{VERIFY_ROUNDS} tol={tol:.3g}: "
                   + (f"failed in {', '.join(failed)}" if failed else "every layer passed")
                   + f" ({fine_tunes} fine-tunes so far)")
        log.info("target search %s", message)
        if not failed:
            break
    ctx.progress(Phase.SELECTING, 1.0, message)
    out = {}
    for name, d in replayed.items():
        phases = dict(swept[name].phases)
        for phase, seconds in clocks[name].seconds.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
        out[name] = dataclasses.replace(
            d, fits=swept[name].fits + fits[name], phases=phases,
            seconds=swept[name].seconds + sum(clocks[name].seconds.values()),
            replay={"sweep_tol": sweep_tol, "tol": tol, "cost_factor": factors[name],
                    "rounds": round_ + 1, "verification": checks[name]})
    return tol, out


def _scale(d: LayerDecision, config: PruneConfig) -> float:
    """What a layer's tol multiplies: its estimated MI (or reference loss), never negative."""
    return max(d.mi if config.tol_scale == "mi" else d.loss_ref, 0.0)


def _replay_layer(d: LayerDecision, tol: float, config: PruneConfig, factor: float = 1.0
                  ) -> tuple[set[int], float, list[dict]]:
    """One layer's recorded tests replayed at `tol`: (units removed, the loss increase the
    replay expects of the removed set, the tests with the replay's decision).

    A test's loss increase is cumulative (all units pruned so far plus the candidate), so each
    recorded increase is split into the budget already spent when it ran (the increase of the
    last pruned unit before it) and the candidate's own share; a replay at another tol walks
    the same order, spending the shares (x `factor`) of the units it prunes: a unit goes when
    the increase with it, less t x its test's sd / sqrt(R), is within tol x the layer's MI.
    Constant units are removed at any tol; the layer keeps at least min_units. Each returned
    test is the recorded one with `kept` the replay's decision, `sweep_kept` the sweep's,
    `threshold` tol x MI, `replay_mean_d` the cumulative increase the replay expected with
    the candidate removed.
    """
    critical = _Test(config).critical / config.repeats ** 0.5
    threshold = tol * _scale(d, config)
    tested = {t["unit"] for t in d.units}
    removed = {u for u in d.pruned if u not in tested}  # constants
    spent_then, spent_now = 0.0, 0.0
    room = d.size - min(d.size, config.min_units)
    tests = []
    for t in d.units:
        share = t["mean_d"] - spent_then
        if not t["kept"]:
            spent_then = t["mean_d"]
        expected = factor * (spent_now + share)
        goes = len(removed) < room and expected - critical * t["sd_d"] <= threshold
        if goes:
            removed.add(t["unit"])
            spent_now += share
        tests.append({**t, "kept": not goes, "sweep_kept": t["kept"], "threshold": threshold,
                      "sweep_threshold": t["threshold"], "replay_mean_d": expected})
    return removed, factor * spent_now, tests


def _replayed(decisions: Mapping[str, LayerDecision], tol: float, config: PruneConfig,
              factors: Mapping[str, float] | None = None) -> dict[str, set[int]]:
    """The units each layer's recorded tests, replayed at `tol` (`_replay_layer`), remove."""
    factors = factors or {}
    return {name: _replay_layer(d, tol, config, factors.get(name, 1.0))[0]
            for name, d in decisions.items()}


def _tol_for(decisions: Mapping[str, LayerDecision], goal: float, config: PruneConfig,
             factors: Mapping[str, float] | None = None) -> float:
    """The tol at which the recorded tests, replayed (`_replayed`), remove `goal` units in all
    (log-scale bisection on the replay; the nearest count from above when none is exact)."""

    def removed_at(tol: float) -> int:
        return sum(len(r) for r in _replayed(decisions, tol, config, factors).values())

    low, high = TOL_FLOOR, 10.0
    if removed_at(high) < goal:
        return high
    if removed_at(low) >= goal:
        return low
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if removed_at(mid) < goal else (low, mid)
    # The count is a step function of tol: take the side nearer the goal.
    return low if goal - removed_at(low) < removed_at(high) - goal else high


def _replay_at_goal(decisions: Mapping[str, LayerDecision], goal: float, config: PruneConfig,
                    factors: Mapping[str, float] | None = None
                    ) -> tuple[float, dict[str, LayerDecision], dict[str, float]]:
    """The sweep's decisions brought to `goal` units removed without another sweep: its own
    tests replayed at the tol that removes `goal` (the units nearest their layer's threshold go
    or come back first). When even the smallest tol removes more (the confidence allowance,
    t x sd / sqrt(R), lets an insignificant increase go at any tol), the removed units whose
    increase is largest relative to their layer's MI come back first until `goal`. Returns
    (tol, the replayed decisions, whose tests' `kept` flags are the replay's, the loss increase
    the replay expects per layer)."""
    factors = factors or {}
    tol = _tol_for(decisions, goal, config, factors)
    replays = {name: _replay_layer(d, tol, config, factors.get(name, 1.0))
               for name, d in decisions.items()}
    excess = sum(len(r[0]) for r in replays.values()) - round(goal)
    if excess > 0 and tol <= TOL_FLOOR:
        critical = _Test(config).critical / config.repeats ** 0.5
        removed_tests = [(name, t) for name, r in replays.items() for t in r[2] if not t["kept"]]

        def relative(item):
            name, t = item
            return (t["replay_mean_d"] - critical * t["sd_d"]) / \
                (_scale(decisions[name], config) or 1.0)
        for name, t in sorted(removed_tests, key=relative, reverse=True)[:excess]:
            t["kept"] = True
            replays[name][0].discard(t["unit"])
    out, spent = {}, {}
    for name, d in decisions.items():
        removed, _, tests = replays[name]
        spent[name] = factors.get(name, 1.0) * sum(
            share for unit, share in _shares(d).items() if unit in removed)
        out[name] = dataclasses.replace(d, kept=[u for u in range(d.size) if u not in removed],
                                        pruned=sorted(removed), units=tests)
    return tol, out, spent


def _shares(d: LayerDecision) -> dict[int, float]:
    """Each tested unit's own share of its recorded cumulative increase (`_replay_layer`)."""
    shares, spent_then = {}, 0.0
    for t in d.units:
        shares[t["unit"]] = t["mean_d"] - spent_then
        if not t["kept"]:
            spent_then = t["mean_d"]
    return shares


def _selection(decisions: dict[str, LayerDecision], tol: float, capture_seconds: float
               ) -> Selection:
    """The Selection of `decisions`, with their phase seconds summed over layers (activations:
    the one recording of all layers). A layer's tests carry the decision it reports: for a
    replayed layer, the replay's `kept` flags (the sweep's in `sweep_kept`)."""
    layers = {name: {**d.summary(), "tol": tol, "order": d.order, "tests": d.units}
              for name, d in decisions.items()}
    phases = {"activations": capture_seconds}
    for d in decisions.values():
        for name, seconds in d.phases.items():
            phases[name] = phases.get(name, 0.0) + seconds
    return Selection(keep={name: d.kept for name, d in decisions.items()}, layers=layers,
                     phases={k: round(v, 3) for k, v in phases.items()})
