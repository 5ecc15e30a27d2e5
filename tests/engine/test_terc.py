"""MI estimator and TERC selection on synthetic layers whose answer is known."""

import pytest
import torch

from mipp.config import PruneConfig
from mipp.estimator import estimate_loss_reduction, standardise
from mipp.terc import terc_select


def _columns(n: int, k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(k)]


def test_loss_reduction_is_near_zero_for_an_irrelevant_column_and_positive_for_a_relevant_one():
    a, b, noise = _columns(2048, 3, seed=1)
    y = torch.stack([torch.tanh(a + b), a * b, a - 0.5 * b], dim=1)
    y = (y - y.mean(0)) / y.std(0)
    relevant = estimate_loss_reduction(a[:, None], y, seed=0)
    irrelevant = estimate_loss_reduction(noise[:, None], y, seed=0)
    both = estimate_loss_reduction(torch.stack([a, b], 1), y, seed=0)
    assert abs(irrelevant) < 0.02
    assert relevant > 0.2
    assert both > relevant + 0.2  # b adds information that a alone lacks


def test_standardise_floors_near_dead_columns_and_flags_constant_ones():
    n = 5000
    live = torch.randn(n, 4)
    near_dead = torch.zeros(n)
    near_dead[0] = 1.0  # a ReLU that fires once
    x = torch.cat([live, near_dead[:, None], torch.full((n, 1), 2.0)], dim=1)
    xs, constant = standardise(x, std_floor=0.1)
    assert constant.tolist() == [False] * 5 + [True]
    assert xs[:, 5].abs().max() == 0
    assert xs[:, 4].abs().max() < 11  # without the floor it would be ~70 standard deviations


def _layer(n: int = 2048, seed: int = 1):
    """Units: 0 a, 1 b, 2 copy of a, 3 constant, 4 noise feeding nothing, 5 c, 6 copy of b."""
    a, b, c, noise = _columns(n, 4, seed)
    x = torch.stack([a, b, a.clone(), torch.full((n,), 3.0), noise, c, b.clone()], dim=1)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.stack([torch.tanh(a + b), b * c, a - c, torch.relu(a)], dim=1)
    return x, y + 0.05 * torch.randn(y.shape, generator=g)


CASES = dict(tol=0.02, confidence=0.9, repeats=5)


@pytest.mark.parametrize("path", ["sequential", "fast"])
def test_terc_removes_constant_dead_and_one_of_each_duplicate_and_keeps_informative(path):
    x, y = _layer()
    decision = terc_select(x, y, PruneConfig(path=path, **CASES), seed=0)
    kept = set(decision.kept)
    assert 3 in decision.constant and 3 not in kept
    assert 4 not in kept                        # feeds nothing downstream
    assert 5 in kept                            # c: its only copy
    assert len(kept & {0, 2}) == 1              # one of the duplicate pair a
    assert len(kept & {1, 6}) == 1              # one of the duplicate pair b
    assert sorted(decision.kept + decision.pruned) == list(range(7))
    assert decision.mi > 0.5


@pytest.mark.parametrize("speculation", ["prune", "keep"])
def test_fast_path_speculation_modes_reach_the_sequential_decisions(speculation):
    x, y = _layer(seed=3)
    reference = terc_select(x, y, PruneConfig(path="sequential", **CASES), seed=0)
    fast = terc_select(x, y, PruneConfig(path="fast", speculation=speculation, block_size=4,
                                         **CASES), seed=0)
    assert fast.order == reference.order
    assert fast.kept == reference.kept


def test_the_last_unit_of_a_layer_is_never_pruned():
    n = 1024
    x = torch.stack([torch.full((n,), 1.0), torch.full((n,), 2.0), torch.randn(n)], dim=1)
    y = torch.randn(n, 3)  # nothing in x predicts y: every unit is removable
    decision = terc_select(x, y, PruneConfig(tol=0.5, repeats=3), seed=0)
    assert len(decision.kept) == 1


def test_a_higher_tolerance_never_keeps_more_units():
    x, y = _layer(seed=5)
    strict = terc_select(x, y, PruneConfig(tol=0.0, confidence=0.6, **{"repeats": 5}), seed=0)
    loose = terc_select(x, y, PruneConfig(tol=0.5, confidence=0.6, repeats=5), seed=0)
    assert len(loose.kept) <= len(strict.kept)
    assert len(loose.kept) < 7


def test_rows_must_match():
    with pytest.raises(ValueError, match="rows"):
        terc_select(torch.randn(10, 3), torch.randn(11, 2), PruneConfig(), seed=0)


def test_a_layer_of_constant_units_keeps_one():
    n = 512
    x = torch.stack([torch.full((n,), float(v)) for v in range(4)], dim=1)
    decision = terc_select(x, torch.randn(n, 2), PruneConfig(repeats=2), seed=0)
    assert len(decision.kept) == 1 and len(decision.pruned) == 3


def test_min_units_is_a_floor_per_layer():
    x, y = _layer(seed=7)
    decision = terc_select(x, y, PruneConfig(tol=5.0, repeats=3, min_units=4), seed=0)
    assert len(decision.kept) == 4   # tol 5 would prune all but one without the floor
    assert 3 in decision.pruned      # the constant unit still goes first


def test_fast_and_sequential_paths_keep_the_same_units_on_a_small_conv_net():
    """Same seed, same kept sets: every fine-tune gets the same minibatches and the same
    per-model early stopping on both paths (a stopped model leaves the batched fit)."""
    import mipp
    from torch import nn

    from mipp.config import ReconstructorConfig, TrainConfig
    from mipp.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    mipp.train(model, data, TrainConfig(epochs=4), seed=0)
    kept = {}
    for path in ("sequential", "fast"):
        config = PruneConfig(path=path, block_size=4, calibration_samples=768, device="cpu",
                             reconstructor=ReconstructorConfig(epochs=40, finetune_epochs=12),
                             retrain=TrainConfig(epochs=0))
        result = mipp.prune(model, data, config)
        kept[path] = result.masks
    assert kept["fast"] == kept["sequential"]
    assert sum(map(len, kept["fast"].values())) < 6 + 8 + 16  # something was pruned
