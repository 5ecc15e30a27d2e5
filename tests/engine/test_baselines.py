"""Baselines through the allocator: valid keep sets, the known answer on constructed weights,
both modes."""

from __future__ import annotations

import copy

import pytest
import torch

from mipp.config import PruneConfig
from mipp.groups import apply_keep_sets, find_unit_groups
from mipp.methods.allocation import keep_global, select
from mipp.methods.context import SelectionContext, removed_fraction
from mipp.methods.grasp import grasp_scores
from mipp.methods.snip import snip_scores
from mipp.methods.synflow import synflow_scores
from mipp.methods.thinet import thinet_removal_order
from mipp.zoo import build_model

BASELINES = ["random", "l1", "taylor", "thinet", "snip", "grasp", "synflow"]


def _data(shape, n=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", (1, 6, 6), 4, widths=(16, 8)), (1, 6, 6)


def _convnet():
    torch.manual_seed(0)
    return build_model("lenet5", (1, 12, 12), 4, channels=(4, 6), widths=(12, 8)), (1, 12, 12)


def _context(model, shape, method, counts=None, target=0.5, seed=0):
    x, y = _data(shape)
    groups = find_unit_groups(model, x[:1])
    return SelectionContext(model, groups, x, y, PruneConfig(method=method, target=target,
                                                             seed=seed, counts=counts))


@pytest.mark.parametrize("build", [_mlp, _convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("method", BASELINES)
def test_every_method_keeps_exactly_the_requested_counts(build, method):
    model, shape = build()
    before = copy.deepcopy(model.state_dict())
    x, _ = _data(shape)
    groups = find_unit_groups(model, x[:1])
    counts = {g.name: max(1, g.size // 3) for g in groups}
    selection = select(_context(model, shape, method, counts=counts))

    assert set(selection.keep) == {g.name for g in groups}
    for g in groups:
        kept = selection.keep[g.name]
        assert len(kept) == counts[g.name]
        assert len(set(kept)) == len(kept) and all(0 <= i < g.size for i in kept)
        assert len(selection.layers[g.name]["scores"]) == g.size
    for name, tensor in model.state_dict().items():  # the context's model is never modified
        assert torch.equal(tensor, before[name]), name
    pruned = copy.deepcopy(model)
    apply_keep_sets(pruned, x[:1], selection.keep)
    assert pruned(x[:2]).shape == (2, 4)


@pytest.mark.parametrize("method", BASELINES)
def test_global_target_removes_about_the_target_fraction(method):
    model, shape = _convnet()
    ctx = _context(model, shape, method, target=0.6)
    selection = select(ctx)
    assert all(len(selection.keep[g.name]) >= 1 for g in ctx.groups)
    assert removed_fraction(ctx.groups, selection.keep) == pytest.approx(0.6, abs=0.03)


def test_l1_keeps_the_units_with_the_largest_weights():
    model, shape = _mlp()
    big = [3, 7, 11]
    with torch.no_grad():
        model.fc1.weight.fill_(0.01)
        model.fc1.weight[big] = 1.0
        model.fc2.weight.fill_(0.1)  # equal input columns: only fc1's rows decide
    selection = select(_context(model, shape, "l1", counts={"fc1": 3, "fc2": 8}))
    assert selection.keep["fc1"] == big


def test_random_is_seeded_and_differs_across_seeds():
    model, shape = _mlp()
    counts = {"fc1": 6, "fc2": 3}
    first = select(_context(model, shape, "random", counts=counts, seed=1)).keep
    again = select(_context(model, shape, "random", counts=counts, seed=1)).keep
    other = select(_context(model, shape, "random", counts=counts, seed=2)).keep
    assert first == again
    assert first != other


def test_thinet_keeps_the_units_that_feed_the_next_layer():
    model, shape = _mlp()
    feeding = [1, 4, 9, 13]
    with torch.no_grad():
        model.fc1.weight.abs_()  # positive inputs and weights: every fc1 unit is active
        model.fc1.weight[feeding] *= 0.1  # and the feeding ones are the smallest (L1 would drop them)
        mask = torch.zeros(16)
        mask[feeding] = 1.0
        model.fc2.weight.mul_(mask)  # the other units feed only zero weights
    selection = select(_context(model, shape, "thinet", counts={"fc1": 4, "fc2": 8}))
    assert selection.keep["fc1"] == feeding


def test_thinet_greedy_removes_cancelling_pairs_together():
    torch.manual_seed(0)
    # Units 0 and 1 cancel exactly; unit 2 carries the signal; unit 3 is small noise.
    z = torch.randn(500, 1)
    contributions = torch.cat([z, -z, 2 * torch.randn(500, 1), 0.5 * torch.randn(500, 1)], dim=1)
    order = thinet_removal_order(contributions, 3)
    assert set(order) == {0, 1, 3}  # removing both of a cancelling pair costs nothing


@pytest.mark.parametrize("scores_of", [snip_scores, grasp_scores, synflow_scores],
                         ids=["snip", "grasp", "synflow"])
def test_init_scores_have_the_group_shape_and_prefer_large_weights(scores_of):
    model, shape = _mlp()
    with torch.no_grad():
        model.fc1.weight[0] = 1e-6  # unit 0: near-zero weights in and out
        model.fc2.weight[:, 0] = 1e-6
        model.fc1.weight[5] *= 10  # unit 5: large weights
        model.fc2.weight[:, 5] *= 10
    ctx = _context(model, shape, "snip", counts={"fc1": 16, "fc2": 8})
    scores = scores_of(ctx)
    assert {name: tuple(s.shape) for name, s in scores.items()} == {"fc1": (16,), "fc2": (8,)}
    assert scores["fc1"][5] > scores["fc1"][0]
    assert torch.isfinite(scores["fc1"]).all() and torch.isfinite(scores["fc2"]).all()


def test_global_ranking_never_empties_a_group():
    model, shape = _mlp()
    scores = {"fc1": torch.ones(16), "fc2": torch.full((8,), 1e-9)}
    scores["fc2"][2] = 1e-3  # one unit far above its group's others: the normalised winner
    keep = keep_global(scores, 0.1, floors={"fc1": 1, "fc2": 1})
    assert len(keep["fc2"]) >= 1 and 2 in keep["fc2"]
    assert sum(map(len, keep.values())) == round(24 * 0.1)
