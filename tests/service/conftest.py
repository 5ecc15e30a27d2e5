"""Fixtures for the service tests: real PostgreSQL, Redis, an S3 protocol server (moto in
server mode on 127.0.0.1), the embedded default (SQLite + local store + filesystem broker),
and real Celery worker processes. No mocks, no eager tasks.

Isolation: a PostgreSQL database mipp_test_<pid> (created and dropped here), a Redis db number
(MIPP_TEST_REDIS_DB, default 13) flushed before and after, and queue names unique to this run.
Under CI=true an unreachable service fails the run; elsewhere those tests are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pythonpath() -> str:
    """PYTHONPATH for child processes: this checkout first, then what the caller had."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
PG_HOST, PG_PORT = os.environ.get("MIPP_TEST_PG_HOST", "127.0.0.1"), 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("MIPP_TEST_REDIS_DB", "13"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN_ID = os.getpid()

def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: service tests must not be skipped)")
    pytest.skip(f"{message}; start it to run the service tests")


# --------------------------------------------------------------------------------------------
# Real services


@contextmanager
def scratch_pg_database(name: str):
    """A fresh PostgreSQL database `name` (dropped before and after); yields its URL."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    admin = psycopg.connect(f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres",
                            autocommit=True)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_url():
    with scratch_pg_database(f"mipp_test_{RUN_ID}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url():
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Inputs: digits as .npz and an MLP 64-32-16-10 trained on it, as safetensors


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import mipp
    from mipp.data import load_npz
    from mipp.zoo import build_model, save_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared 2-core box
    try:
        root = tmp_path_factory.mktemp("digits")
        digits = load_digits()
        x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(x))
        train, test = order[:1400], order[1400:]
        npz = root / "digits.npz"
        np.savez(npz, x=x[train], y=y[train], x_test=x[test], y_test=y[test])
        data = load_npz(npz)
        model = build_model("mlp", data.input_shape, data.num_classes, seed=0, widths=[64, 32, 16])
        mipp.train(model, data, mipp.TrainConfig(epochs=10, lr=1e-2, batch_size=64), device="cpu")
        weights = save_weights(model, root / "mlp.safetensors")
        accuracy = mipp.evaluate(model, data.x_test, data.y_test, device="cpu")["accuracy"]
    finally:
        torch.set_num_threads(threads)  # leave the process as we found it
    return {"npz": npz, "weights": weights, "dense_accuracy": accuracy, "dir": root}


# --------------------------------------------------------------------------------------------
# A service: settings, an in-process API client, and one real worker process


@dataclass
class Service:
    name: str
    env: dict[str, str]
    settings: object
    app: object
    client: object
    worker_log: Path
    worker: subprocess.Popen | None = None
    users: dict[str, str] = field(default_factory=dict)
    live: LiveServer | None = None

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.users[user]}"}

    def api(self, user: str):
        """The project's own client (mipp.client), sending through the in-process app."""
        from mipp.client import Client

        return Client("http://testserver", self.users[user], http=self.client)

    @property
    def url(self) -> str:
        """The same app served over real HTTP (uvicorn on 127.0.0.1, a free port), started
        on first use: for streaming and for clients in other processes."""
        if self.live is None:
            self.live = LiveServer(self.app)
        return self.live.url

    def add_user(self, name: str, admin: bool = False) -> dict[str, str]:
        from app.db import session_scope
        from app.security import create_user

        with session_scope(self.app.state.sessionmaker) as session:
            unique = f"{name}-{self.name}-{uuid.uuid4().hex[:8]}"
            _user, token = create_user(session, unique, is_admin=admin)
        self.users[name] = token
        return self.headers(name)

    def start_worker(self) -> None:
        from app.cli import worker_command

        log = open(self.worker_log, "ab")
        self.worker = subprocess.Popen(
            worker_command(self.settings), cwd=REPO, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b" ready." in self.worker_log.read_bytes():
                return
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.worker_log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in 60 s:\n{self.worker_log.read_text()[-3000:]}")

    def stop_worker(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    # -- API helpers --------------------------------------------------------------------

    def upload_model(self, user: str, weights: Path, **form) -> dict:
        fields = {"arch": "mlp", "format": "safetensors", "config": {"widths": [64, 32, 16]},
                  "input_shape": [64], "num_classes": 10, **form}
        return self.api(user).upload_model(weights, **fields)

    def upload_dataset(self, user: str, npz: Path) -> dict:
        return self.api(user).upload_dataset(npz)

    def submit(self, user: str, model_id: str, dataset_id: str, config: dict, **extra) -> dict:
        return self.api(user).submit_job(model_id, dataset_id, config, **extra)

    def job(self, user: str, job_id: str) -> dict:
        return self.api(user).job(job_id)

    def wait(self, user: str, job_id: str, until=("succeeded", "failed", "cancelled"),
             timeout: float = 180, seen: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(user, job_id)
            if seen is not None:
                seen.append((job["status"], job["phase"], job["progress"]))
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {job['status']}/{job['phase']} after {timeout} s; "
                    f"worker log:\n{self.worker_log.read_text()[-3000:]}")
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker died:\n{self.worker_log.read_text()[-3000:]}")
            time.sleep(0.2)

    def store_keys(self) -> list[str]:
        return self.app.state.store.list_keys("")

    def row_counts(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from app.models import Artifact, Dataset, Job, ModelFile

        with self.app.state.sessionmaker() as session:
            return {cls.__name__: session.scalar(select(func.count()).select_from(cls))
                    for cls in (ModelFile, Dataset, Job, Artifact)}


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # lifespan off: the app's engine and sweeper belong to the in-process TestClient.
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="mipp-test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start in 20 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _make_service(name: str, env: dict[str, str], tmp: Path, start_worker: bool = True):
    from fastapi.testclient import TestClient

    from app.db import migrate
    from app.main import create_app
    from app.settings import Settings

    full_env = {**os.environ, **env, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Settings() reads the same variables the worker gets
    try:
        settings = Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    migrate(settings.database_url)
    app = create_app(settings)
    client = TestClient(app)
    client.__enter__()
    service = Service(name=name, env=full_env, settings=settings, app=app, client=client,
                      worker_log=tmp / f"worker-{name}.log")
    if start_worker:
        service.start_worker()
    return service


def _common_env(tmp: Path, queue: str) -> dict[str, str]:
    return {
        "MIPP_DATA_DIR": str(tmp),
        "MIPP_DEFAULT_QUEUE": queue,
        "MIPP_HEARTBEAT_INTERVAL_S": "1",
        "MIPP_PROGRESS_INTERVAL_S": "0.2",
        "MIPP_SWEEPER_INTERVAL_S": "0",  # tests call the sweeper explicitly
        "MIPP_TORCH_THREADS": "1",
        "MIPP_JOB_TIME_LIMIT_S": "600",
        "MIPP_HARD_TIME_LIMIT_GRACE_S": "10",
    }


@pytest.fixture(scope="session")
def team_service(pg_url, redis_url, s3_endpoint, tmp_path_factory):
    """The team setup: PostgreSQL + Redis + S3 (moto), one worker process."""
    tmp = tmp_path_factory.mktemp("team")
    env = {
        **_common_env(tmp, f"gpu-test-{RUN_ID}"),
        "MIPP_DATABASE_URL": pg_url,
        "MIPP_BROKER_URL": redis_url,
        "MIPP_STORE": "s3",
        "MIPP_S3_ENDPOINT_URL": s3_endpoint,
        "MIPP_S3_BUCKET": f"mipp-test-{RUN_ID}",
        "MIPP_S3_ACCESS_KEY_ID": "testing",
        "MIPP_S3_SECRET_ACCESS_KEY": "testing",
    }
    service = _make_service("team", env, tmp)
    yield service
    service.stop_worker()
    if service.live is not None:
        service.live.stop()
    service.client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory):
    """The embedded default: SQLite + local directory + kombu filesystem broker, with code
    uploads on (as `mipp serve --allow-code-uploads`); the team setup keeps them off."""
    tmp = tmp_path_factory.mktemp("embedded")
    env = {**_common_env(tmp, f"gpu-emb-{RUN_ID}"), "MIPP_ALLOW_CODE_UPLOADS": "true"}
    service = _make_service("embedded", env, tmp)
    yield service
    service.stop_worker()
    if service.live is not None:
        service.live.stop()
    service.client.__exit__(None, None, None)


@pytest.fixture(params=["team", "embedded"])
def service(request) -> Service:
    return request.getfixturevalue(f"{request.param}_service")
