"""Administration and limits, through the client and the `mipp admin` commands against real
services and workers: revoked keys, the storage quota, the request rate, deleting jobs,
retention, garbage collection, deleted models keeping their jobs' history, list filters,
admin commands that refuse to create a database, the OpenAPI description, and the
migration's way up and down."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from mipp.client import ServiceError

pytestmark = pytest.mark.integration

# A job that ends within seconds: random selection, no refit, no retraining.
QUICK = {"method": "random", "target": 0.5, "refit": False, "retrain": {"epochs": 0},
         "device": os.environ.get("MIPP_TEST_DEVICE", "cpu")}


class Admin:
    """`mipp admin ...` as a shell runs it (app.cli.main), with exactly the given MIPP_*
    environment and working directory; the test's own environment is restored afterwards."""

    def __init__(self, monkeypatch, capsys):
        self.monkeypatch, self.capsys = monkeypatch, capsys

    def __call__(self, *args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
        from app.cli import main

        self.monkeypatch.setenv("MIPP_DATA_DIR", "unset")  # recorded, so restored after
        for name in [n for n in os.environ if n.startswith("MIPP_")]:
            self.monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("MIPP_"):
                self.monkeypatch.setenv(name, value)
        self.monkeypatch.chdir(cwd)
        self.capsys.readouterr()
        code = main(["admin", *args])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def run_admin(monkeypatch, capsys) -> Admin:
    return Admin(monkeypatch, capsys)


def admin(run_admin: Admin, service, *args: str) -> tuple[int, str, str]:
    """`mipp admin ...` with the server's environment, from its data directory."""
    return run_admin(*args, env=service.env, cwd=service.settings.data_dir)


def user_name(service, user: str) -> str:
    return service.api(user).me()["name"]


def job_keys(service, job: dict) -> list[str]:
    from app.storage import job_prefix

    prefix = job_prefix(job["owner_id"], job["id"]) + "/"
    return [k for k in service.store_keys() if k.startswith(prefix)]


# --------------------------------------------------------------------------------------------
# Keys and limits


def test_revoked_key_answers_401(service, run_admin):
    service.add_user("revoked")
    api = service.api("revoked")
    name, token = api.me()["name"], service.users["revoked"]
    code, out, err = admin(run_admin, service, "revoke-key", token[:12])  # the prefix `keys` prints
    assert code == 0, err
    assert "answers 401" in out
    with pytest.raises(ServiceError) as refused:
        api.me()
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    # GET /jobs/{id} checks the key in the same query as it loads the job: 401 there too,
    # before any 404 (well-formed or malformed id).
    for job_id in ("0" * 32, "not-an-id"):
        answer = service.client.get(f"/api/v1/jobs/{job_id}", headers=service.headers("revoked"))
        assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"
    code, out, _ = admin(run_admin, service, "keys", name)
    assert code == 0 and token[:12] in out and "revoked" in out


def test_storage_quota_answers_413_naming_limit_usage_and_fix(service, digits_files, run_admin):
    from app.limits import human_bytes

    service.add_user("quota")
    api = service.api("quota")
    name = api.me()["name"]
    weights = digits_files["weights"].stat().st_size
    limit = weights + 1000  # room for the model, not for the dataset
    code, out, err = admin(run_admin, service, "quota", name, "--storage-bytes", str(limit))
    assert code == 0, err
    assert f"{limit} bytes" in out

    model = service.upload_model("quota", digits_files["weights"])
    rows, keys = service.row_counts(), service.store_keys()
    with pytest.raises(ServiceError) as refused:
        api.upload_dataset(digits_files["npz"])
    error = refused.value
    assert error.status == 413 and error.code == "storage_quota_exceeded"
    assert f"limit of {human_bytes(limit)}" in error.detail
    assert f"({weights} bytes)" in error.detail  # what the user already keeps
    assert f"mipp admin quota {name} --storage-bytes" in error.detail
    assert "MIPP_STORAGE_QUOTA_BYTES" in error.detail
    assert service.row_counts() == rows and service.store_keys() == keys  # nothing stored
    me = api.me()
    assert me["storage_used_bytes"] == weights and me["storage_quota_bytes"] == limit

    # Deleting frees the space: the same weights fit again.
    api.request("DELETE", f"/models/{model['id']}")
    assert api.me()["storage_used_bytes"] == 0
    assert service.upload_model("quota", digits_files["weights"])["size_bytes"] == weights


def test_request_rate_answers_429_with_retry_after(service, run_admin):
    service.add_user("chatty")
    api = service.api("chatty")
    name = api.me()["name"]
    code, _, err = admin(run_admin, service, "quota", name, "--requests-per-minute", "3")
    assert code == 0, err
    for _ in range(3):  # the bucket holds one minute's worth
        api.me()
    response = service.client.get("/api/v1/users/me", headers=service.headers("chatty"))
    assert response.status_code == 429
    # The job view spends from the same bucket (its key check is its own query).
    job_view = service.client.get(f"/api/v1/jobs/{'0' * 32}", headers=service.headers("chatty"))
    assert job_view.status_code == 429 and job_view.json()["code"] == "rate_limited"
    body = response.json()
    assert body["code"] == "rate_limited" and "3 requests per minute" in body["detail"]
    assert f"mipp admin quota {name} --requests-per-minute" in body["detail"]
    assert 1 <= int(response.headers["Retry-After"]) <= 20  # one token comes back in 20 s
    with pytest.raises(ServiceError) as refused:
        api.me()
    assert refused.value.status == 429 and refused.value.retry_after >= 1

    # Per key: another key of the same user has its own bucket.
    code, out, err = admin(run_admin, service, "create-key", name)
    assert code == 0, err
    from mipp.client import Client

    fresh = Client("http://testserver", out.strip().splitlines()[-1], http=service.client)
    assert fresh.me()["requests_per_minute"] == 3


# --------------------------------------------------------------------------------------------
# Jobs: delete, retention, history of deleted inputs, filters


def park(service, user: str, model_id: str, dataset_id: str) -> dict:
    """A job on a queue no worker reads: it stays queued until cancelled."""
    service.settings.queues = ("gpu-idle",)
    try:
        return service.submit(user, model_id, dataset_id, QUICK, queue="gpu-idle")
    finally:
        service.settings.queues = ()


def test_filters_soft_delete_and_retention(service, digits_files, monkeypatch):
    from sqlalchemy import update

    from app.main import maintain_once
    from app.models import Job, utcnow
    from app.storage import job_prefix

    service.add_user("history")
    api = service.api("history")
    model_a = service.upload_model("history", digits_files["weights"], name="a")
    model_b = service.upload_model("history", digits_files["weights"], name="b")
    data = service.upload_dataset("history", digits_files["npz"])
    job_a = park(service, "history", model_a["id"], data["id"])
    job_b = park(service, "history", model_b["id"], data["id"])

    # A queued job cannot be deleted.
    with pytest.raises(ServiceError) as refused:
        api.delete_job(job_a["id"])
    assert refused.value.status == 409 and "cancel it first" in refused.value.detail

    # Filters by model and by dataset, alone and together.
    def ids(**filters) -> set[str]:
        return {j["id"] for j in api.list_jobs(**filters)["items"]}

    assert ids(model_id=model_a["id"]) == {job_a["id"]}
    assert ids(dataset_id=data["id"]) == {job_a["id"], job_b["id"]}
    assert ids(model_id=model_b["id"], dataset_id=data["id"]) == {job_b["id"]}
    assert ids(model_id=model_a["id"], dataset_id=uuid.uuid4().hex) == set()

    # A deleted model: its file goes, its job keeps a readable reference and stays findable.
    for job in (job_a, job_b):
        api.cancel(job["id"])
    assert any(model_a["id"] in k for k in service.store_keys())
    api.request("DELETE", f"/models/{model_a['id']}")
    assert not any(model_a["id"] in k for k in service.store_keys())
    assert api.job(job_a["id"])["model_id"] == model_a["id"]
    model = api.request("GET", f"/models/{model_a['id']}").json()
    assert model["name"] == "a" and model["deleted_at"] is not None
    assert model_a["id"] not in {m["id"] for m in api.list_models()["items"]}
    assert model_a["id"] in {m["id"] for m in api.list_models(include_deleted=True)["items"]}
    assert ids(model_id=model_a["id"]) == {job_a["id"]}
    with pytest.raises(ServiceError) as deleted:
        api.submit_job(model_a["id"], data["id"], QUICK)
    assert deleted.value.status == 404 and "was deleted" in deleted.value.detail
    with pytest.raises(ServiceError) as twice:
        api.request("DELETE", f"/models/{model_a['id']}")
    assert twice.value.status == 404

    # Retention: an ended job older than the setting goes in the next maintenance round,
    # with whatever its prefix holds (here a leftover attempt log); a younger one stays.
    leftover = f"{job_prefix(job_a['owner_id'], job_a['id'])}/attempt-1/log.txt"
    service.app.state.store.put_file(leftover, digits_files["weights"])
    with service.app.state.sessionmaker() as session:
        session.execute(update(Job).where(Job.id == job_a["id"])
                        .values(finished_at=utcnow() - timedelta(days=3)))
        session.commit()
    monkeypatch.setattr(service.settings, "job_retention_days", 2.0)
    report = maintain_once(service.app)
    assert report.deleted_jobs == [job_a["id"]]
    assert not service.app.state.store.exists(leftover)
    with pytest.raises(ServiceError) as expired:
        api.job(job_a["id"])
    assert expired.value.status == 404
    assert api.job(job_b["id"])["status"] == "cancelled"


def test_deleting_a_job_removes_its_artifacts(team_service, digits_files, monkeypatch, capsys):
    """A real job on the real worker (PostgreSQL, Redis, S3): its model deleted, its history
    stays; `mipp jobs delete` then removes its rows and every object it stored."""
    from sqlalchemy import func, select

    import mipp.cli
    from app.models import Job, JobLayer, JobLogLine

    service = team_service
    service.add_user("deleter")
    api = service.api("deleter")
    model = service.upload_model("deleter", digits_files["weights"])
    data = service.upload_dataset("deleter", digits_files["npz"])
    job = service.submit("deleter", model["id"], data["id"], QUICK)
    assert service.wait("deleter", job["id"])["status"] == "succeeded"
    assert {a["name"] for a in api.artifacts(job["id"])} >= {"model.tar.gz", "log.txt"}
    stored = job_keys(service, job)
    assert len(stored) >= 2

    api.request("DELETE", f"/models/{model['id']}")  # the finished job's history stays
    kept = api.job(job["id"])
    assert kept["model_id"] == model["id"] and kept["status"] == "succeeded"
    assert kept["metrics"]["params"]["after"] < kept["metrics"]["params"]["before"]
    assert kept["layer_units"]["fc1"]["after"] < 64

    monkeypatch.setenv("MIPP_URL", service.url)
    monkeypatch.setenv("MIPP_API_KEY", service.users["deleter"])
    assert mipp.cli.main(["jobs", "delete", job["id"]]) == 0
    assert f"job {job['id']} deleted" in capsys.readouterr().out
    assert job_keys(service, job) == []
    assert not any(service.app.state.store.exists(key) for key in stored)
    with service.app.state.sessionmaker() as session:
        assert session.get(Job, job["id"]) is None
        for table in (JobLogLine, JobLayer):
            assert session.scalar(select(func.count()).where(table.job_id == job["id"])) == 0
    assert mipp.cli.main(["jobs", "delete", job["id"]]) == 2  # gone: a one-line 404
    assert "404" in capsys.readouterr().err


def test_gc_removes_only_unreferenced_old_objects(service, digits_files, tmp_path, run_admin):
    from app.core.housekeeping import collect_garbage
    from app.storage import job_prefix, model_key

    service.add_user("gc")
    api = service.api("gc")
    me = api.me()
    model = service.upload_model("gc", digits_files["weights"])
    # An active job: what lives under its prefix may still get its rows.
    active = park(service, "gc", model["id"], service.upload_dataset("gc", digits_files["npz"])["id"])
    store = service.app.state.store
    blob = tmp_path / "orphan.bin"
    blob.write_bytes(b"no row points here")
    orphan = model_key(me["id"], uuid.uuid4().hex, "weights.safetensors")
    in_flight = f"{job_prefix(me['id'], active['id'])}/attempt-1/log.txt"
    for key in (orphan, in_flight):
        store.put_file(key, blob)

    # Young objects are kept (an upload may not have committed its row yet).
    with service.app.state.sessionmaker() as session:
        assert orphan not in collect_garbage(session, store, grace_s=3600)
    assert store.exists(orphan)

    if service.name == "embedded":  # `mipp admin gc`, on the server's data directory
        code, out, err = admin(run_admin, service, "gc", "--grace-s", "0")
        assert code == 0, err
        assert f"removed {orphan}" in out
    else:
        with service.app.state.sessionmaker() as session:
            assert orphan in collect_garbage(session, store, grace_s=0)
    assert not store.exists(orphan)
    assert store.exists(in_flight)  # under an active job
    assert any(model["id"] in k for k in service.store_keys())  # referenced by its row
    api.cancel(active["id"])


# --------------------------------------------------------------------------------------------
# Admin commands find the server's database or say where they looked


def test_admin_commands_refuse_a_missing_database(tmp_path, run_admin):
    from tests.service.conftest import PG_HOST, PG_PORT, require_service

    # A shell in another directory, no MIPP_* set: the default ./.mipp does not exist there.
    code, _, err = run_admin("create-user", "alice", env={}, cwd=tmp_path)
    assert code == 2
    assert f"no mipp database at {tmp_path / '.mipp' / 'mipp.db'}" in err
    assert "./.mipp" in err and "--data-dir" in err and "mipp admin migrate" in err
    assert list(tmp_path.iterdir()) == []  # nothing was created
    code, _, err = run_admin("users", "--data-dir", str(tmp_path / "srv"), env={}, cwd=tmp_path)
    assert code == 2 and f"looked there because --data-dir {tmp_path / 'srv'}" in err
    code, _, err = run_admin("quota", "bob", env={"MIPP_DATA_DIR": str(tmp_path / "env")},
                             cwd=tmp_path)
    assert code == 2 and f"MIPP_DATA_DIR={tmp_path / 'env'}" in err
    assert list(tmp_path.iterdir()) == []

    require_service("PostgreSQL", PG_HOST, PG_PORT)
    url = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"  # reachable, no mipp tables
    code, _, err = run_admin("users", env={"MIPP_DATABASE_URL": url}, cwd=tmp_path)
    assert code == 2 and "has no mipp tables" in err and "MIPP_DATABASE_URL" in err


# --------------------------------------------------------------------------------------------
# Malformed bodies: all 422, in the one error shape


def test_malformed_bodies_answer_422(embedded_service):
    service = embedded_service
    headers = service.add_user("malformed")
    post = service.client.post
    json_type = {**headers, "content-type": "application/json"}
    cases = {
        "multipart without boundary": post("/api/v1/models", content=b"abc", headers={
            **headers, "content-type": "multipart/form-data"}),
        "truncated JSON": post("/api/v1/jobs", content=b'{"model_id": "a"', headers=json_type),
        "NaN tol": post("/api/v1/jobs", headers=json_type,
                        content=b'{"model_id": "a", "dataset_id": "b", "config": {"tol": NaN}}'),
        "array body": post("/api/v1/jobs", content=b"[1, 2]", headers=json_type),
        "text body": post("/api/v1/datasets/builtin", content=b"mnist",
                          headers={**headers, "content-type": "text/plain"}),
    }
    for name, response in cases.items():
        body = response.json()
        assert response.status_code == 422, (name, body)
        assert set(body) <= {"detail", "code", "errors"} and body["detail"], (name, body)
        assert body["code"] in ("malformed_body", "validation_error"), (name, body)
    assert "Missing boundary" in cases["multipart without boundary"].json()["detail"]


# --------------------------------------------------------------------------------------------
# OpenAPI: every field and route described, every error listed with the error schema


def test_openapi_describes_every_field_and_error(tmp_path):
    from app.main import create_app
    from app.settings import Settings

    spec = create_app(Settings(data_dir=tmp_path, sweeper_interval_s=0)).openapi()
    undescribed = [f"{name}.{prop}" for name, schema in spec["components"]["schemas"].items()
                   for prop, value in (schema.get("properties") or {}).items()
                   if "description" not in value]
    assert undescribed == []
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # 422 is ErrorOut too
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    operations = [(method, path, op) for path, ops in spec["paths"].items()
                  for method, op in ops.items()]
    assert len(operations) >= 25
    for method, path, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("description"), where
        for parameter in op.get("parameters", []):
            assert parameter.get("description"), f"{where} parameter {parameter['name']}"
        if not path.startswith("/api/v1/"):
            continue
        statuses = set(op["responses"])
        expected = {"401", "429", "503"}
        if op.get("parameters") or op.get("requestBody"):
            expected.add("422")
        if "{" in path:
            expected.add("404")
        if method == "delete" or path.endswith("/cancel") and "jobs" in path:
            expected.add("409")
        if path in ("/api/v1/models", "/api/v1/datasets") and method == "post":
            expected.add("413")
        assert expected <= statuses, (where, sorted(expected - statuses))
        for status in statuses - {"200", "201", "204", "307"}:
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == error_ref, (where, status)
    download = spec["paths"]["/api/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]
    assert "application/json" in download["content"]  # report.json, as bytes
    assert all(v["schema"] == {"type": "string", "format": "binary"}
               for v in download["content"].values())
    assert "application/octet-stream" in download["content"]
    assert "examples" in spec["components"]["schemas"]["JobIn"]
    assert "examples" in spec["components"]["schemas"]["ErrorOut"]


# --------------------------------------------------------------------------------------------
# Migration 0003: up, down (no job loses its model) and up again, on both backends


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_up_down_up(backend, tmp_path):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect, text

    from app.db import alembic_config, migrate
    from app.models import Base

    if backend == "sqlite":
        url, cleanup = f"sqlite:///{tmp_path / 'm.db'}", None
    else:
        import psycopg

        from tests.service.conftest import PG_HOST, PG_PORT, require_service

        require_service("PostgreSQL", PG_HOST, PG_PORT)
        name = f"mipp_test_mig_{os.getpid()}"
        admin_conn = psycopg.connect(f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres",
                                     autocommit=True)
        admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"

        def cleanup():
            admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin_conn.close()
    try:
        migrate(url, "0002_prep_code")
        engine = create_engine(url)
        with engine.begin() as conn:  # a user, a model and a job that uses it
            conn.execute(text("INSERT INTO users (id, name, is_admin, created_at) VALUES "
                              "('u1', 'u', false, CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO models (id, owner_id, name, kind, arch, arch_config, format, "
                "store_key, size_bytes, sha256, summary, created_at) VALUES ('m1', 'u1', 'm', "
                "'zoo', 'mlp', '{}', 'safetensors', 'k', 1, 's', '{}', CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO jobs (id, owner_id, model_id, config, queue, time_limit_s, status, "
                "phase, progress, phase_progress, message, attempt, cancel_requested, "
                "created_at) VALUES ('j1', 'u1', 'm1', '{}', 'q', 1, 'succeeded', 'succeeded', "
                "1, 1, '', 1, false, CURRENT_TIMESTAMP)"))
        migrate(url)
        with engine.connect() as conn:
            # The tables match app.models exactly.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert {"deleted_at"} <= {c["name"] for c in inspect(conn).get_columns("models")}
        command.downgrade(alembic_config(url), "0002_prep_code")
        with engine.connect() as conn:
            assert "deleted_at" not in {c["name"] for c in inspect(conn).get_columns("models")}
            assert "storage_quota_bytes" not in {c["name"] for c in inspect(conn).get_columns("users")}
            # No table was rebuilt: the job still names its model.
            assert conn.execute(text("SELECT model_id FROM jobs WHERE id = 'j1'")).scalar() == "m1"
        migrate(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT model_id FROM jobs WHERE id = 'j1'")).scalar() == "m1"
        engine.dispose()
    finally:
        if cleanup is not None:
            cleanup()
