"""MIPP's target search (mipp/methods/mipp.py `search_tol`): a sweep, a fresh one while the
target lies above what the last removed, the last one's tests replayed at the tol that removes
the target, verified; below the sweep it lands within 0.02 at the cost of one sweep and a few
fine-tunes, and its report shows the decisions it made."""

import logging

import pytest
import torch

import mipp
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.data import load_dataset
from mipp.groups import find_unit_groups
from mipp.methods.context import SelectionContext, removed_fraction
from mipp.methods.mipp import MAX_SWEEPS, VERIFY_ROUNDS, _replay_at_goal, _replayed, select_mipp
from mipp.terc import LayerDecision
from mipp.zoo import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _decision(size: int, increases: list[float], kept: list[int]) -> LayerDecision:
    """A layer whose units were tested in order 0..size-1, unit i's cumulative loss increase
    `increases[i]` (sd 0), scale (mi) 1.0."""
    tests = [{"unit": u, "mean_d": inc, "sd_d": 0.0, "threshold": 0.05, "kept": u in kept}
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


def test_replaying_at_the_goal_removes_the_units_nearest_the_threshold_first():
    # a: four cheap units pruned, six kept that would each cost about 0.5. b: two pruned, eight
    # kept that would each cost about 0.06 (on top of what b had spent: 0.0035).
    a = _decision(10, [0.001, 0.002, 0.003, 0.004] + [0.5 + 0.1 * i for i in range(6)],
                  kept=list(range(4, 10)))
    b = _decision(10, [0.0015, 0.0035] + [0.06 + 0.001 * i for i in range(8)],
                  kept=list(range(2, 10)))
    config = PruneConfig(tol=0.05, repeats=5, target=0.5)
    # The sweep removed 6 of 20; the goal is 10: the four extra units come from b.
    tol, replayed, _ = _replay_at_goal({"a": a, "b": b}, goal=10, config=config)
    assert sum(len(d.pruned) for d in replayed.values()) == 10
    assert replayed["a"].pruned == [0, 1, 2, 3]
    assert replayed["b"].pruned == [0, 1, 2, 3, 4, 5]
    assert replayed["b"].kept == [6, 7, 8, 9]
    # The tests say what the replay decided, and what the sweep had.
    b_tests = {t["unit"]: t for t in replayed["b"].units}
    assert [u for u, t in b_tests.items() if not t["kept"]] == [0, 1, 2, 3, 4, 5]
    assert [u for u, t in b_tests.items() if not t["sweep_kept"]] == [0, 1]
    assert all(t["threshold"] == pytest.approx(tol) for t in b_tests.values())
    # ... and the other way: a goal below what the sweep removed brings back the units pruned
    # at the largest cumulative increase (a3 at 0.004, b1 at 0.0035) first.
    tol, restored, _ = _replay_at_goal({"a": a, "b": b}, goal=4, config=config)
    assert restored["a"].pruned == [0, 1, 2] and restored["b"].pruned == [0]
    assert restored["a"].kept == [3, 4, 5, 6, 7, 8, 9]


def test_a_cost_factor_moves_units_out_of_a_layer():
    # Same sweep as above; b's costs scaled 10x (a verification measured more than the
    # replay expected): the goal's extra units then come from a.
    a = _decision(10, [0.001, 0.002, 0.003, 0.004] + [0.5 + 0.1 * i for i in range(6)],
                  kept=list(range(4, 10)))
    b = _decision(10, [0.0015, 0.0035] + [0.06 + 0.001 * i for i in range(8)],
                  kept=list(range(2, 10)))
    config = PruneConfig(tol=0.05, repeats=5, target=0.5)
    _, replayed, spent = _replay_at_goal({"a": a, "b": b}, 10, config, {"b": 10.0})
    assert sum(len(d.pruned) for d in replayed.values()) == 10
    assert len(replayed["a"].pruned) > 4 and len(replayed["b"].pruned) < 6
    # b's extras: b2 then b3 (shares 0.0565, 0.0575), scaled.
    assert replayed["b"].pruned == [0, 1, 2, 3]
    assert spent["b"] == pytest.approx(10 * (0.0015 + 0.002 + 0.0565 + 0.0575))


def test_a_goal_below_what_the_smallest_tol_removes_brings_back_the_costliest_first():
    # Every test is noisy (sd 0.02 against increases of 0.001-0.01): at any tol the confidence
    # allowance lets all go; a goal of 2 brings back the two largest increases.
    d = _decision(5, [0.001, 0.002, 0.003, 0.004, 0.005], kept=[])
    d.units[4]["mean_d"] = 0.015
    for t in d.units:
        t["sd_d"] = 0.02
    _, replayed, _ = _replay_at_goal({"a": d}, goal=2, config=PruneConfig(tol=0.05, repeats=5))
    assert replayed["a"].pruned == [0, 1]
    assert [t["unit"] for t in replayed["a"].units if not t["kept"]] == [0, 1]


def test_replaying_keeps_min_units():
    d = _decision(4, [0.0, 0.0, 0.0, 0.0], kept=[3])
    config = PruneConfig(tol=0.05, repeats=5, min_units=2)
    _, replayed, _ = _replay_at_goal({"a": d}, goal=4, config=config)
    assert len(replayed["a"].kept) == 2


# A trained MLP on sklearn's digits, with a MIPP small enough for unit tests.
TINY = dict(repeats=2, calibration_samples=384,
            reconstructor=ReconstructorConfig(epochs=20, finetune_epochs=4, ordering_epochs=4,
                                              patience=2, hidden_cap=32))


@pytest.fixture(scope="module")
def digits_context():
    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0, widths=(32, 16))
    mipp.train(model, data, TrainConfig(epochs=5, lr=1e-2, batch_size=64),
               device=torch.device("cpu"), seed=0)
    x, y = data.x_train[:384], data.y_train[:384]
    groups = find_unit_groups(model, x[:1])

    def run(target=None):
        return select_mipp(SelectionContext(model, groups, x, y,
                                            PruneConfig(**TINY, target=target)))
    return groups, run


def _fits(selection) -> int:
    return sum(layer["candidate_fits"] for layer in selection.layers.values())


def _flags_match(selection) -> None:
    for name, layer in selection.layers.items():
        kept = set(selection.keep[name])
        assert {t["unit"] for t in layer["tests"] if t["kept"]} <= kept, name
        assert not {t["unit"] for t in layer["tests"] if not t["kept"]} & kept, name


def _sweep_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("target search sweep")]


def test_a_target_below_the_sweep_lands_in_one_sweep_and_a_few_fine_tunes(digits_context,
                                                                          caplog):
    groups, run = digits_context
    single = run()
    target = 0.3
    assert removed_fraction(groups, single.keep) - target > 0.02  # the replay must work
    with caplog.at_level(logging.INFO, logger="mipp.selection"):
        selection = run(target)
    assert abs(removed_fraction(groups, selection.keep) - target) <= 0.02
    assert len(_sweep_lines(caplog)) == 1
    # The sweep is the default one (same fits); the verification adds at most one fine-tune
    # a layer a round.
    assert _fits(single) <= _fits(selection) <= _fits(single) + VERIFY_ROUNDS * len(groups)
    _flags_match(selection)
    for layer in selection.layers.values():
        assert layer["replayed"] and 1 <= layer["replay"]["rounds"] <= VERIFY_ROUNDS
        assert layer["replay"]["tol"] == layer["tol"] and layer["sweeps"] == 1
        assert {"mean_d", "threshold", "passed"} <= set(layer["replay"]["verification"])


def test_a_target_above_the_sweep_gets_a_fresh_sweep_not_an_extrapolated_replay(
        digits_context, caplog):
    groups, run = digits_context
    single = run()
    target = 0.9
    assert target - removed_fraction(groups, single.keep) > 0.02
    with caplog.at_level(logging.INFO, logger="mipp.selection"):
        selection = run(target)
    assert abs(removed_fraction(groups, selection.keep) - target) <= 0.02
    lines = _sweep_lines(caplog)
    assert 2 <= len(lines) <= MAX_SWEEPS
    assert lines[0].startswith("target search sweep 1/") and lines[1].startswith(
        "target search sweep 2/")
    # The second sweep runs at a larger tol than the first, and the report counts both
    # sweeps' fine-tunes: more than the single sweep, fewer than two full ones (the output
    # layer's fits are reused).
    tols = [float(line.split("tol=")[1].split(":")[0]) for line in lines]
    assert tols == sorted(tols) and tols[1] > tols[0]
    assert _fits(single) < _fits(selection) < 2 * _fits(single) + VERIFY_ROUNDS * len(groups)
    _flags_match(selection)
    for layer in selection.layers.values():
        assert layer["sweeps"] == len(lines)


def test_a_target_the_sweep_already_meets_is_the_sweep(digits_context):
    groups, run = digits_context
    single = run()
    selection = run(round(removed_fraction(groups, single.keep), 4))
    assert selection.keep == single.keep and _fits(selection) == _fits(single)
    assert not any(layer["replayed"] for layer in selection.layers.values())
    _flags_match(selection)
