"""Hostile input is refused cheaply with a 4xx in the one error shape, and nothing is stored:
bypass pickles, zip bombs, malformed safetensors, bad labels, and malformed requests (NUL
bytes, NaN, huge numbers, deep JSON, invalid UTF-8, oversized chunked bodies)."""

from __future__ import annotations

import json
import zipfile
from functools import cache

import numpy as np
import pytest

from .hostile_files import (
    BAD_NPZ,
    BAD_PICKLES,
    BAD_SAFETENSORS,
    npz_bomb,
    torch_zip,
    would_import,
)

pytestmark = pytest.mark.integration


@cache
def _bomb() -> bytes:
    return npz_bomb(128 * 2**20)  # 128 MiB of zeros in ~130 kB


def _assert_error_shape(r, status_range=(400, 500)):
    assert status_range[0] <= r.status_code < status_range[1], (r.status_code, r.text)
    body = r.json()
    assert set(body) <= {"detail", "code", "errors"} and {"detail", "code"} <= set(body), body
    assert isinstance(body["detail"], str) and isinstance(body["code"], str)
    return body


# ---------------------------------------------------------------------------------------------
# The pickle check, on its own (no service)


@pytest.mark.parametrize("name", sorted(BAD_PICKLES))
def test_bypass_pickles_are_real_and_refused(name):
    from app.errors import InvalidUpload
    from app.uploads import check_state_dict_pt

    data, target = BAD_PICKLES[name]
    assert would_import(data) == target  # Python's unpickler would import it
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evil.pt"
        path.write_bytes(torch_zip(data))
        with pytest.raises(InvalidUpload, match=target.replace(".", r"\.")):
            check_state_dict_pt(path, "evil.pt")


def test_real_state_dicts_pass_with_exact_globals(tmp_path):
    import torch

    from app.uploads import check_state_dict_pt

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    cases = {
        "state_dict": model.state_dict(),
        "bf16": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
        "parameters": dict(model.named_parameters()),
        "float8": {"w": torch.zeros(2, dtype=torch.float8_e4m3fn)},
    }
    for name, obj in cases.items():
        for protocol in (2, 4):
            path = tmp_path / f"{name}-{protocol}.pt"
            torch.save(obj, path, pickle_protocol=protocol)
            refs = check_state_dict_pt(path, path.name)["pickle_refs"]
            assert "collections.OrderedDict" in refs, (name, refs)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"archive/constants.pkl": b"\x80\x02}."}, "TorchScript"),
        ({"other/data.pkl": b"\x80\x02}."}, "one data.pkl"),
        ({"archive/code/__torch__.py": b"import os"}, "TorchScript"),
    ],
)
def test_torch_zip_layout_is_checked(tmp_path, files, expected):
    from app.errors import InvalidUpload
    from app.uploads import check_state_dict_pt

    path = tmp_path / "m.pt"
    path.write_bytes(torch_zip(b"\x80\x02}q\x00.", extra=files))
    with pytest.raises(InvalidUpload, match=expected):
        check_state_dict_pt(path, "m.pt")


def test_host_out_of_memory_is_named():
    from worker.runner import _failure_reason

    class _Job:
        time_limit_s = 60

    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 400000000000000 bytes.")
    assert _failure_reason(exc, _Job()).startswith("out of host memory")
    assert _failure_reason(MemoryError(), _Job()).startswith("out of host memory")


# ---------------------------------------------------------------------------------------------
# Hostile files through the API: 4xx, nothing stored


def _hostile_uploads():
    for name, (data, _target) in sorted(BAD_PICKLES.items()):
        yield f"pt-{name}", "models", {"format": "pt"}, torch_zip(data), "never does"
    for name, (data, expected) in sorted(BAD_SAFETENSORS.items()):
        yield f"st-{name}", "models", {"format": "safetensors"}, data, expected
    for name, (data, expected) in sorted(BAD_NPZ.items()):
        yield f"npz-{name}", "datasets", {}, data, expected
    yield "npz-bomb", "datasets", {}, None, "zip bomb"
    yield "npz-bomb-lying-size", "datasets", {}, npz_bomb(16 * 2**20, declared_bytes=4096), \
        "damaged"


HOSTILE = list(_hostile_uploads())


def test_hostile_uploads_are_refused_and_nothing_stored(service):
    headers = service.add_user("hostile")
    rows, keys = service.row_counts(), service.store_keys()
    failures = []
    for case, kind, form, content, expected in HOSTILE:
        content = _bomb() if content is None else content
        data = {"arch": "mlp", **form} if kind == "models" else form
        r = service.client.post(f"/api/v1/{kind}", headers=headers, data=data,
                                files={"file": (f"{case}.bin", content)})
        if not (400 <= r.status_code < 500 and expected in r.json().get("detail", "")):
            failures.append((case, r.status_code, r.text[:300]))
        else:
            _assert_error_shape(r)
    assert not failures, failures
    assert service.row_counts() == rows
    assert service.store_keys() == keys


# ---------------------------------------------------------------------------------------------
# Malformed requests: 4xx in one shape, never a 500


def test_malformed_requests_are_4xx_in_one_shape(service, digits_files):
    headers = service.add_user("malformed")
    client = service.client
    rows, keys = service.row_counts(), service.store_keys()
    weights = digits_files["weights"].read_bytes()
    good_npz = digits_files["npz"].read_bytes()
    json_headers = {**headers, "content-type": "application/json"}
    cases = {
        "nul in path id": client.get("/api/v1/jobs/abc%00def", headers=headers),
        "nul in model path": client.delete("/api/v1/models/%00", headers=headers),
        "nul in body id": client.post("/api/v1/jobs", headers=headers,
                                      json={"model_id": "a\x00", "dataset_id": "b"}),
        "nul in idempotency key": client.post(
            "/api/v1/jobs", headers=headers,
            json={"model_id": "0" * 32, "dataset_id": "0" * 32, "idempotency_key": "k\x00"}),
        "nul in name": client.post("/api/v1/datasets", headers=headers, data={"name": "a\x00"},
                                   files={"file": ("d.npz", good_npz)}),
        "nul in filename": client.post(  # raw: httpx would escape the NUL as %00
            "/api/v1/datasets", content=b"--x\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"d\x00.npz\"\r\n\r\n" + good_npz + b"\r\n--x--\r\n",
            headers={**headers, "content-type": "multipart/form-data; boundary=x"}),
        "nul in builtin name": client.post("/api/v1/datasets/builtin", headers=headers,
                                           json={"name": "digits", "display_name": "\x00"}),
        "filename of 300 chars": client.post("/api/v1/models", headers=headers,
                                             data={"arch": "mlp"},
                                             files={"file": ("w" * 300, weights)}),
        "num_classes 2**40": client.post("/api/v1/models", headers=headers,
                                         data={"arch": "mlp", "num_classes": str(2**40)},
                                         files={"file": ("w.safetensors", weights)}),
        "input_shape huge": client.post("/api/v1/models", headers=headers,
                                        data={"arch": "mlp", "input_shape": f"[{10**30}]"},
                                        files={"file": ("w.safetensors", weights)}),
        "config NaN": client.post("/api/v1/models", headers=headers,
                                  data={"arch": "mlp", "config": '{"widths": [NaN]}'},
                                  files={"file": ("w.safetensors", weights)}),
        "config deep": client.post("/api/v1/models", headers=headers,
                                   data={"arch": "mlp", "config": "[" * 5000 + "]" * 5000},
                                   files={"file": ("w.safetensors", weights)}),
        "tol NaN": client.post("/api/v1/jobs", headers=json_headers,
                               content=b'{"model_id": "a", "dataset_id": "b", "config": {"tol": NaN}}'),
        "tol Infinity": client.post("/api/v1/jobs", headers=json_headers,
                                    content=b'{"model_id": "a", "dataset_id": "b", '
                                            b'"config": {"std_floor": Infinity}}'),
        "tol 1e999": client.post("/api/v1/jobs", headers=json_headers,
                                 content=b'{"model_id": "a", "dataset_id": "b", '
                                         b'"config": {"tol": 1e999}}'),
        "seed 10**30": client.post("/api/v1/jobs", headers=headers,
                                   json={"model_id": "0" * 32, "dataset_id": "0" * 32,
                                         "config": {"seed": 10**30}}),
        "device meta": client.post("/api/v1/jobs", headers=headers,
                                   json={"model_id": "0" * 32, "dataset_id": "0" * 32,
                                         "config": {"device": "meta"}}),
        "time limit 10**30": client.post("/api/v1/jobs", headers=headers,
                                         json={"model_id": "0" * 32, "dataset_id": "0" * 32,
                                               "time_limit_s": 10**30}),
        "offset 2**63": client.get(f"/api/v1/jobs?offset={2**63}", headers=headers),
        "limit 2**63": client.get(f"/api/v1/models?limit={2**63}", headers=headers),
        "deep json": client.post("/api/v1/jobs", headers=json_headers,
                                 content=b"[" * 100_000 + b"]" * 100_000),
        "invalid utf-8": client.post("/api/v1/jobs", headers=json_headers,
                                     content=b'{"model_id": "\xff\xfe", "dataset_id": "x"}'),
        "huge int literal": client.post("/api/v1/jobs", headers=json_headers,
                                        content=b'{"time_limit_s": ' + b"9" * 5000 + b"}"),
        "not json": client.post("/api/v1/jobs", headers=json_headers, content=b"{nope"),
        "json array": client.post("/api/v1/jobs", headers=headers, json=[1, 2]),
        "broken multipart": client.post(
            "/api/v1/datasets", content=b"--x\r\nContent-Disposition: form-data; name=\"file\"",
            headers={**headers, "content-type": "multipart/form-data; boundary=x"}),
        "unknown route": client.get("/api/v1/nothing", headers=headers),
        "wrong method": client.put("/api/v1/jobs", headers=headers),
    }
    bad = {name: (r.status_code, r.text[:200]) for name, r in cases.items()
           if not 400 <= r.status_code < 500}
    assert not bad, bad
    for name, r in cases.items():
        body = _assert_error_shape(r)
        if r.status_code == 422 and body["code"] == "validation_error":
            assert body["errors"] and all({"loc", "msg", "type"} == set(e) for e in body["errors"])
    assert cases["nul in path id"].status_code == 404
    assert cases["tol NaN"].status_code == 422 and "NaN" in cases["tol NaN"].json()["detail"]
    assert "device" in cases["device meta"].json()["detail"]
    assert "seed" in cases["seed 10**30"].json()["detail"]
    assert "UTF-8" in cases["invalid utf-8"].json()["detail"]
    assert cases["unknown route"].json()["code"] == "not_found"
    assert service.row_counts() == rows
    assert service.store_keys() == keys


def test_chunked_body_over_the_limit_is_413(tmp_path):
    """A body without Content-Length is counted as it streams: 413, not a 400 from the
    form parser that the counting exception used to become."""
    from fastapi.testclient import TestClient

    from app.db import migrate, session_scope
    from app.main import create_app
    from app.security import create_user
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path, sweeper_interval_s=0, max_upload_bytes=1024)
    migrate(settings.database_url)
    app = create_app(settings)
    with session_scope(app.state.sessionmaker) as session:
        _user, key = create_user(session, "chunky")
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"d.npz\"\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(64):
            yield b"\0" * 65536  # 4 MiB in all, above 1 kB + the 1 MiB slack
        yield f"\r\n--{boundary}--\r\n".encode()

    with TestClient(app) as client:
        r = client.post("/api/v1/datasets", content=body(),
                        headers={"Authorization": f"Bearer {key}",
                                 "content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_large" and "limit" in r.json()["detail"]
    from sqlalchemy import func, select

    from app.models import Dataset

    with app.state.sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def test_validation_error_with_nan_input_serialises():
    """A NaN that reaches pydantic (here through a JSON-less path) must not break the 422."""
    from app.errors import validation_errors

    raw = [{"loc": ("body", "config", "tol"), "msg": "bad", "type": "finite_number",
            "input": float("nan"), "ctx": {"error": ValueError("x")}}]
    assert json.dumps(validation_errors(raw), allow_nan=False)


def test_npz_check_memory_is_bounded(tmp_path):
    """A 128 MiB bomb is refused from its headers; an honest 64 MiB array is streamed in
    chunks: the peak of numpy's traced allocations stays far below the array's size."""
    import tracemalloc

    from mipp.errors import DataError
    from mipp.npz import validate_npz

    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(_bomb())
    with pytest.raises(DataError, match="zip bomb"):
        validate_npz(bomb)
    honest = tmp_path / "honest.npz"
    rows = 64 * 2**20 // (4 * 256)
    with zipfile.ZipFile(honest, "w", zipfile.ZIP_STORED) as zf:
        for key, array in (("x", None), ("y", np.arange(rows) % 3)):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                if array is None:
                    np.lib.format.write_array_header_1_0(
                        fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, 256)})
                    block = np.random.default_rng(0).random((1024, 256), np.float32).tobytes()
                    for _ in range(rows // 1024):
                        fh.write(block)
                else:
                    np.lib.format.write_array(fh, array)
    tracemalloc.start()
    try:
        summary = validate_npz(honest)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.n_train == rows and summary.num_classes == 3
    assert peak < 24 * 2**20, peak  # chunks of 4 MiB, not the 64 MiB array
