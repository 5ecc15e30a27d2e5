"""What a team gets back is deployable, and what can only fail later is refused at the door.

- A model the user trained on raw data keeps its accuracy when the engine evaluates it; the
  pruned model downloaded from the service, fed raw inputs through `mipp.load_predictor`, and
  its ONNX through onnxruntime, reach the accuracy the job reported.
- The team's own architecture (Python source + factory) goes upload -> job -> download -> ONNX
  on the embedded default, where `mipp serve --allow-code-uploads` turned code uploads on; the
  team setup keeps the default (off) and refuses them with a 403 naming the setting.
- Door checks: a .pt sent as safetensors, a zoo config that does not validate, a built-in
  dataset whose files the server lacks, bad preprocessing: 4xx naming the field, nothing stored.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARCHS = Path(__file__).resolve().parents[1] / "custom_archs"
QUICK_L1 = {"method": "l1", "target": 0.4, "retrain": {"epochs": 2, "batch_size": 64},
            "device": "cpu"}


def _download(service, user: str, job_id: str, name: str) -> bytes:
    r = service.client.get(f"/api/v1/jobs/{job_id}/artifacts/{name}",
                           headers=service.headers(user), follow_redirects=False)
    if r.status_code == 307:  # S3: a presigned URL on the store itself
        r = httpx.get(r.headers["location"], timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def _unpack(archive: bytes, dest: Path) -> Path:
    path = dest / "model.tar.gz"
    path.write_bytes(archive)
    return path


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory):
    """sklearn digits as raw 8x8 images (integers 0..16), with class names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images[:, None].astype(np.float32), digits.target.astype(np.int64)
    path = tmp_path_factory.mktemp("raw") / "digit-images.npz"
    np.savez(path, x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:],
             class_names=np.array([f"digit {i}" for i in range(10)]))
    return path


def _onnx_accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_bytes)
    logits = session.run(None, {"input": x.astype(np.float32)})[0]
    return float((logits.argmax(1) == y).mean()), session.get_modelmeta().custom_metadata_map


def test_user_model_on_raw_data_round_trip(team_service, raw_images, tmp_path):
    """The user trains on x / 16 and says so (`scale`); the job's dense accuracy is the
    user's own, and the download takes raw inputs."""
    import torch

    import mipp
    from mipp.zoo import build_model, save_weights

    raw = np.load(raw_images)
    torch.set_num_threads(1)
    model = build_model("lenet5", (1, 8, 8), 10, seed=0, channels=[4, 8], widths=[32, 16])
    x, y = torch.from_numpy(raw["x"]) / 16, torch.from_numpy(raw["y"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):  # the user's own training loop, on their own scaling
        for i in range(0, len(x), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            optimizer.step()
    with torch.no_grad():
        own = float((model(torch.from_numpy(raw["x_test"]) / 16).argmax(1).numpy()
                     == raw["y_test"]).mean())
    weights = save_weights(model, tmp_path / "lenet.safetensors")

    service = team_service
    headers = service.add_user("deployer")
    m = service.upload_model("deployer", weights, arch="lenet5", input_shape="[1, 8, 8]",
                             config=json.dumps({"channels": [4, 8], "widths": [32, 16]}))
    with open(raw_images, "rb") as fh:
        r = service.client.post("/api/v1/datasets", headers=headers,
                                data={"preprocessing": '{"scale": 16}'},
                                files={"file": ("digit-images.npz", fh)})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["preprocessing"] == {"kind": "given", "scale": 16.0, "mean": [0.0],
                                        "std": [1.0]}
    job = service.submit("deployer", m["id"], dataset["id"], QUICK_L1)
    done = service.wait("deployer", job["id"])
    assert done["status"] == "succeeded", done["error"]
    accuracy = done["metrics"]["accuracy"]
    assert accuracy["dense"] == pytest.approx(own, abs=1e-6)

    predictor = mipp.load_predictor(_unpack(_download(service, "deployer", job["id"],
                                                      "model.tar.gz"), tmp_path))
    served = float((predictor.predict(raw["x_test"]) == raw["y_test"]).mean())
    assert abs(served - accuracy["retrained"]) <= 0.005
    assert predictor.class_names[0] == "digit 0"
    onnx_accuracy, meta = _onnx_accuracy(_download(service, "deployer", job["id"], "model.onnx"),
                                         raw["x_test"], raw["y_test"])
    assert abs(onnx_accuracy - accuracy["retrained"]) <= 0.005
    assert meta["mipp.input"] == "raw" and json.loads(meta["mipp.preprocessing"])["scale"] == 16


def test_custom_architecture_upload_job_download_onnx(embedded_service, raw_images, tmp_path):
    import torch

    import mipp
    from mipp.custom import CodeSpec, build_code_model
    from mipp.zoo import save_weights

    torch.set_num_threads(1)
    data = mipp.load_npz(raw_images, preprocessing="standardize")
    model = build_code_model(CodeSpec(factory="rescat_cnn:build", kwargs={"width": 8},
                                      input_shape=(1, 8, 8), num_classes=10), ARCHS)
    mipp.train(model, data, mipp.TrainConfig(epochs=8, lr=1e-2, batch_size=64), device="cpu")
    weights = save_weights(model, tmp_path / "rescat.safetensors")

    service = embedded_service
    headers = service.add_user("coder")
    with open(weights, "rb") as w, open(ARCHS / "rescat_cnn.py", "rb") as code:
        r = service.client.post(
            "/api/v1/models", headers=headers,
            data={"factory": "rescat_cnn:build", "kwargs": '{"width": 8}',
                  "input_shape": "[1, 8, 8]", "num_classes": "10"},
            files={"file": ("rescat.safetensors", w), "code": ("rescat_cnn.py", code)})
    assert r.status_code == 201, r.text
    uploaded = r.json()
    assert uploaded["kind"] == "code" and uploaded["factory"] == "rescat_cnn:build"
    with open(raw_images, "rb") as fh:
        r = service.client.post("/api/v1/datasets", headers=headers,
                                data={"preprocessing": "standardize"},
                                files={"file": ("digit-images.npz", fh)})
    assert r.status_code == 201, r.text
    job = service.submit("coder", uploaded["id"], r.json()["id"], QUICK_L1)
    done = service.wait("coder", job["id"])
    assert done["status"] == "succeeded", done["error"]
    metrics = done["metrics"]
    assert metrics["params"]["after"] < metrics["params"]["before"]
    assert metrics["unprunable_layers"] == []  # its grouped conv is pruned too

    archive = _unpack(_download(service, "coder", job["id"], "model.tar.gz"), tmp_path)
    with pytest.raises(mipp.ModelError, match="trust_code=True"):
        mipp.load_predictor(archive)
    predictor = mipp.load_predictor(archive, trust_code=True)
    raw = np.load(raw_images)
    served = float((predictor.predict(raw["x_test"]) == raw["y_test"]).mean())
    assert abs(served - metrics["accuracy"]["retrained"]) <= 0.005
    onnx_bytes = _download(service, "coder", job["id"], "model.onnx")
    onnx_accuracy, _ = _onnx_accuracy(onnx_bytes, raw["x_test"], raw["y_test"])
    assert abs(onnx_accuracy - metrics["accuracy"]["retrained"]) <= 0.005
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    onnx_params = sum(numpy_helper.to_array(t).size for t in graph.initializer)
    dense_params = sum(p.numel() for p in model.parameters())
    assert onnx_params < dense_params


def test_code_upload_refused_while_the_setting_is_off(team_service, digits_files):
    service = team_service
    assert not service.settings.allow_code_uploads  # the team default
    headers = service.add_user("no-code")
    rows, keys = service.row_counts(), service.store_keys()
    with open(digits_files["weights"], "rb") as w, open(ARCHS / "rescat_cnn.py", "rb") as code:
        r = service.client.post(
            "/api/v1/models", headers=headers, data={"factory": "rescat_cnn:build"},
            files={"file": ("w.safetensors", w), "code": ("rescat_cnn.py", code)})
    assert r.status_code == 403, r.text
    assert "MIPP_ALLOW_CODE_UPLOADS" in r.json()["detail"]
    assert service.row_counts() == rows and service.store_keys() == keys


def _pt_bytes(weights: Path) -> bytes:
    import safetensors.torch
    import torch

    buf = io.BytesIO()
    torch.save(safetensors.torch.load_file(weights), buf)
    return buf.getvalue()


def test_refused_at_the_door(service, digits_files):
    headers = service.add_user("door")
    good = digits_files["weights"].read_bytes()
    pt = _pt_bytes(digits_files["weights"])
    mlp = {"arch": "mlp", "config": '{"widths": [64, 32, 16]}', "input_shape": "[64]",
           "num_classes": "10"}
    cases = [
        ("models", {**mlp, "format": "safetensors"}, "w.pt", pt, 422, "send format=pt"),
        ("models", {**mlp, "config": '{"width": [64]}'}, "w.safetensors", good, 422,
         "Valid config fields: widths"),
        ("models", {**mlp, "config": '{"widths": [64, 64]}'}, "w.safetensors", good, 422,
         "fc2.weight: file [32, 64] vs architecture [64, 64]"),
        ("models", {**mlp, "input_shape": "[1, 28, 28]"}, "w.safetensors", good, 422,
         "fc1.weight: file [64, 64] vs architecture [64, 784]"),
        ("datasets", {"preprocessing": "normalise"}, "d.npz",
         digits_files["npz"].read_bytes(), 422, "'preprocessing' must be 'none', 'standardize'"),
        ("datasets", {"preprocessing": '{"mean": [1, 2]}'}, "d.npz",
         digits_files["npz"].read_bytes(), 422, "preprocessing.mean has 2 values"),
    ]
    for kind, form, filename, content, status, expected in cases:
        rows, keys = service.row_counts(), service.store_keys()
        r = service.client.post(f"/api/v1/{kind}", headers=headers, data=form,
                                files={"file": (filename, content)})
        assert r.status_code == status and expected in r.json()["detail"], (form, r.text)
        assert service.row_counts() == rows and service.store_keys() == keys
    # Without `format`, a .pt is recognised from its first bytes.
    r = service.client.post("/api/v1/models", headers=headers, data=mlp,
                            files={"file": ("weights.bin", pt)})
    assert r.status_code == 201 and r.json()["format"] == "pt", r.text
    # A built-in whose files this server lacks: the files and the folder are named.
    rows = service.row_counts()
    r = service.client.post("/api/v1/datasets/builtin", headers=headers, json={"name": "cifar10"})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "cifar-10-batches-py/test_batch" in detail, r.text
    assert str(service.settings.datasets_dir / "cifar10") in detail
    assert service.row_counts() == rows


def _zip_package(folder: Path, dest: Path, prefix: str = "") -> Path:
    """`folder` as a package at the root of a .zip; `prefix` is put before its __init__.py."""
    import zipfile

    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.glob("*.py")):
            text = path.read_text()
            zf.writestr(f"{folder.name}/{path.name}",
                        prefix + text if path.name == "__init__.py" else text)
    return dest


def test_zipped_package_runs_only_in_the_job_process(embedded_service, digits_files, tmp_path):
    """The MLP with a skip connection as a .zip package through the REST API: its import-time
    code never runs in the API process (the upload only parses it), it runs in the worker's
    job process, and the job prunes it."""
    import os
    import sys

    import torch

    import mipp
    from mipp.custom import CodeSpec, build_code_model
    from mipp.zoo import save_weights

    torch.set_num_threads(1)
    data = mipp.load_npz(digits_files["npz"])
    spec = CodeSpec(factory="skipmlp:build", kwargs={"in_features": 64, "hidden": 32},
                    input_shape=(64,), num_classes=10)
    model = build_code_model(spec, ARCHS)  # the clean package, imported here on purpose
    mipp.train(model, data, mipp.TrainConfig(epochs=5, lr=1e-2, batch_size=64), device="cpu")
    weights = save_weights(model, tmp_path / "skipmlp.safetensors")
    marker = tmp_path / "imported-by.txt"
    archive = _zip_package(ARCHS / "skipmlp", tmp_path / "skipmlp.zip", prefix=(
        f"import os\nopen({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\n"))

    service = embedded_service
    headers = service.add_user("zipper")
    with open(weights, "rb") as w, open(archive, "rb") as code:
        r = service.client.post(
            "/api/v1/models", headers=headers,
            data={"factory": "skipmlp:build", "kwargs": '{"in_features": 64, "hidden": 32}',
                  "input_shape": "[64]", "num_classes": "10"},
            files={"file": ("skipmlp.safetensors", w), "code": ("skipmlp.zip", code)})
    assert r.status_code == 201, r.text
    assert r.json()["summary"]["code"]["files"] == ["skipmlp/__init__.py", "skipmlp/model.py"]
    assert not marker.exists() and "skipmlp" not in sys.modules  # parsed, never imported
    dataset = service.upload_dataset("zipper", digits_files["npz"])
    job = service.submit("zipper", r.json()["id"], dataset["id"], QUICK_L1)
    done = service.wait("zipper", job["id"])
    assert done["status"] == "succeeded", done["error"]
    importers = {int(pid) for pid in marker.read_text().split()}
    assert importers and os.getpid() not in importers and service.worker.pid not in importers
    metrics = done["metrics"]
    assert metrics["units"]["after"] < metrics["units"]["before"]
    assert metrics["params"]["after"] < metrics["params"]["before"]
    assert metrics["accuracy"]["dense"] == pytest.approx(
        mipp.evaluate(model, data.x_test, data.y_test, device="cpu")["accuracy"], abs=1e-6)


def test_serve_flag_turns_code_uploads_on(tmp_path, digits_files):
    """`mipp serve` refuses code uploads by default and accepts them with
    --allow-code-uploads (the embedded default's switch for MIPP_ALLOW_CODE_UPLOADS)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "MIPP_ALLOW_CODE_UPLOADS"}
    env.update(MIPP_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=os.pathsep.join(
        filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    mipp_cli = [sys.executable, "-c", "import sys; from mipp.cli import main; sys.exit(main())"]
    migrated = subprocess.run([*mipp_cli, "admin", "migrate"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    created = subprocess.run([*mipp_cli, "admin", "create-user", "admin-of-serve"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.split()[-1]}"}
    statuses = {}
    for flag in ([], ["--allow-code-uploads"]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve = subprocess.Popen([*mipp_cli, "serve", "--no-worker", "--port", str(port), *flag],
                                 env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert serve.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
            with open(digits_files["weights"], "rb") as w, \
                    open(ARCHS / "rescat_cnn.py", "rb") as code:
                r = httpx.post(f"http://127.0.0.1:{port}/api/v1/models", headers=headers,
                               data={"factory": "rescat_cnn:build"},
                               files={"file": ("w.safetensors", w),
                                      "code": ("rescat_cnn.py", code)}, timeout=30)
            statuses[bool(flag)] = (r.status_code, r.json())
        finally:
            serve.terminate()
            serve.wait(30)
    assert statuses[False][0] == 403 and "MIPP_ALLOW_CODE_UPLOADS" in statuses[False][1]["detail"]
    assert statuses[True][0] == 201 and statuses[True][1]["kind"] == "code", statuses[True]


def test_team_worker_has_no_network_and_code_uploads_stay_off():
    """The team setup (docker-compose.yml): the worker, where uploaded code runs, is on internal
    networks only, and nothing in the compose file turns code uploads on."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml")
                             .read_text())
    networks = compose["services"]["worker"]["networks"]
    assert networks and all(compose["networks"][n].get("internal") is True for n in networks)
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        value = str(env.get("MIPP_ALLOW_CODE_UPLOADS", "false")).lower()
        assert value in ("false", "0", ""), (name, value)


def test_model_and_dataset_that_do_not_fit_are_refused_at_submit(service, digits_files,
                                                                  tmp_path):
    """A (1, 8, 8) model with a (3, 32, 32) dataset, and a 10-class model with a 12-class
    dataset: 422 at submit naming the model's field and the fix, and no job is made."""
    from mipp.zoo import build_model, save_weights

    headers = service.add_user("misfit")
    lenet = save_weights(build_model("lenet5", (1, 8, 8), 10, seed=0), tmp_path / "l.safetensors")
    small = service.upload_model("misfit", lenet, arch="lenet5", config={},
                                 input_shape=[1, 8, 8])
    mlp = service.upload_model("misfit", digits_files["weights"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.random((64, 3, 32, 32), dtype=np.float32),
             y=np.arange(64) % 10)
    np.savez(tmp_path / "twelve.npz", x=rng.random((96, 64), dtype=np.float32),
             y=np.arange(96) % 12)
    rgb = service.upload_dataset("misfit", tmp_path / "rgb.npz")
    twelve = service.upload_dataset("misfit", tmp_path / "twelve.npz")
    jobs = service.row_counts()["Job"]
    cases = [(small, rgb, "takes input_shape [1, 8, 8] but the dataset has samples of shape "
                          "[3, 32, 32]"),
             (mlp, twelve, "has 10 outputs but the dataset has 12 classes"),
             (mlp, twelve, "use a model built with num_classes=12")]
    for model, dataset, expected in cases:
        r = service.client.post("/api/v1/jobs", headers=headers,
                                json={"model_id": model["id"], "dataset_id": dataset["id"],
                                      "config": QUICK_L1})
        assert r.status_code == 422 and expected in r.json()["detail"], r.text
    assert service.row_counts()["Job"] == jobs
