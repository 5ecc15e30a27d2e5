"""Queue latency of the pruning service: time from submit to a worker starting the job.

    .venv/bin/python bench/bench_queue_latency.py [--jobs 20] [--brokers redis,embedded]

For each setup it starts a real Celery worker process (the same command `mipp serve` uses),
submits `--jobs` small jobs one after another through the HTTP API (in-process ASGI client),
and reads `started_at - created_at` from the job rows (created_at: the API wrote the row;
started_at: the worker claimed it). Two modes: "idle" submits each job `--gap` seconds after
the previous one ended (the worker is waiting); "back-to-back" submits the moment the previous
one ended, so it also pays for the fresh job process (worker_max_tasks_per_child=1) that
replaces the previous one. Then it runs the end-to-end digits MIPP job (the service test's
configuration) and reports its wall time from submit to succeeded.

Setups: "redis" = PostgreSQL + Redis + local store (the team setup, needs 127.0.0.1:5432 and
:6379; uses a scratch database and Redis db 12); "embedded" = SQLite + kombu filesystem broker
+ local store (`mipp serve`). Prints a Markdown table; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(REPO))

SMALL_JOB = {"method": "random", "target": 0.5, "retrain": {"epochs": 1}, "device": "cpu"}
DIGITS_JOB = {  # as tests/service/test_jobs.py::test_end_to_end_digits
    "calibration_samples": 512,
    "repeats": 2,
    "reconstructor": {"epochs": 5, "finetune_epochs": 2, "ordering_epochs": 2},
    "retrain": {"epochs": 2, "batch_size": 128},
    "device": "cpu",
}


def make_inputs(root: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import mipp
    from mipp.data import load_npz
    from mipp.zoo import build_model, save_weights

    torch.set_num_threads(1)
    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    npz = root / "digits.npz"
    np.savez(npz, x=x[order[:1400]], y=y[order[:1400]], x_test=x[order[1400:]],
             y_test=y[order[1400:]])
    data = load_npz(npz)
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0, widths=[64, 32, 16])
    mipp.train(model, data, mipp.TrainConfig(epochs=10, lr=1e-2, batch_size=64), device="cpu")
    return save_weights(model, root / "mlp.safetensors"), npz


@contextmanager
def scratch_postgres():
    import psycopg

    name = f"mipp_bench_{os.getpid()}"
    admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def service(env: dict[str, str], tmp: Path):
    """An in-process API client and one real worker process for `env`."""
    from fastapi.testclient import TestClient

    from app.cli import worker_command
    from app.db import migrate, session_scope
    from app.main import create_app
    from app.security import create_user
    from app.settings import Settings

    os.environ.update(env)
    settings = Settings()
    migrate(settings.database_url)
    app = create_app(settings)
    with session_scope(app.state.sessionmaker) as session:
        _, key = create_user(session, f"bench-{time.time_ns()}")
    log = tmp / "worker.log"
    worker = subprocess.Popen(
        worker_command(settings), cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.1)
        with TestClient(app) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            yield client
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        for k in env:
            os.environ.pop(k, None)


def run_job(client, model_id: str, dataset_id: str, config: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = client.post("/api/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id,
                                          "config": config})
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            wall = time.perf_counter() - t0
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return job, wall
        time.sleep(0.05)


def seconds(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = q * (len(ordered) - 1)
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def bench(name: str, env: dict[str, str], weights: Path, npz: Path, jobs: int, gap: float,
          tmp: Path) -> dict:
    with service(env, tmp) as client:
        with open(weights, "rb") as fh:
            model = client.post("/api/v1/models", data={
                "arch": "mlp", "config": json.dumps({"widths": [64, 32, 16]}),
                "input_shape": "[64]", "num_classes": "10"},
                files={"file": ("mlp.safetensors", fh)}).json()
        with open(npz, "rb") as fh:
            dataset = client.post("/api/v1/datasets", files={"file": ("digits.npz", fh)}).json()
        run_job(client, model["id"], dataset["id"], SMALL_JOB)  # warm-up (not counted)
        modes = {}
        for mode, pause in (("idle", gap), ("back-to-back", 0.0)):
            latencies, publish = [], []
            for i in range(jobs):
                time.sleep(pause)
                job, _ = run_job(client, model["id"], dataset["id"], SMALL_JOB)
                latencies.append(seconds(job["created_at"], job["started_at"]))
                publish.append(seconds(job["created_at"], job["enqueued_at"]))
                print(f"  {name} {mode} job {i + 1}/{jobs}: submit->start "
                      f"{latencies[-1] * 1000:.0f} ms", file=sys.stderr)
            modes[mode] = {
                "latency_s": latencies,
                "median_ms": statistics.median(latencies) * 1000,
                "p95_ms": percentile(latencies, 0.95) * 1000,
                "max_ms": max(latencies) * 1000,
                # created -> enqueued: the API's commit + publish, part of the above
                "publish_median_ms": statistics.median(publish) * 1000,
                "publish_p95_ms": percentile(publish, 0.95) * 1000,
            }
        time.sleep(gap)
        job, wall = run_job(client, model["id"], dataset["id"], DIGITS_JOB)
    return {
        "setup": name,
        "jobs": jobs,
        "modes": modes,
        "digits_wall_s": wall,
        "digits_run_s": seconds(job["started_at"], job["finished_at"]),
        "digits_params": job["metrics"]["params"],
        "digits_accuracy": job["metrics"]["accuracy"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--brokers", default="redis,embedded")
    parser.add_argument("--gap", type=float, default=3.0,
                        help="seconds between jobs in the idle mode (default 3)")
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args()
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mipp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        weights, npz = make_inputs(tmp)
        common = {"MIPP_SWEEPER_INTERVAL_S": "0", "MIPP_TORCH_THREADS": "1",
                  "MIPP_DEFAULT_QUEUE": f"bench-{os.getpid()}"}
        for name in args.brokers.split(","):
            (tmp / name).mkdir()
            env = {**common, "MIPP_DATA_DIR": str(tmp / name)}
            if name == "redis":
                import redis

                redis.Redis(db=args.redis_db).flushdb()
                with scratch_postgres() as pg:
                    env.update(MIPP_DATABASE_URL=pg,
                               MIPP_BROKER_URL=f"redis://127.0.0.1:6379/{args.redis_db}")
                    results.append(bench("PostgreSQL + Redis", env, weights, npz, args.jobs,
                                         args.gap, tmp / name))
                redis.Redis(db=args.redis_db).flushdb()
            elif name == "embedded":
                results.append(bench("embedded (SQLite + filesystem broker)", env, weights, npz,
                                     args.jobs, args.gap, tmp / name))
            else:
                parser.error(f"unknown broker setup {name!r}")

    print(f"\nQueue latency, {args.jobs} small jobs each, one worker (prefork, -c 1); "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"1-min load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
    print("| setup | mode | submit -> start median | p95 | max | of which API publish median / p95 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for mode, m in r["modes"].items():
            print(f"| {r['setup']} | {mode} | {m['median_ms']:.0f} ms | {m['p95_ms']:.0f} ms | "
                  f"{m['max_ms']:.0f} ms | {m['publish_median_ms']:.0f} / "
                  f"{m['publish_p95_ms']:.0f} ms |")
    print("\n| setup | digits MIPP job, submit -> succeeded | of which running | params after/before "
          "| accuracy dense -> retrained |")
    print("|---|---|---|---|---|")
    for r in results:
        p, a = r["digits_params"], r["digits_accuracy"]
        print(f"| {r['setup']} | {r['digits_wall_s']:.1f} s | {r['digits_run_s']:.1f} s | "
              f"{p['after']}/{p['before']} | {a['dense']:.3f} -> {a['retrained']:.3f} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "queue_latency.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
