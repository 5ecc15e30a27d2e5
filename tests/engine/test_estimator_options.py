"""The estimator's cost levers and options (issue 9 item 5): what each one promises."""

import pytest
import torch
from torch.nn import functional as F

from mipp.config import PruneConfig, ReconstructorConfig
from mipp.estimator import BatchedMLP, Split, fit, per_model_loss
from mipp.terc import terc_select

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 1024, d: int = 6, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.stack([torch.tanh(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], dim=1)
    return Split(x[:800], y[:800], x[800:], y[800:])


def test_cross_entropy_loss_is_torch_cross_entropy_against_probabilities():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 50, 10, generator=g)
    target = torch.softmax(torch.randn(50, 10, generator=g), dim=1)
    expected = torch.stack([F.cross_entropy(p, target) for p in pred])
    assert torch.allclose(per_model_loss(pred, target, "ce"), expected, atol=1e-6)


def test_dropping_columns_masked_in_every_model_changes_nothing_but_the_cost():
    """The fast path fits on the columns some model sees: the losses equal a masked fit's."""
    split = _data()
    g = torch.Generator().manual_seed(1)
    models = BatchedMLP.create(4, 6, 8, 2, generator=g)
    mask = torch.ones(4, 6)
    mask[:, [4, 5]] = 0          # masked in every model
    mask[0, 1] = mask[1, 2] = 0  # masked in one model each
    orders = [torch.randperm(800, generator=g) for _ in range(6)]
    full = fit(models.copy(), split, epochs=6, patience=2, lr=3e-3, batch_size=128,
               mask=mask, orders=orders)
    keep = torch.tensor([0, 1, 2, 3])
    narrow = BatchedMLP(models.w1.detach()[:, keep].clone(), models.b1.detach().clone(),
                        models.w2.detach().clone(), models.b2.detach().clone())
    narrow_split = Split(split.x_train[:, keep], split.y_train, split.x_val[:, keep], split.y_val)
    dropped = fit(narrow, narrow_split, epochs=6, patience=2, lr=3e-3, batch_size=128,
                  mask=mask[:, keep], orders=orders)
    assert torch.allclose(full, dropped, rtol=1e-5, atol=1e-6)


def test_min_delta_stops_a_fit_that_only_creeps_and_keeps_its_best_weights():
    """With min_delta the fit stops once gains fall under the fraction; it never returns a
    loss above its start (the best weights follow every decrease)."""
    split = _data()
    g = torch.Generator().manual_seed(2)
    models = BatchedMLP.create(3, 6, 8, 2, generator=g)
    orders = [torch.randperm(800, generator=g) for _ in range(200)]
    start = per_model_loss(models(split.x_val), split.y_val)
    best = {}
    for min_delta in (0.0, 0.05):
        fitted = models.copy()
        losses = fit(fitted, split, epochs=200, patience=3, lr=3e-3, batch_size=800,
                     orders=orders, min_delta=min_delta)
        assert bool((losses <= start).all())
        # The best weights are returned: evaluating them gives the reported losses.
        assert torch.allclose(per_model_loss(fitted(split.x_val), split.y_val), losses, atol=1e-5)
        best[min_delta] = losses
    # A 5% rule stops long before 200 epochs of full-batch steps have crept to their end.
    assert bool((best[0.05] >= best[0.0] - 1e-6).all())
    assert bool((best[0.05] > best[0.0]).any())


def _copies_layer(seed: int, n: int = 1536):
    """Units 0-2 informative, 3 an exact copy of 0, 4 noise; y is a function of 0-2."""
    g = torch.Generator().manual_seed(seed)
    a, b, c, noise = torch.randn(4, n, generator=g)
    x = torch.stack([a, b, c, a.clone(), noise], dim=1)
    return x, g


FAST = dict(epochs=60, finetune_epochs=12, ordering_epochs=10)


@pytest.mark.parametrize("path", ["fast", "sequential"])
def test_cross_entropy_on_logits_keeps_what_the_classes_need(path):
    x, g = _copies_layer(0)
    logits = torch.stack([2 * x[:, 0], 2 * x[:, 1] - x[:, 2], x[:, 2] + x[:, 0], -x[:, 1]], 1)
    config = PruneConfig(path=path, tol=0.05,
                         reconstructor=ReconstructorConfig(logits_loss="ce", **FAST))
    decision = terc_select(x, logits, config, seed=0, y_is_logits=True)
    kept = set(decision.kept)
    assert len(kept & {0, 3}) == 1 and {1, 2} <= kept and 4 not in kept, sorted(kept)
    assert decision.mi > 0


def test_a_linear_reconstructor_on_a_small_layer_removes_its_copy_and_noise():
    x, g = _copies_layer(1)
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 1] - 2 * x[:, 2], x[:, 0]], 1)
    y = y + 0.05 * torch.randn(y.shape, generator=g)
    config = PruneConfig(tol=0.05, reconstructor=ReconstructorConfig(linear_below=5, **FAST))
    decision = terc_select(x, y, config, seed=0)
    kept = set(decision.kept)
    assert len(kept & {0, 3}) == 1 and {1, 2} <= kept and 4 not in kept, sorted(kept)


def _grid_layer(seed: int, n: int = 1536, cells: int = 4):
    """5 units of `cells` columns each (a conv channel on a 2x2 grid): units 0-2 informative,
    3 an exact copy of 0 (every cell), 4 noise; y reads one cell of each informative unit and
    the spatial mean of another, so a unit's cells are not interchangeable."""
    g = torch.Generator().manual_seed(seed)
    units = torch.randn(4, n, cells, generator=g)
    x = torch.stack([units[0], units[1], units[2], units[0].clone(), units[3]], dim=1)
    y = torch.stack([x[:, 0, 0] - x[:, 1, 3], x[:, 1, 1] + x[:, 2].mean(1),
                     torch.tanh(x[:, 2, 2] + x[:, 0, 1])], dim=1)
    return x.flatten(1), y  # (n, 5 x cells): unit u is columns u*cells .. u*cells + cells - 1


@pytest.mark.parametrize("path", ["fast", "sequential"])
def test_units_of_several_columns_are_masked_and_decided_whole(path):
    x, y = _grid_layer(0)
    config = PruneConfig(path=path, tol=0.05, reconstructor=ReconstructorConfig(**FAST))
    decision = terc_select(x, y, config, seed=0, features=4)
    assert decision.size == 5 and len(decision.order) == 5
    kept = set(decision.kept)
    assert len(kept & {0, 3}) == 1 and {1, 2} <= kept and 4 not in kept, sorted(kept)
    with pytest.raises(ValueError, match="multiple of 3"):
        terc_select(x, y, config, seed=0, features=3)


def test_a_conv_grid_summarises_each_channel_by_its_cells():
    from mipp.activations import capture_unit_activations
    from mipp.groups import find_unit_groups
    from mipp.zoo import build_model
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    groups = find_unit_groups(model, x[:1])
    mean, _ = capture_unit_activations(model, groups, x)
    grid, logits = capture_unit_activations(model, groups, x, grid=2)
    for g in groups:
        # conv channels get 4 cells, a Linear's units 1
        assert grid[g.name].shape == (*mean[g.name].shape, 4 if g.name.startswith("conv") else 1)
    # conv1's 14x14 maps split into four equal 7x7 cells, whose means average to the spatial
    # mean; conv2's 5x5 maps (read by fc1 through the Flatten) into adaptive pooling's
    # overlapping 3x3 windows.
    assert torch.allclose(grid["conv1"].mean(2), mean["conv1"], atol=1e-5)
    assert torch.allclose(grid["fc1"][..., 0], mean["fc1"], atol=1e-6)
    with torch.no_grad():
        maps = model.pool2(model.relu2(model.conv2(model.pool1(model.relu1(model.conv1(x))))))
    assert maps.shape[2:] == (5, 5)
    assert torch.allclose(grid["conv2"][:, :, 0], maps[:, :, :3, :3].mean((2, 3)), atol=1e-5)
    assert torch.allclose(grid["conv2"][:, :, 3], maps[:, :, 2:, 2:].mean((2, 3)), atol=1e-5)
    assert logits.shape == (8, 10)
