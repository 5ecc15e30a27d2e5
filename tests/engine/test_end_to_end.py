"""Train, prune with MIPP, retrain, save and load, on sklearn digits (CPU, about a minute).

The figures asserted here were measured with these exact settings (seeds 0 and 1):
MLP 64-32: 75-76% of units removed, retrained accuracy 0.947-0.967 (dense 0.967-0.969);
LeNet-5: 86% removed, retrained 0.875-0.917 (dense 0.953-0.961).
"""

import json
import subprocess
import sys

import pytest
import torch

import mipp
from mipp.config import PruneConfig, TrainConfig
from mipp.data import load_dataset
from mipp.errors import ConfigError, DataError
from mipp.zoo import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trained(arch, data, seed=0, **config):
    model = build_model(arch, data.input_shape, data.num_classes, seed=seed, **config)
    mipp.train(model, data, TrainConfig(epochs=30, lr=3e-3), seed=seed)
    return model


@pytest.fixture(scope="module")
def mlp_result(digits):
    model = _trained("mlp", digits, widths=[64, 32])
    seen = []
    result = mipp.prune(model, digits, PruneConfig(seed=0, retrain=TrainConfig(epochs=10)),
                        progress=lambda phase, fraction, message="": seen.append((phase, fraction)))
    return model, result, seen


def test_mlp_pruned_retrained_and_smaller(mlp_result):
    model, result, seen = mlp_result
    m = result.metrics
    assert m["accuracy"]["dense"] > 0.94
    assert 0.6 <= m["units"]["removed_fraction"] <= 0.9
    assert m["accuracy"]["retrained"] >= 0.90
    # the least-squares refit recovers most of what removal cost before any retraining
    assert m["accuracy"]["pruned"] > m["accuracy"]["pruned_no_refit"] + 0.3
    assert m["params"]["after"] < 0.35 * m["params"]["before"]
    assert m["macs"]["after"] < m["macs"]["before"]
    assert sum(p.numel() for p in result.model.parameters()) == m["params"]["after"]
    assert [l["units_after"] for l in result.layers] == [len(v) for v in result.masks.values()]
    phases = [p for p, _ in seen]
    assert {"selecting", "pruning", "refitting", "retraining"} <= set(phases)
    assert all(0.0 <= f <= 1.0 for _, f in seen)


def test_save_and_load_reproduce_outputs(mlp_result, digits, tmp_path):
    _, result, _ = mlp_result
    out = result.save(tmp_path / "pruned")
    assert {p.name for p in out.iterdir()} >= {"model.json", "weights.safetensors",
                                                "masks.json", "metrics.json"}
    loaded = mipp.load_model_dir(out)
    with torch.no_grad():
        assert torch.allclose(loaded(digits.x_test), result.model(digits.x_test), atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"]["retrained"] == result.metrics["accuracy"]["retrained"]
    assert mipp.evaluate(loaded, digits.x_test, digits.y_test)["accuracy"] == \
        pytest.approx(result.metrics["accuracy"]["retrained"])


def test_lenet5_on_digits(digits):
    model = _trained("lenet5", digits)
    result = mipp.prune(model, digits, PruneConfig(seed=0, retrain=TrainConfig(epochs=10)))
    m = result.metrics
    assert 0.7 <= m["units"]["removed_fraction"] <= 0.95
    assert m["accuracy"]["retrained"] >= 0.80
    assert all(l["units_after"] >= 1 for l in result.layers)
    assert result.model.conv2.out_channels == result.layers[1]["units_after"]


def test_pruning_at_initialisation_trains_the_smaller_net(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0, widths=[64, 32])
    config = PruneConfig(mode="at-init", tol=0.05, retrain=TrainConfig(epochs=30, lr=3e-3))
    result = mipp.prune(model, digits, config)
    m = result.metrics
    assert m["accuracy"]["dense"] < 0.3           # untrained
    assert m["units"]["removed_fraction"] > 0.1
    assert m["accuracy"]["retrained"] > 0.85
    assert m["refit_layers"] == []                # nothing to preserve at init


def test_bad_config_and_data_are_refused_with_the_field_named(digits):
    with pytest.raises(ValueError, match="confidence"):
        PruneConfig(confidence=1.5)
    with pytest.raises(ValueError, match="target"):
        PruneConfig(method="l1")
    with pytest.raises(ValueError, match="repeats"):
        PruneConfig(repeats=1)
    model = build_model("mlp", (1, 28, 28), 10, widths=[8])
    with pytest.raises(DataError, match="shape"):
        mipp.prune(model, digits, PruneConfig())
    small = build_model("mlp", digits.input_shape, 3, widths=[8])
    with pytest.raises(DataError, match="classes"):
        mipp.prune(small, digits, PruneConfig())
    with pytest.raises(ConfigError, match="ignored_layers"):
        mipp.prune(build_model("mlp", digits.input_shape, 10, widths=[8]), digits,
                   PruneConfig(ignored_layers=("fc7",)))


def test_cli_train_prune_evaluate(tmp_path):
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "mipp.cli", *args], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("train", "--arch", "mlp", "--config", '{"widths": [32, 16]}', "--dataset", "digits",
        "--epochs", "20", "--lr", "3e-3", "--out", str(tmp_path / "dense"), "-q")
    report = run("prune", str(tmp_path / "dense"), "--dataset", "digits", "--tol", "0.1",
                 "--retrain-epochs", "3", "--out", str(tmp_path / "pruned"))
    assert "fc1" in report and "->" in report and "units removed" in report
    scores = json.loads(run("evaluate", str(tmp_path / "pruned"), "--dataset", "digits"))
    saved = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    assert scores["accuracy"] == pytest.approx(saved["accuracy"]["retrained"])
    assert scores["params"] == saved["params"]["after"]

    bad = subprocess.run([sys.executable, "-m", "mipp.cli", "prune", str(tmp_path / "dense"),
                          "--dataset", "digits", "--confidence", "2", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "confidence" in bad.stderr and "Traceback" not in bad.stderr


def test_mipp_on_a_residual_net_keeps_the_stream_consistent(digits):
    """ResNet-20 (residual adds couple channels): selection, surgery and refit run end to end."""
    from mipp.config import ReconstructorConfig
    model = build_model("resnet20", digits.input_shape, digits.num_classes, seed=0, width_mult=0.5)
    fast = ReconstructorConfig(epochs=20, finetune_epochs=5, ordering_epochs=5, patience=2)
    config = PruneConfig(tol=0.2, repeats=3, calibration_samples=512, reconstructor=fast,
                         retrain=TrainConfig(epochs=0))
    result = mipp.prune(model, digits, config)
    assert result.metrics["units"]["after"] < result.metrics["units"]["before"]
    assert result.model(digits.x_test[:4]).shape == (4, 10)
    widths = {l["name"]: l["units_after"] for l in result.layers}
    modules = dict(result.model.named_modules())
    assert modules["conv1"].out_channels == widths["conv1"]  # the stem names the first stream
    for name, width in widths.items():
        assert modules[name].out_channels == width >= 1


def test_onnx_export_matches_the_pruned_model(mlp_result, digits, tmp_path):
    onnx = pytest.importorskip("onnx")
    _, result, _ = mlp_result
    path = mipp.export_onnx(result.model, digits.input_shape, tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    dims = [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert dims[-1] == 10
