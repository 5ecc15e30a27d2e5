"""What a user deploys: a saved model takes raw inputs (its preprocessing travels in
model.json and is folded into the ONNX graph), from a directory or a model.tar.gz."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import mipp
from mipp.data import load_npz
from mipp.errors import ModelError
from mipp.zoo import build_model
from mipp.zoo_shapes import ARCH_SHAPES, expected_state_shapes, weights_mismatch

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def raw_digits(tmp_path_factory):
    """sklearn digits as stored (integers 0..16, not scaled), with class names."""
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    path = tmp_path_factory.mktemp("raw") / "digits.npz"
    np.savez(path, x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:],
             class_names=np.array([f"digit {i}" for i in range(10)]))
    return path, x[1400:], y[1400:]


@pytest.fixture(scope="module")
def standardized_result(raw_digits, one_thread):
    path, _, _ = raw_digits
    data = load_npz(path, preprocessing="standardize")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0, widths=[32, 16])
    mipp.train(model, data, mipp.TrainConfig(epochs=5, lr=1e-2), device="cpu")
    config = mipp.PruneConfig(method="l1", target=0.4, device="cpu",
                              retrain=mipp.TrainConfig(epochs=1))
    return data, mipp.prune(model, data, config)


def test_a_model_trained_on_raw_values_keeps_its_accuracy(raw_digits, one_thread):
    path, x_test, y_test = raw_digits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x, y = torch.from_numpy(np.load(path)["x"]), torch.from_numpy(np.load(path)["y"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):  # the user's own training, on the raw values
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        own = float((net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert own > 0.85
    data = load_npz(path)  # the default: fed as uploaded
    engine = mipp.evaluate(net, data.x_test, data.y_test, device="cpu")["accuracy"]
    assert engine == pytest.approx(own, abs=1e-6)
    standardized = load_npz(path, preprocessing="standardize")
    assert mipp.evaluate(net, standardized.x_test, standardized.y_test,
                         device="cpu")["accuracy"] < own - 0.1  # what used to happen


def test_saved_model_takes_raw_inputs(standardized_result, raw_digits, tmp_path):
    data, result = standardized_result
    _, x_test, y_test = raw_digits
    out = result.save(tmp_path / "model")
    info = json.loads((out / "model.json").read_text())
    assert info["preprocessing"]["kind"] == "standardize"
    assert info["preprocessing"]["mean"] == pytest.approx(data.mean.tolist())
    assert info["class_names"][3] == "digit 3"
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname="model")
    reported = result.metrics["accuracy"]["retrained"]
    for source in (out, archive):
        predictor = mipp.load_predictor(source)
        accuracy = float((predictor.predict(x_test) == y_test).mean())
        assert accuracy == pytest.approx(reported, abs=1e-6)
    assert predictor.class_names[predictor.predict(x_test[:1])[0]].startswith("digit")
    bare = mipp.load_model_dir(archive)  # the network itself takes prepared inputs
    with torch.no_grad():
        assert torch.allclose(bare(data.x_test), predictor(x_test), atol=1e-5)


def test_onnx_takes_raw_inputs_and_matches_pytorch(standardized_result, raw_digits, tmp_path):
    data, result = standardized_result
    _, x_test, y_test = raw_digits
    path = mipp.export_onnx(result.model, data.input_shape, tmp_path / "model.onnx",
                            data.preprocessing, data.class_names)
    session = ort.InferenceSession(str(path))
    logits = session.run(None, {"input": x_test})[0]
    with torch.no_grad():
        expected = result.model(data.x_test).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    accuracy = float((logits.argmax(1) == y_test).mean())
    assert accuracy == pytest.approx(result.metrics["accuracy"]["retrained"], abs=1e-6)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["mipp.input"] == "raw"
    assert json.loads(meta["mipp.preprocessing"])["kind"] == "standardize"
    assert json.loads(meta["mipp.class_names"])[0] == "digit 0"


def test_cli_evaluates_a_downloaded_archive(standardized_result, raw_digits, tmp_path):
    _, result = standardized_result
    path, _, _ = raw_digits
    out = result.save(tmp_path / "model")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname="model")
    run = subprocess.run([sys.executable, "-m", "mipp.cli", "evaluate", str(archive),
                          "--dataset", str(path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # No --preprocessing: the .npz is prepared as the model was trained (standardised).
    assert json.loads(run.stdout)["accuracy"] == pytest.approx(
        result.metrics["accuracy"]["retrained"], abs=1e-6)
    bad = subprocess.run([sys.executable, "-m", "mipp.cli", "evaluate", str(path),
                          "--dataset", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a model directory nor a model.tar.gz" in bad.stderr


def test_code_model_directory_needs_trust(tmp_path):
    source = tmp_path / "tiny.py"
    source.write_text("import torch\n\ndef build(n=3):\n    return torch.nn.Linear(4, n)\n")
    spec = mipp.CodeSpec(factory="tiny:build", kwargs={"n": 3}, input_shape=(4,),
                         num_classes=3)
    from mipp.custom import copy_code
    model = mipp.build_code_model(spec, copy_code(source, tmp_path / "out" / "code"))
    mipp.save_dense_dir(model, tmp_path / "out")
    with pytest.raises(ModelError, match="trust_code=True"):
        mipp.load_model_dir(tmp_path / "out")
    loaded = mipp.load_model_dir(tmp_path / "out", trust_code=True)
    assert torch.equal(loaded.weight, model.weight)
    assert "tiny" not in sys.modules  # the user's module does not linger


@pytest.mark.parametrize("arch, shape, classes, config", [
    ("mlp", (64,), 10, {"widths": [32, 16]}), ("mlp", (1, 8, 8), 3, {}),
    ("lenet5", (1, 8, 8), 10, {}), ("lenet5", (3, 32, 32), 100, {"channels": [4, 8]}),
    ("lenet5", (1, 1, 5), 3, {}), ("vgg11", (3, 32, 32), 10, {"width_mult": 0.25}),
    ("vgg16", (1, 8, 8), 10, {"width_mult": 0.1}), ("vgg19", (3, 16, 16), 10, {"width_mult": 0.1}),
    ("resnet18", (3, 32, 32), 10, {"width_mult": 0.25}), ("resnet20", (1, 8, 8), 10, {}),
    ("resnet56", (3, 8, 8), 10, {"width_mult": 0.5}),
])
def test_torch_free_shapes_match_the_zoo(arch, shape, classes, config):
    built = {k: tuple(v.shape) for k, v in
             build_model(arch, shape, classes, **config).state_dict().items()}
    expected = expected_state_shapes(arch, shape, classes, config)
    assert weights_mismatch(expected, built) is None and list(expected) == list(built)


def test_every_zoo_arch_has_a_shape_calculator():
    assert sorted(ARCH_SHAPES) == mipp.zoo.list_architectures()


def test_shape_calculator_imports_no_torch():
    code = "import sys, mipp.zoo_shapes, mipp.preprocessing, mipp.builtin_datasets, " \
           "mipp.custom; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def test_readme_lines_take_a_downloaded_model_to_predictions(standardized_result, raw_digits,
                                                             tmp_path, monkeypatch):
    """The README's snippet, run as written on a model.tar.gz and raw inputs."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## From a downloaded model to predictions", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in snippet.splitlines() if line.strip()]) == 3
    _, result = standardized_result
    _, x_test, y_test = raw_digits
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(result.save(tmp_path / "model"), arcname="model")
    monkeypatch.chdir(tmp_path)
    scope = {"x_raw": x_test}
    exec(compile(snippet, "README.md", "exec"), scope)
    accuracy = float((scope["labels"] == y_test).mean())
    assert accuracy == pytest.approx(result.metrics["accuracy"]["retrained"], abs=1e-6)
