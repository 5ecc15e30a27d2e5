"""Read throughput and latency of the API at 50 concurrent clients, against MLflow's tracking
server measured on the same machine in the same run.

    .venv/bin/python bench/bench_api_load.py [--duration 10] [--connections 50] [--workers 2]
    .venv/bin/python bench/bench_api_load.py --read-threads 1 8   # also a server with 8
    .venv/bin/python bench/bench_api_load.py --report [--since 2026-12-02T07:30]   # tables

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and `wrk` (Debian package `wrk`).
Both servers get a scratch PostgreSQL database (dropped at the end), the same number of
worker processes, and no access log:
- mipp: `uvicorn app.main:create_app --factory --workers W`, 200 succeeded jobs of one user
  (full PruneConfig and metrics, as a finished job has); `GET /api/v1/jobs/{id}` and
  `GET /api/v1/jobs?limit=20`, with the user's API key.
- MLflow (the reference): `mlflow server --workers W` from its own virtualenv
  (bench/.mlflow-venv, created here on first use: `pip install mlflow==MLFLOW_VERSION
  psycopg2-binary`), 200 runs with the same config as params and the metrics as metrics;
  `GET /api/2.0/mlflow/runs/get?run_id=` and `POST /api/2.0/mlflow/runs/search`
  (max_results 20). MLflow has no authentication here; mipp checks a key on every request.
wrk runs each target for `--duration` s after a 2 s warm-up, targets interleaved, `--rounds`
times; before each, the bench waits (up to 60 s) until the CPUs are 80% idle, so that a server
still working off the previous target's backlog does not load the next measurement. Every
measurement (with the 1-minute load average before and after) is appended to
bench/results/api_load.jsonl (with the commit measured); the tables in BENCHMARKS.md are
`--report`'s output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "api_load.jsonl"
MLFLOW_VENV = REPO / "bench" / ".mlflow-venv"
MLFLOW_VERSION = "3.17.2"
PG = "postgres@127.0.0.1:5432"
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _psql(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"postgresql://{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _code_version() -> str:
    """The commit measured, with "+dirty" when app/ differs from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return commit + ("+dirty" if git("diff", "--quiet", "HEAD", "--", "app").returncode else "")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------
# The two servers


def seed_jobs(url: str) -> tuple[str, str]:
    """Migrate the database at `url` and give it 200 succeeded jobs of one user (full
    PruneConfig and metrics, as a finished job has): (the user's API key, the last job's id)."""
    from app.db import make_engine, make_sessionmaker, migrate, session_scope
    from app.models import Job, JobStatus, User, utcnow
    from app.security import new_api_key
    from mipp.config import PruneConfig

    migrate(url)
    engine = make_engine(url)
    config = PruneConfig().model_dump(mode="json")
    with session_scope(make_sessionmaker(engine)) as session:
        user = User(name="bench")
        session.add(user)
        session.flush()
        key = new_api_key(session, user)
        jobs = [Job(owner_id=user.id, config=config, queue="gpu-default", time_limit_s=3600,
                    status=JobStatus.SUCCEEDED, phase=JobStatus.SUCCEEDED, progress=1.0,
                    message="done", attempt=1, worker="bench@host", enqueued_at=utcnow(),
                    started_at=utcnow(), heartbeat_at=utcnow(), finished_at=utcnow(),
                    metrics=_metrics()) for _ in range(200)]
        session.add_all(jobs)
        session.flush()
        job_id = jobs[-1].id
    engine.dispose()
    return key, job_id


def start_mipp(db: str, workers: int, tmp: Path, read_threads: int | None = None
               ) -> tuple[subprocess.Popen, str, str, str]:
    url = f"postgresql+psycopg://{PG}/{db}"
    key, job_id = seed_jobs(url)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIPP_DATABASE_URL": url,
           "MIPP_DATA_DIR": str(tmp / "mipp"), "MIPP_SWEEPER_INTERVAL_S": "0",
           "MIPP_ENVIRONMENT": "production",
           # One key drives the whole load: its request rate limit would answer 429.
           "MIPP_REQUESTS_PER_MINUTE": "0",
           **({} if read_threads is None else {"MIPP_READ_THREADS": str(read_threads)})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
         "127.0.0.1", "--port", str(port), "--workers", str(workers), "--no-access-log",
         "--log-level", "warning"],
        cwd=REPO, env=env, start_new_session=True, stdout=open(tmp / f"{db}.log", "wb"),
        stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/healthz")
    return proc, base, key, job_id


def _metrics() -> dict:
    return {"accuracy": {"dense": 0.975, "pruned": 0.93, "retrained": 0.96},
            "params": {"before": 6938, "after": 1871}, "macs": {"before": 6784, "after": 1792},
            "latency_ms": {"before": 0.05, "after": 0.04}, "units": {"before": 112, "after": 48},
            "seconds": {"select": 3.2, "refit": 0.4, "retrain": 1.9, "total": 6.1}}


def ensure_mlflow_venv() -> Path:
    mlflow = MLFLOW_VENV / "bin" / "mlflow"
    if not mlflow.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(MLFLOW_VENV / "bin" / "pip"), "install", "-q",
                        f"mlflow=={MLFLOW_VERSION}", "psycopg2-binary"], check=True)
    return mlflow


def start_mlflow(db: str, workers: int, tmp: Path) -> tuple[subprocess.Popen, str, str, str]:
    mlflow = ensure_mlflow_venv()
    port = _free_port()
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"postgresql+psycopg2://{PG}/{db}",
         "--default-artifact-root", str(tmp / "mlruns"), "--host", "127.0.0.1", "--port",
         str(port), "--workers", str(workers),
         "--uvicorn-opts", "--no-access-log --log-level warning"],
        cwd=tmp, start_new_session=True, stdout=open(tmp / "mlflow.log", "wb"),
        stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/health", timeout=240)
    api = f"{base}/api/2.0/mlflow"

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    from mipp.config import PruneConfig

    flat = _flatten(PruneConfig().model_dump(mode="json"))
    exp = post("experiments/create", {"name": "bench"})["experiment_id"]
    run_id = ""
    for _ in range(200):
        run_id = post("runs/create", {"experiment_id": exp})["run"]["info"]["run_id"]
        post("runs/log-batch", {
            "run_id": run_id,
            "params": [{"key": k, "value": str(v)[:250]} for k, v in flat.items()],
            "metrics": [{"key": k, "value": v, "timestamp": 0, "step": 0}
                        for k, v in _flatten(_metrics()).items()],
        })
        post("runs/update", {"run_id": run_id, "status": "FINISHED"})
    return proc, base, run_id, exp


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# wrk


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return round(float(number) * _UNITS[unit], 3)


def _cpu_idle(interval: float = 0.5) -> float:
    """The machine's idle share over `interval` seconds (Linux /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(interval)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def settle(timeout: float = 60.0) -> float:
    """Wait until the CPUs are mostly idle (a server still working off the previous target's
    backlog, MLflow's search especially, would load the next measurement); the seconds
    waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout and _cpu_idle() < 0.8:
        pass
    return round(time.monotonic() - started, 1)


def wrk(url: str, connections: int, duration: int, tmp: Path, headers: dict | None = None,
        method: str = "GET", body: dict | None = None) -> dict:
    script = tmp / "wrk.lua"
    lines = [f'wrk.method = "{method}"']
    for k, v in (headers or {}).items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    if body is not None:
        lines.append('wrk.headers["Content-Type"] = "application/json"')
        lines.append(f"wrk.body = [[{json.dumps(body)}]]")
    script.write_text("\n".join(lines) + "\n")
    # A 10 s timeout: with wrk's default (2 s) an overloaded server sees reconnects pile up.
    base = ["wrk", "-t", "2", "-c", str(connections), "--timeout", "10s", "--latency", "-s",
            str(script)]
    settled_s = settle()
    subprocess.run([*base, "-d", "2s", url], capture_output=True, check=True)  # warm-up
    load_before = _loadavg()
    out = subprocess.run([*base, "-d", f"{duration}s", url], capture_output=True, text=True,
                         check=True).stdout
    result = {"load_before": load_before, "load_after": _loadavg(), "settled_s": settled_s}
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "75", "90", "99"):
        result[f"p{pct}_ms"] = _ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    return result


# ---------------------------------------------------------------------------------------------
# Report


def report(path: Path = RESULTS, since: str = "") -> str:
    """The tables of every run in `path` that started at or after `since` (an ISO time)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row["run"] >= since]
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    out = []
    for run, items in runs.items():
        first = items[0]
        code = f", mipp at {first['code']}" if "code" in first else ""
        out.append(f"Run {run} ({first['host']['cpus']} CPUs, {first['host']['cpu']}, "
                   f"{first['workers']} server workers each, {first['connections']} connections, "
                   f"{first['duration_s']} s per measurement{code}):\n")
        out.append("| round | target | req/s | p50 ms | p90 ms | p99 ms | non-2xx | "
                   "load avg before -> after |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in items:
            out.append(f"| {r['round']} | {r['target']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                       f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']} | "
                       f"{r['load_before']} -> {r['load_after']} |")
        by_target: dict[str, list[float]] = {}
        for r in items:
            by_target.setdefault(r["target"], []).append(r["rps"])
        mean = {t: sum(v) / len(v) for t, v in by_target.items()}
        pairs = [("mipp GET job", "MLflow GET run"), ("mipp list jobs", "MLflow search runs")]
        ratios = [f"{a} / {b}: {mean[a] / mean[b]:.1f}x" for a, b in pairs
                  if a in mean and b in mean]
        if ratios:
            out.append("\nThroughput ratio (mean over rounds): " + "; ".join(ratios) + ".\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--read-threads", type=int, nargs="+", default=[1],
                        help="MIPP_READ_THREADS of each mipp server; the first is the one "
                        "compared with MLflow, the others are measured beside it")
    parser.add_argument("--report", action="store_true", help="print the tables and exit")
    parser.add_argument("--since", default="", help="--report: only the runs that started at "
                        "or after this UTC time, e.g. 2026-12-02T07:30")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSONL to append to")
    args = parser.parse_args()
    if args.report:
        print(report(args.results, args.since))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    suffix = os.getpid()
    mipp_dbs = [f"mipp_bench_{suffix}_{i}" for i in range(len(args.read_threads))]
    dbs = [*mipp_dbs, f"mlflow_bench_{suffix}"]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="mipp-load-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            for db in dbs:
                _psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                _psql(f'CREATE DATABASE "{db}"')
            targets = []
            for threads, db in zip(args.read_threads, mipp_dbs):
                # The server's default first; other settings are labelled with theirs.
                label = "" if threads == args.read_threads[0] else f" ({threads} read threads)"
                mipp_proc, mipp, key, job_id = start_mipp(db, args.workers, tmp, threads)
                procs.append(mipp_proc)
                auth = {"Authorization": f"Bearer {key}"}
                targets += [
                    (f"mipp GET job{label}", f"{mipp}/api/v1/jobs/{job_id}", auth, "GET", None),
                    (f"mipp list jobs{label}", f"{mipp}/api/v1/jobs?limit=20", auth, "GET",
                     None),
                ]
            if not args.no_mlflow:
                mlflow_proc, mlflow, run_id, exp = start_mlflow(dbs[-1], args.workers, tmp)
                procs.append(mlflow_proc)
                api = f"{mlflow}/api/2.0/mlflow"
                targets.insert(1, ("MLflow GET run", f"{api}/runs/get?run_id={run_id}", {},
                                   "GET", None))
                targets.append(("MLflow search runs", f"{api}/runs/search", {}, "POST",
                                {"experiment_ids": [exp], "max_results": 20}))
            host = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()}
            code = _code_version()
            args.results.parent.mkdir(parents=True, exist_ok=True)
            for round_no in range(1, args.rounds + 1):
                for name, url, headers, method, body in targets:
                    result = wrk(url, args.connections, args.duration, tmp, headers, method, body)
                    row = {"run": run, "round": round_no, "target": name, "host": host,
                           "code": code, "workers": args.workers,
                           "connections": args.connections,
                           "duration_s": args.duration, **result}
                    with open(args.results, "a") as fh:  # append-only raw log
                        fh.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
        finally:
            for proc in procs:
                _stop(proc)
            for db in dbs:
                _psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(report(args.results, run))  # this run's tables


if __name__ == "__main__":
    main()
