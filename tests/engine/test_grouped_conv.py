"""Grouped (non-depthwise) convolutions are pruned, not left alone: each of a grouped conv's
partitions keeps the same number of channels, its weight matches the masked original, and the
pruned model reloads and exports.

The architecture is written as code into a temporary folder (a team's own model), so that the
pruned directory rebuilds with `load_model_dir(d, trust_code=True)`.
"""

from __future__ import annotations

import copy
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mipp
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.custom import CodeSpec, build_code_model
from mipp.errors import ConfigError
from mipp.groups import (align_to_partitions, apply_keep_sets, find_unit_groups,
                         replay_history, unprunable_layers)

SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class GroupedNet(nn.Module):
        """conv1 (1->8) feeds grouped conv2 (8->16, groups=4): conv1's 8 units are read in 4
        partitions of 2, conv2's 16 outputs are 4 partitions of 4."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.conv3(x))
            return self.fc(x.mean((2, 3)))

    def build():
        return GroupedNet()
''')
SPEC = CodeSpec(factory="grouped_net:build", input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped_code")
    (folder / "grouped_net.py").write_text(SOURCE)
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    digits = load_digits()
    x, y = digits.images[:, None].astype(np.float32), digits.target.astype(np.int64)
    path = tmp_path_factory.mktemp("digits") / "images.npz"
    np.savez(path, x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:])
    return mipp.load_npz(path, preprocessing={"scale": 16.0})


@pytest.fixture(scope="module")
def trained(code_dir, digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared CPU
    model = build_code_model(SPEC, code_dir, seed=0)
    mipp.train(model, digits, TrainConfig(epochs=4, lr=1e-2, batch_size=64), device="cpu",
               seed=0)
    yield model.eval()
    torch.set_num_threads(threads)


def _zeroing(removed):
    """A forward hook that zeroes the removed channels: the masked original."""
    index = torch.tensor(removed)
    return lambda module, inputs, out: out.index_fill(1, index, 0.0)


def test_groups_record_partitions_and_nothing_is_left_alone(code_dir):
    model = build_code_model(SPEC, code_dir, seed=0)
    x = torch.randn(2, 1, 8, 8)
    groups = {g.name: g for g in find_unit_groups(model, x)}
    assert {n: g.partitions for n, g in groups.items()} == {"conv1": 4, "conv2": 4, "conv3": 1}
    assert unprunable_layers(model, x) == []


def test_surgery_matches_the_masked_original_where_torch_pruning_alone_does_not(code_dir):
    import torch_pruning as tp
    model = build_code_model(SPEC, code_dir, seed=0).eval()
    x = torch.randn(4, 1, 8, 8)
    # One unit per partition of 2, at different positions (0, 1, 0, 1): Torch-Pruning by
    # itself gives every partition the first one's weight column.
    keep1, keep2 = [0, 3, 4, 7], [0, 1, 5, 6, 8, 9, 14, 15]
    removed1 = [i for i in range(8) if i not in keep1]
    removed2 = [i for i in range(16) if i not in keep2]
    masked = copy.deepcopy(model)
    masked.bn1.register_forward_hook(_zeroing(removed1))
    masked.bn2.register_forward_hook(_zeroing(removed2))
    reference = masked(x)

    tp_only = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(tp_only, example_inputs=x)
    graph.get_pruning_group(tp_only.conv1, tp.prune_conv_out_channels, removed1).prune()
    graph.get_pruning_group(tp_only.conv2, tp.prune_conv_out_channels, removed2).prune()
    assert (tp_only(x) - reference).abs().max() > 1e-3

    pruned = copy.deepcopy(model)
    history = apply_keep_sets(pruned, x, {"conv1": keep1, "conv2": keep2})
    conv2 = pruned.conv2
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (4, 8, 4)
    assert tuple(conv2.weight.shape) == (8, 1, 3, 3)
    torch.testing.assert_close(pruned(x), reference, atol=1e-5, rtol=1e-5)
    replayed = copy.deepcopy(model)
    replay_history(replayed, x, history)
    torch.testing.assert_close(replayed(x), pruned(x))


def test_a_keep_set_with_unequal_partitions_is_refused(code_dir):
    model = build_code_model(SPEC, code_dir, seed=0)
    with pytest.raises(ConfigError, match=r"\[2, 1, 0, 0\].*same non-zero count"):
        apply_keep_sets(model, torch.randn(2, 1, 8, 8), {"conv1": [0, 1, 2]})


def test_align_to_partitions_rounds_up_with_the_best_extras():
    # 12 units in 3 partitions of 4; the method kept 2, 1 and 0 of them.
    assert align_to_partitions([0, 1, 4], 12, 3) == [0, 1, 4, 5, 8, 9]
    scores = [0, 0, 0, 0, 1, 0, 0, 9, 0, 5, 7, 0]
    assert align_to_partitions([0, 1, 4], 12, 3, scores) == [0, 1, 4, 7, 9, 10]
    assert align_to_partitions([3, 6], 8, 1) == [3, 6]
    assert align_to_partitions([1, 3], 4, 2) == [1, 3]  # already equal: unchanged


def _kept_per_partition(kept, size, partitions):
    block = size // partitions
    return [sum(1 for i in kept if i // block == p) for p in range(partitions)]


@pytest.mark.parametrize("method,extra", [
    ("l1", {}),
    ("mipp", {"calibration_samples": 256, "repeats": 2,
              "reconstructor": ReconstructorConfig(epochs=5, finetune_epochs=2,
                                                   ordering_epochs=2)}),
])
def test_pruned_by_a_method_at_a_target(method, extra, trained, digits, code_dir, tmp_path):
    config = PruneConfig(method=method, target=0.5, seed=0, device="cpu",
                         retrain=TrainConfig(epochs=1, lr=1e-3, batch_size=64), **extra)
    result = mipp.prune(trained, digits, config)
    for name, size in (("conv1", 8), ("conv2", 16)):
        counts = _kept_per_partition(result.masks[name], size, 4)
        assert len(set(counts)) == 1 and counts[0] >= 1, (name, result.masks[name])
    rows = {row["name"]: row for row in result.layers}
    for name, row in rows.items():
        if "partition_rounding" in row:  # the report says when a count was rounded up
            rounding = row["partition_rounding"]
            assert rounding["partitions"] == 4 and rounding["kept"] > rounding["chosen"]
            assert row["units_after"] == rounding["kept"]
    assert sum(row["units_after"] for row in rows.values()) < sum(
        row["units_before"] for row in rows.values())
    assert result.metrics["params"]["after"] < result.metrics["params"]["before"]
    assert result.metrics["unprunable_layers"] == []
    x = digits.x_test[:16]
    assert result.model(x).shape == (16, 10)

    out = result.save(tmp_path / "pruned")
    reloaded = mipp.load_model_dir(out, trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), atol=1e-5, rtol=1e-5)
    # The graph itself runs (onnxruntime), on the prepared inputs the model saw here.
    import onnxruntime as ort
    onnx_path = mipp.export_onnx(result.model, (1, 8, 8), tmp_path / "m.onnx",
                                 preprocessing=mipp.Preprocessing())
    logits = ort.InferenceSession(str(onnx_path)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(logits, result.model(x).detach().numpy(), atol=1e-4)


def test_a_layer_norm_is_still_left_alone_and_reported():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    model = WithNorm()
    x = torch.randn(2, 6)
    assert find_unit_groups(model, x) == []
    rows = {row["name"]: row["reason"] for row in unprunable_layers(model, x)}
    assert "LayerNorm" in rows["fc1"] and "norm" in rows


def test_a_grouped_conv_reading_a_concatenation_is_left_alone_and_reported():
    class CatGrouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.grouped(torch.cat([self.a(x), self.b(x)], dim=1))
            return self.fc(x.mean((2, 3)))

    model = CatGrouped()
    x = torch.randn(2, 1, 6, 6)
    # Its partitions would tie a's and b's counts together: neither is pruned.
    assert [g.name for g in find_unit_groups(model, x)] == ["grouped"]
    rows = {row["name"]: row["reason"] for row in unprunable_layers(model, x)}
    assert set(rows) == {"a", "b"} and "a concatenation" in rows["a"]


def test_a_scorer_given_counts_that_split_evenly_keeps_exactly_them(trained, digits):
    """L1 at another method's (already aligned) counts takes count / partitions per block, so
    the comparison at equal counts stays equal: no rounding up."""
    counts = {"conv1": 4, "conv2": 8, "conv3": 5}
    config = PruneConfig(method="l1", allocation="counts", counts=counts, seed=0, device="cpu",
                         refit=False, retrain=TrainConfig(epochs=0))
    result = mipp.prune(trained, digits, config)
    rows = {row["name"]: row for row in result.layers}
    assert {name: rows[name]["units_after"] for name in counts} == counts
    assert not any("partition_rounding" in row for row in rows.values())
    assert _kept_per_partition(result.masks["conv1"], 8, 4) == [1, 1, 1, 1]
    assert _kept_per_partition(result.masks["conv2"], 16, 4) == [2, 2, 2, 2]
