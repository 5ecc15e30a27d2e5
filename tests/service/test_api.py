"""API behaviour that needs no worker: auth, ownership, uploads, validation, paging."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_health_and_ready(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "database": "ok", "broker": "ok", "store": "ok"}
    assert service.client.get("/openapi.json").status_code == 200


def test_api_key_required(service):
    assert service.client.get("/api/v1/jobs").status_code == 401
    bad = service.client.get("/api/v1/jobs", headers={"Authorization": "Bearer mipp_nope"})
    assert bad.status_code == 401 and "invalid" in bad.json()["detail"]
    headers = service.add_user("me")
    me = service.client.get("/api/v1/users/me", headers=headers).json()
    assert me["name"].startswith("me-") and me["is_admin"] is False


def test_user_b_cannot_see_user_a(service, digits_files):
    service.add_user("a")
    service.add_user("b")
    admin = service.add_user("root", admin=True)
    model = service.upload_model("a", digits_files["weights"])
    dataset = service.upload_dataset("a", digits_files["npz"])
    # A job that no worker picks up: submit to a queue the test worker does not consume.
    service.settings.queues = ("gpu-idle",)
    try:
        job = service.submit("a", model["id"], dataset["id"], {"method": "random", "target": 0.5},
                             queue="gpu-idle")
    finally:
        service.settings.queues = ()
    b = service.headers("b")
    for path in (f"/api/v1/jobs/{job['id']}", f"/api/v1/models/{model['id']}",
                 f"/api/v1/datasets/{dataset['id']}", f"/api/v1/jobs/{job['id']}/artifacts",
                 f"/api/v1/jobs/{job['id']}/layers",
                 f"/api/v1/jobs/{job['id']}/artifacts/model.tar.gz"):
        r = service.client.get(path, headers=b)
        assert r.status_code == 404, (path, r.text)
        assert "not found" in r.json()["detail"]
    assert service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=b).status_code == 404
    assert service.client.delete(f"/api/v1/models/{model['id']}", headers=b).status_code == 404
    assert service.client.delete(f"/api/v1/datasets/{dataset['id']}", headers=b).status_code == 404
    # B cannot use A's model in a job either.
    r = service.client.post("/api/v1/jobs", headers=b,
                            json={"model_id": model["id"], "dataset_id": dataset["id"]})
    assert r.status_code == 404
    # Lists show only one's own rows; an admin sees all.
    assert service.client.get("/api/v1/jobs", headers=b).json()["total"] == 0
    ids = {j["id"] for j in service.client.get("/api/v1/jobs?limit=200", headers=admin).json()["items"]}
    assert job["id"] in ids
    assert service.client.get(f"/api/v1/jobs/{job['id']}", headers=admin).status_code == 200
    # Clean up: a queued job is cancelled at once.
    cancelled = service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.headers("a"))
    assert cancelled.json()["status"] == "cancelled"


def _bad_npz_object() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}] * 30, dtype=object), y=np.zeros(30, dtype=np.int64))
    return buf.getvalue()


def _pickle_pt() -> bytes:
    # A torch.save-like zip whose pickle calls os.system: must be refused unopened.
    payload = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, form, filename, content, expected",
    [
        ("models", {"format": "onnx"}, "m.onnx", b"x" * 100, "format 'onnx' is not accepted"),
        ("models", {"format": "safetensors"}, "m.safetensors", b"hello world, not weights",
         "not a safetensors file"),
        ("models", {"format": "safetensors"}, "m.safetensors", None, "truncated or corrupt"),
        ("models", {"format": "pt"}, "m.pt", b"not a zip", "not a torch.save file"),
        ("models", {"format": "pt"}, "evil.pt", _pickle_pt(), "os.system"),
        ("models", {"format": "safetensors", "arch": "transformer"}, "m.safetensors", None,
         "unknown arch 'transformer'"),
        ("models", {"format": "safetensors", "config": "{widths"}, "m.safetensors", None,
         "'config' is not valid JSON"),
        ("datasets", {}, "d.npz", b"PK\x03\x04 garbage", "not a valid .npz"),
        ("datasets", {}, "d.npz", _bad_npz_object(), "object array"),
        ("datasets", {}, "empty.npz", b"", "empty"),
    ],
)
def test_bad_upload_is_4xx_and_stores_nothing(service, digits_files, kind, form, filename,
                                              content, expected):
    headers = service.add_user("uploader")
    if content is None:  # a real safetensors file, cut short (or used with a bad form field)
        good = digits_files["weights"].read_bytes()
        content = good[: len(good) // 2] if "arch" not in form and "config" not in form else good
    rows, keys = service.row_counts(), service.store_keys()
    data = {"arch": "mlp", **form} if kind == "models" else form
    r = service.client.post(f"/api/v1/{kind}", headers=headers, data=data,
                            files={"file": (filename, content)})
    assert 400 <= r.status_code < 500, r.text
    assert expected in r.json()["detail"], r.json()
    assert service.row_counts() == rows
    assert service.store_keys() == keys


def test_upload_records_size_and_sha256(service, digits_files):
    import hashlib

    service.add_user("hasher")
    model = service.upload_model("hasher", digits_files["weights"])
    raw = digits_files["weights"].read_bytes()
    assert model["size_bytes"] == len(raw)
    assert model["sha256"] == hashlib.sha256(raw).hexdigest()
    assert model["summary"]["tensors"]["fc1.weight"] == {"dtype": "F32", "shape": [64, 64]}
    dataset = service.upload_dataset("hasher", digits_files["npz"])
    assert dataset["summary"]["input_shape"] == [64] and dataset["summary"]["num_classes"] == 10
    headers = service.headers("hasher")
    # Delete: the stored file goes; the row stays readable (deleted_at) for its jobs' history.
    assert service.client.delete(f"/api/v1/models/{model['id']}", headers=headers).status_code == 204
    assert service.client.get(f"/api/v1/models/{model['id']}", headers=headers).json()["deleted_at"]
    assert not any(model["id"] in k for k in service.store_keys())


def test_submit_validation(service, digits_files):
    headers = service.add_user("validator")
    model = service.upload_model("validator", digits_files["weights"])
    undeclared = service.upload_model("validator", digits_files["weights"], input_shape=None,
                                      num_classes=None)
    dataset = service.upload_dataset("validator", digits_files["npz"])
    r = service.client.post("/api/v1/datasets/builtin", headers=headers, json={"name": "mnist"})
    assert r.status_code == 201, r.text
    mnist = r.json()
    assert mnist["summary"]["input_shape"] == [1, 28, 28]
    assert mnist["preprocessing"] == {"kind": "standardize"}

    def submit(**body):
        return service.client.post("/api/v1/jobs", headers=headers, json=body)

    # The engine's PruneConfig is the schema: unknown fields and bad values are 422s.
    r = submit(model_id=model["id"], dataset_id=dataset["id"], config={"confidance": 0.9})
    assert r.status_code == 422 and "confidance" in r.text
    r = submit(model_id=model["id"], dataset_id=dataset["id"], config={"method": "l1"})
    assert r.status_code == 422 and "target" in r.text
    r = submit(model_id=model["id"], dataset_id=dataset["id"], config={}, queue="gpu-h100")
    assert r.status_code == 422 and "queue 'gpu-h100' does not exist" in r.json()["detail"]
    r = submit(model_id=model["id"], dataset_id=dataset["id"], time_limit_s=10**9)
    assert r.status_code == 422 and "time_limit_s" in r.json()["detail"]
    # Model input shape [64] vs MNIST's (1, 28, 28): refused before it reaches a GPU.
    r = submit(model_id=model["id"], dataset_id=mnist["id"])
    assert r.status_code == 422 and "takes input_shape [64]" in r.json()["detail"], r.text
    # No declared shape: the weights (fc1 64x64) are checked against MNIST's 784 inputs.
    r = submit(model_id=undeclared["id"], dataset_id=mnist["id"])
    detail = r.json()["detail"]
    assert r.status_code == 422 and "fc1.weight: file [64, 64] vs architecture [64, 784]" in detail
    assert service.client.get("/api/v1/jobs", headers=headers).json()["total"] == 0
    r = submit(model_id="0" * 32, dataset_id=dataset["id"])
    assert r.status_code == 404
    r = service.client.get("/api/v1/jobs?status=exploded", headers=headers)
    assert r.status_code == 422 and "unknown status" in r.json()["detail"]


def test_builtin_dataset_and_paging(service):
    headers = service.add_user("pager")
    for _ in range(3):
        r = service.client.post("/api/v1/datasets/builtin", headers=headers, json={"name": "digits"})
        assert r.status_code == 201 and r.json()["kind"] == "builtin"
    r = service.client.post("/api/v1/datasets/builtin", headers=headers, json={"name": "imagenet"})
    assert r.status_code == 422
    page = service.client.get("/api/v1/datasets?limit=2&offset=1", headers=headers).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["offset"] == 1


def test_idempotent_submit(service, digits_files):
    headers = service.add_user("idem")
    model = service.upload_model("idem", digits_files["weights"])
    dataset = service.upload_dataset("idem", digits_files["npz"])
    service.settings.queues = ("gpu-idle",)
    try:
        body = {"model_id": model["id"], "dataset_id": dataset["id"], "queue": "gpu-idle",
                "idempotency_key": "run-1", "config": {"method": "random", "target": 0.3}}
        first = service.client.post("/api/v1/jobs", headers=headers, json=body)
        second = service.client.post("/api/v1/jobs", headers=headers, json=body)
    finally:
        service.settings.queues = ()
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    # A model in use by an active job cannot be deleted.
    r = service.client.delete(f"/api/v1/models/{model['id']}", headers=headers)
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    service.client.post(f"/api/v1/jobs/{first.json()['id']}/cancel", headers=headers)


def test_zoo_and_builtin_names_match_the_engine():
    from app.schemas import BUILTIN_DATASETS, ZOO_ARCHITECTURES
    from mipp.data import list_datasets
    from mipp.zoo import list_architectures

    assert tuple(list_architectures()) == ZOO_ARCHITECTURES
    assert tuple(list_datasets()) == BUILTIN_DATASETS


def test_body_size_limit(service):
    headers = service.add_user("big")
    limit = service.settings.max_upload_bytes
    service.settings.max_upload_bytes = 1024
    try:
        r = service.client.post("/api/v1/datasets", headers=headers,
                                files={"file": ("d.npz", b"\0" * 4096)})
    finally:
        service.settings.max_upload_bytes = limit
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert json.loads(r.text)["code"] == "too_large"


def test_state_dict_pt_upload_is_checked_without_unpickling(service, digits_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    service.add_user("pt")
    path = tmp_path / "mlp.pt"
    torch.save(load_file(str(digits_files["weights"])), path)
    model = service.upload_model("pt", path, format="pt")
    assert model["format"] == "pt"
    assert "torch._utils._rebuild_tensor_v2" in model["summary"]["pickle_refs"]
