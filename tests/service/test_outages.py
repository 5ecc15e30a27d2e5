"""When a backing service is down the API answers 503 naming it, never 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_broker(tmp_path, digits_files):
    """The embedded setup with the broker pointed at a port where nothing listens."""
    from app.db import migrate, session_scope
    from app.main import create_app
    from app.security import create_user
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", sweeper_interval_s=0)
    migrate(settings.database_url)
    app = create_app(settings)
    with session_scope(app.state.sessionmaker) as session:
        _, key = create_user(session, "outage")
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def test_broker_down(broken_broker, digits_files):
    client = broken_broker
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["database"] == "ok" and ready.json()["broker"].startswith("unavailable")
    with open(digits_files["weights"], "rb") as fh:
        model = client.post("/api/v1/models", data={"arch": "mlp", "config": '{"widths": [64, 32, 16]}'},
                            files={"file": ("w.safetensors", fh)}).json()
    dataset = client.post("/api/v1/datasets/builtin", json={"name": "digits"}).json()
    r = client.post("/api/v1/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"]})
    # The job is kept, queued and unsent: the maintenance loop sends it once the broker answers.
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["enqueued_at"] is None
    assert "broker unreachable" in job["message"]


def test_database_down(tmp_path):
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path, sweeper_interval_s=0,
                        database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    with TestClient(create_app(settings)) as client:
        r = client.get("/api/v1/jobs", headers={"Authorization": "Bearer mipp_x"})
        assert r.status_code == 503 and r.json()["code"] == "database_unavailable"
        assert client.get("/readyz").json()["database"].startswith("unavailable")
        assert client.get("/healthz").status_code == 200
