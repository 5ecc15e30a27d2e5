"""What must never happen in the API process, and the atomicity the worker relies on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pythonpath() -> str:
    """PYTHONPATH for child processes: this checkout first, then what the caller had."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

pytestmark = pytest.mark.integration


def test_api_process_never_imports_torch(tmp_path, digits_files):
    """Import app.main, upload a model and a dataset, submit a job: torch stays unloaded."""
    script = textwrap.dedent(f"""
        import json, sys
        from fastapi.testclient import TestClient
        from app.main import create_app
        from app.settings import Settings
        from app.db import migrate, session_scope
        from app.security import create_user

        settings = Settings(data_dir={str(tmp_path)!r}, sweeper_interval_s=0)
        migrate(settings.database_url)
        app = create_app(settings)
        with session_scope(app.state.sessionmaker) as s:
            _, key = create_user(s, "probe")
        h = {{"Authorization": "Bearer " + key}}
        with TestClient(app) as c:
            m = c.post("/api/v1/models", headers=h, data={{"arch": "mlp",
                "config": json.dumps({{"widths": [64, 32, 16]}})}},
                files={{"file": ("w.safetensors", open({str(digits_files["weights"])!r}, "rb"))}})
            assert m.status_code == 201, m.text
            d = c.post("/api/v1/datasets", headers=h,
                files={{"file": ("d.npz", open({str(digits_files["npz"])!r}, "rb"))}})
            assert d.status_code == 201, d.text
            j = c.post("/api/v1/jobs", headers=h, json={{"model_id": m.json()["id"],
                "dataset_id": d.json()["id"]}})
            assert j.status_code == 201, j.text
            assert c.get("/api/v1/jobs/" + j.json()["id"] + "/layers", headers=h).status_code == 200
            assert c.get("/readyz").status_code == 200
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH_MODULES", loaded)
        sys.exit(1 if loaded else 0)
    """)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "the API process imported torch (mipp/__init__.py must import torch lazily):\n"
        + proc.stdout[-2000:] + proc.stderr[-3000:]
    )


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_claim_is_atomic(request, backend, tmp_path):
    """Eight concurrent deliveries of one job: exactly one claims it."""
    from app.db import make_engine, make_sessionmaker, migrate
    from app.core.jobs import claim
    from app.models import Job, User

    url = (request.getfixturevalue("pg_url") if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'claim.db'}")
    migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        user = User(name=f"claimer-{backend}-{os.getpid()}-{tmp_path.name}")
        s.add(user)
        s.flush()
        job = Job(owner_id=user.id, config={}, queue="q", time_limit_s=60)
        s.add(job)
        s.commit()
        job_id = job.id
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def deliver(n: int) -> None:
        with sessions() as s:
            barrier.wait()
            if claim(s, job_id, f"worker-{n}") is not None:
                wins.append(f"worker-{n}")

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as s:
        row = s.get(Job, job_id)
        assert len(wins) == 1 and row.attempt == 1 and row.status == "running"
        assert row.worker == wins[0]
    engine.dispose()
