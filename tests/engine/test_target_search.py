"""MIPP's target search lands inside its band: when no sweep does, the closest sweep's own
tests, replayed, bring it there (mipp/methods/mipp.py `_adjusted`)."""

from mipp.config import PruneConfig
from mipp.methods.mipp import _adjusted, _replayed
from mipp.terc import LayerDecision


def _decision(size: int, increases: list[float], kept: list[int]) -> LayerDecision:
    """A layer whose units were tested in order 0..size-1, unit i's cumulative loss increase
    `increases[i]` (sd 0), scale (mi) 1.0."""
    tests = [{"unit": u, "mean_d": inc, "sd_d": 0.0, "threshold": 0.0, "kept": u in kept}
             for u, inc in enumerate(increases)]
    return LayerDecision(size=size, kept=kept, pruned=[u for u in range(size) if u not in kept],
                         constant=[], order=list(range(size)), loss_empty=1.0, loss_ref=0.0,
                         mi=1.0, units=tests)


def test_a_replay_at_the_sweeps_own_tol_gives_back_its_decisions():
    # Units 0-2 were pruned (cumulative increase 0.01, 0.02, 0.03), 3 and 4 kept (each would
    # have added 0.5 more).
    d = _decision(5, [0.01, 0.02, 0.03, 0.53, 0.53], kept=[3, 4])
    config = PruneConfig(tol=0.05, repeats=5)
    assert _replayed({"a": d}, 0.05, config) == {"a": {0, 1, 2}}


def test_adjusting_removes_the_units_nearest_the_threshold_first():
    # a: four cheap units pruned, six kept that would each cost about 0.5. b: two pruned, eight
    # kept that would each cost about 0.06 (on top of what b had spent: 0.0035).
    a = _decision(10, [0.001, 0.002, 0.003, 0.004] + [0.5 + 0.1 * i for i in range(6)],
                  kept=list(range(4, 10)))
    b = _decision(10, [0.0015, 0.0035] + [0.06 + 0.001 * i for i in range(8)],
                  kept=list(range(2, 10)))
    config = PruneConfig(tol=0.05, repeats=5, target=0.5)
    # The sweep removed 6 of 20; the goal is 10: the four extra units come from b.
    tol, adjusted = _adjusted({"a": a, "b": b}, goal=10, config=config)
    assert sum(len(d.pruned) for d in adjusted.values()) == 10
    assert adjusted["a"].pruned == [0, 1, 2, 3]
    assert adjusted["b"].pruned == [0, 1, 2, 3, 4, 5]
    assert adjusted["b"].kept == [6, 7, 8, 9]
    # ... and the other way: a goal below what the sweep removed brings back the units pruned
    # at the largest cumulative increase (a3 at 0.004, b1 at 0.0035) first.
    tol, restored = _adjusted({"a": a, "b": b}, goal=4, config=config)
    assert restored["a"].pruned == [0, 1, 2] and restored["b"].pruned == [0]
    assert restored["a"].kept == [3, 4, 5, 6, 7, 8, 9]


def test_adjusting_keeps_min_units():
    d = _decision(4, [0.0, 0.0, 0.0, 0.0], kept=[3])
    config = PruneConfig(tol=0.05, repeats=5, min_units=2)
    _, adjusted = _adjusted({"a": d}, goal=4, config=config)
    assert len(adjusted["a"].kept) == 2
