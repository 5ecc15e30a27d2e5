"""The team's own architecture (code the zoo does not have), through the CLI: pack the source
and weights as a model directory, prune it with MIPP, load it back with trust_code, export it.

Architectures (tests/custom_archs): a CNN with a residual block, a concatenation of a plain and
a depthwise-separable branch and a grouped convolution (pruned partition by partition); an MLP with
a skip connection, as a zipped package.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import mipp
from mipp.cli import main
from mipp.custom import CodeSpec, build_code_model
from mipp.groups import find_unit_groups, unprunable_layers
from mipp.zoo import save_weights

pytestmark = pytest.mark.slow
ARCHS = Path(__file__).resolve().parents[1] / "custom_archs"
QUICK_MIPP = ["--calibration-samples", "512", "--repeats", "2", "--retrain-epochs", "1",
              "--set", 'reconstructor={"epochs": 5, "finetune_epochs": 2, "ordering_epochs": 2}']


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    """Digits as raw 8x8 images (0..16) with their own scale, as a user would upload them."""
    digits = load_digits()
    x, y = digits.images[:, None].astype(np.float32), digits.target.astype(np.int64)
    path = tmp_path_factory.mktemp("digits") / "images.npz"
    np.savez(path, x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:])
    return path


def _train(model, data, epochs=15):
    mipp.train(model, data, mipp.TrainConfig(epochs=epochs, lr=1e-2, batch_size=64),
               device="cpu", seed=0)
    return model


def test_groups_of_a_residual_concat_depthwise_cnn(one_thread):
    model = build_code_model(CodeSpec(factory="rescat_cnn:build", kwargs={"width": 8},
                                      input_shape=(1, 8, 8), num_classes=10), ARCHS)
    x = torch.randn(2, 1, 8, 8)
    groups = {g.name: g for g in find_unit_groups(model, x)}
    # The residual stream: the stem, the block's last conv and the depthwise conv, one group.
    assert set(groups["stem.0"].members) == {"stem.0", "res_conv2", "depthwise"}
    # The concatenation: the separable branch's units are read at offset 8 by `mix`.
    assert dict(groups["pointwise"].consumer_inputs)["mix"] == tuple(range(8, 16))
    assert dict(groups["branch.0"].consumer_inputs)["mix"] == tuple(range(8))
    # The grouped conv (groups=4) and `mix`, which feeds it, keep equal partitions of 4.
    assert groups["mix"].partitions == groups["grouped"].partitions == 4
    assert groups["stem.0"].partitions == 1
    assert unprunable_layers(model, x) == []
    assert "rescat_cnn" not in sys.modules


def test_cli_packs_prunes_and_reloads_a_custom_cnn(digit_images, tmp_path, capsys, one_thread):
    data = mipp.load_npz(digit_images, preprocessing={"scale": 16.0})
    spec = CodeSpec(factory="rescat_cnn:build", kwargs={"width": 8}, input_shape=(1, 8, 8),
                    num_classes=10)
    model = _train(build_code_model(spec, ARCHS), data)
    weights = save_weights(model, tmp_path / "weights.safetensors")
    dense = tmp_path / "dense"
    assert main(["pack", "--code", str(ARCHS / "rescat_cnn.py"), "--factory", "rescat_cnn:build",
                 "--kwargs", '{"width": 8}', "--weights", str(weights), "--dataset",
                 str(digit_images), "--preprocessing", '{"scale": 16}', "--out", str(dense),
                 "-q"]) == 0
    pruned = tmp_path / "pruned"
    # A directory that holds code is not run without consent.
    assert main(["prune", str(dense), "--dataset", str(digit_images), "--out", str(pruned),
                 "-q"]) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert main(["prune", str(dense), "--trust-code", "--dataset", str(digit_images),
                 "--device", "cpu", "--out", str(pruned), "-q", *QUICK_MIPP]) == 0
    report = capsys.readouterr().out
    assert "left alone" not in report and "\ngrouped " in report
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert metrics["params"]["after"] < metrics["params"]["before"]
    assert metrics["unprunable_layers"] == []
    info = json.loads((pruned / "model.json").read_text())
    assert info["spec"]["kind"] == "code" and (pruned / "code" / "rescat_cnn.py").is_file()
    assert info["preprocessing"]["scale"] == 16.0  # recorded from the model directory
    # The directory rebuilds from its own code copy, replays the removals, takes raw inputs.
    shutil.move(str(dense), str(tmp_path / "gone"))
    predictor = mipp.load_predictor(pruned, trust_code=True)
    raw = np.load(digit_images)
    accuracy = float((predictor.predict(raw["x_test"]) == raw["y_test"]).mean())
    assert accuracy == pytest.approx(metrics["accuracy"]["retrained"], abs=1e-6)
    assert sum(p.numel() for p in predictor.model.parameters()) == metrics["params"]["after"]
    ort = pytest.importorskip("onnxruntime")
    onnx_path = mipp.export_onnx(predictor.model, (1, 8, 8), tmp_path / "m.onnx")
    logits = ort.InferenceSession(str(onnx_path)).run(None, {"input": raw["x_test"]})[0]
    expected = predictor(raw["x_test"]).numpy()
    # float32 noise grows with the logits (up to ~90 here; PyTorch's own float32 forward is
    # ~1e-4 from float64), so the tolerance is relative to their scale.
    np.testing.assert_allclose(logits, expected, atol=1e-5 * np.abs(expected).max() + 1e-4)


def test_zipped_skip_mlp_package_prunes_with_l1(digit_images, tmp_path, one_thread):
    archive = tmp_path / "skipmlp.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("__init__.py", "model.py"):
            zf.write(ARCHS / "skipmlp" / name, f"skipmlp/{name}")
    data = mipp.load_npz(digit_images, preprocessing="standardize")
    spec = CodeSpec(factory="skipmlp:build", kwargs={"hidden": 32}, input_shape=(1, 8, 8),
                    num_classes=10)
    from mipp.custom import copy_code
    model = _train(build_code_model(spec, copy_code(archive, tmp_path / "src")), data, 10)
    groups = {g.name: g for g in find_unit_groups(model, data.x_train[:2])}
    assert set(groups["fc_in"].members) == {"fc_in", "fc_b"}  # the skip couples them
    result = mipp.prune(model, data, mipp.PruneConfig(method="l1", target=0.4, device="cpu",
                                                      retrain=mipp.TrainConfig(epochs=1)))
    out = result.save(tmp_path / "pruned")
    loaded = mipp.load_model_dir(out, trust_code=True)
    with torch.no_grad():
        assert torch.allclose(loaded(data.x_test), result.model(data.x_test), atol=1e-5)
    assert result.metrics["units"]["after"] < result.metrics["units"]["before"]
    # The same through the CLI: the zip packed as a model directory, pruned with L1.
    weights = save_weights(model, tmp_path / "skipmlp.safetensors")
    dense, pruned = tmp_path / "cli-dense", tmp_path / "cli-pruned"
    assert main(["pack", "--code", str(archive), "--factory", "skipmlp:build", "--kwargs",
                 '{"hidden": 32}', "--weights", str(weights), "--dataset", str(digit_images),
                 "--preprocessing", "standardize", "--out", str(dense), "-q"]) == 0
    assert (dense / "code" / "skipmlp" / "model.py").is_file()
    assert main(["prune", str(dense), "--trust-code", "--dataset", str(digit_images),
                 "--method", "l1", "--target", "0.4", "--retrain-epochs", "1", "--device", "cpu",
                 "--out", str(pruned), "-q"]) == 0
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert metrics["accuracy"]["dense"] == pytest.approx(result.metrics["accuracy"]["dense"],
                                                         abs=1e-6)
    assert metrics["units"] == result.metrics["units"]  # same L1 selection, same counts
    predictor = mipp.load_predictor(pruned, trust_code=True)
    raw = np.load(digit_images)
    accuracy = float((predictor.predict(raw["x_test"]) == raw["y_test"]).mean())
    assert accuracy == pytest.approx(metrics["accuracy"]["retrained"], abs=1e-6)
