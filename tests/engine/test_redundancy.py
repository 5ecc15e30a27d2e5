"""Redundant units go and informative ones stay: synthetic layers whose answer is known.

A layer of 11 units spans four informative directions a, b, c, e. Redundant: an exact copy of
a, a scaled copy of b (2.5 b), the sum c + e, a dead unit (a ReLU that never fires: all 0), a
constant unit and a noise unit the next layer does not read. The next layer is a nonlinear
function of a, b, c, e. Whatever order TERC visits them in, exactly one of {a, copy}, one of
{b, 2.5 b} and two of {c, e, c + e} carry what is needed; the rest must go, at tol 0.01 and at
the default tol, on both paths, for 5 seeds.
"""

import pytest
import torch

from mipp.config import PruneConfig, ReconstructorConfig
from mipp.terc import terc_select

A, B, C, E, COPY, SCALED, SUM, DEAD, CONSTANT, NOISE = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
# Small budgets keep the test fast; the decisions do not need the defaults' precision.
FAST = ReconstructorConfig(epochs=60, finetune_epochs=15, ordering_epochs=15)


def _layer(seed: int, n: int = 1536) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b, c, e, noise = torch.randn(5, n, generator=g)
    x = torch.stack([a, b, c, e, a.clone(), 2.5 * b, c + e, torch.zeros(n),
                     torch.full((n,), 3.0), noise], dim=1)
    y = torch.stack([torch.tanh(a + b), b * c, a - e, torch.relu(c + e), torch.sin(a)], dim=1)
    return x, y + 0.05 * torch.randn(y.shape, generator=g)


@pytest.mark.parametrize("path", ["fast", "sequential"])
@pytest.mark.parametrize("tol", [0.01, PruneConfig().tol])
def test_redundant_units_go_and_informative_ones_stay(path, tol):
    for seed in range(5):
        x, y = _layer(seed)
        decision = terc_select(x, y, PruneConfig(path=path, tol=tol, reconstructor=FAST),
                               seed=seed)
        kept = set(decision.kept)
        where = f"seed {seed}: kept {sorted(kept)}"
        assert not kept & {DEAD, CONSTANT, NOISE}, where
        assert len(kept & {A, COPY}) == 1, where
        assert len(kept & {B, SCALED}) == 1, where
        assert len(kept & {C, E, SUM}) == 2, where


def test_compensation_starts_a_copy_at_the_unmasked_loss():
    """The least-squares compensation re-expresses an exact copy through its twin: the masked
    model's loss before any fine-tune equals the unmasked one; an informative unit's does not."""
    from mipp.estimator import BatchedMLP, Compensator, evaluate_split, fit, split_rows, standardise
    x, y = _layer(0)
    xs, _ = standardise(x, 0.1)
    g = torch.Generator().manual_seed(0)
    split = split_rows(xs, (y - y.mean(0)) / y.std(0), 0.2, g)
    models = BatchedMLP.create(3, x.shape[1], 10, y.shape[1], generator=g)
    fit(models, split, epochs=40, patience=3, lr=3e-3, batch_size=256, generator=g)
    base = evaluate_split(models, split)
    compensator = Compensator(split.x_train)
    # a and its copy masked together: a is gone, nothing re-expresses it.
    for removed, redundant in (([COPY], True), ([SCALED], True), ([SUM], True),
                               ([A, COPY], False)):
        mask = torch.ones(3, x.shape[1])
        mask[:, [CONSTANT, *removed]] = 0
        plain = evaluate_split(models, split, mask)
        compensated = evaluate_split(compensator.apply(models, [[CONSTANT, *removed]]), split,
                                     mask)
        if redundant:
            assert torch.allclose(compensated, base, rtol=1e-3, atol=1e-4), removed
            assert bool((plain > base + 0.01).all()), removed  # masking alone hurts
        else:
            assert bool((compensated > base + 0.05).all())
