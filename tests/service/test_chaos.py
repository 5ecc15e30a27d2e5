"""Chaos suite: faults, races and kills against real services, each case asserting the final
state (issue 8).

The team setup here is PostgreSQL (a database of its own) + Redis + S3 (moto) with two real
worker nodes, and short timings (stale heartbeat, reconcile, maintenance round) so that every
recovery path runs in seconds. The API's side of the broker goes through a TCP proxy that a
test can take down (a broker outage as the API sees it: open connections reset, new ones
refused); the workers connect to Redis directly. The embedded default (`mipp serve`) is
started as the real command.

Goals asserted after every case (`assert_final_state`): no job lost or stuck (each one
final within a bound), every artifact in the store equal to its row's size and sha256, no
object under a job's prefix that no row points to, one result set per job, no
`DATA/tmp/job-*` or `upload-*` left, and a killed attempt's log kept as `log-attempt-N.txt`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    REDIS_HOST,
    REDIS_PORT,
    REPO,
    RUN_ID,
    _common_env,
    _make_service,
    _pythonpath,
    scratch_pg_database,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Short timings: a dead attempt is stale after 4 s, a message unclaimed 2 s after its send is
# re-sent if the broker lost it, and the API runs a maintenance round every 0.5 s.
TIMINGS = {
    "MIPP_HEARTBEAT_INTERVAL_S": "0.5",
    "MIPP_PROGRESS_INTERVAL_S": "0.2",
    "MIPP_STALE_HEARTBEAT_S": "4",
    "MIPP_RECONCILE_AFTER_S": "2",
    "MIPP_SWEEPER_INTERVAL_S": "0.5",
    "MIPP_MAX_ATTEMPTS": "5",  # room for three kills of one job
    "MIPP_BROKER_POLLING_INTERVAL_S": "0.1",
}
STALE_S = float(TIMINGS["MIPP_STALE_HEARTBEAT_S"])
RECONCILE_S = float(TIMINGS["MIPP_RECONCILE_AFTER_S"])
# The longest a fault may delay a job (claim of the next attempt) beyond its own cause.
RESUME_BOUND_S = STALE_S + 6.0
JOB_TIMEOUT_S = 90.0

# A job of well under a second on a quiet machine (the worker preloads torch), and one that
# retrains for about 1.5 s of CPU: long enough to be killed mid-job after its first log
# upload, short enough to run to the end in the attempt after the kill.
QUICK = {"method": "random", "target": 0.5, "refit": False,
         "retrain": {"epochs": 1, "batch_size": 64}, "device": "cpu"}
KILLABLE = {**QUICK, "retrain": {"epochs": 90, "batch_size": 64}}
LONG = {"method": "random", "target": 0.5, "retrain": {"epochs": 5000, "batch_size": 16},
        "device": "cpu"}
IDLE_QUEUE = f"gpu-chaos-idle-{RUN_ID}"  # no worker listens: submits park their jobs here
FINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------------------------
# Processes and a broker that can go down


class TcpProxy:
    """127.0.0.1:<port> forwarded to a target. `down()` resets every open connection and
    refuses new ones (an outage as a client sees it); `up()` serves again on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    @property
    def url_netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            _close(listener)  # shutdown first: it wakes the thread blocked in accept()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _close(client), _close(upstream)
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _close(src), _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    from app.core.scratch import pid_alive

    return pid_alive(pid)


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    """Poll `condition()` until it returns something truthy; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class WorkerNode:
    """One real Celery worker node (`mipp` worker command) in its own process group."""

    def __init__(self, service, name: str):
        self.service, self.name = service, name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.log = service.settings.data_dir / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def launch(self) -> None:
        from app.cli import worker_command

        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                worker_command(self.service.settings, hostname=f"{self.name}@%h"), cwd=REPO,
                env=self.service.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.tail()}")
            return b" ready." in self.log.read_bytes()[self._log_offset:]

        wait_for(ready, timeout, f"worker {self.name} to be ready", poll=0.1)

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def owns(self, pid: int) -> bool:
        return pid in _children(self.pid)

    def kill_parent(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def kill_all(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Chaos:
    service: object
    nodes: list[WorkerNode]
    proxy: TcpProxy
    redis: object
    jobs: list[str] = field(default_factory=list)  # every job a case made, for the end checks
    inputs: tuple[str, str] | None = None  # (model id, dataset id) of the user "chaos"

    @property
    def settings(self):
        return self.service.settings

    def node_for(self, worker: str) -> WorkerNode:
        return next(n for n in self.nodes if n.hostname == worker)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.tail()}" for n in self.nodes)

    def ensure_workers(self) -> None:
        """Every node running and ready (a case may have killed or restarted one)."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.launch()
        for node in self.nodes:
            node.wait_ready()


@pytest.fixture(scope="module")
def chaos_pg_url():
    # Its own database: its sweeper touches only its jobs.
    with scratch_pg_database(f"mipp_test_{RUN_ID}_chaos") as url:
        yield url


@pytest.fixture(scope="module")
def chaos(chaos_pg_url, redis_url, s3_endpoint, tmp_path_factory):
    import redis

    tmp = tmp_path_factory.mktemp("chaos")
    proxy = TcpProxy((REDIS_HOST, REDIS_PORT))
    redis_db = redis_url.rsplit("/", 1)[1]
    env = {
        **_common_env(tmp, f"gpu-chaos-{RUN_ID}"),
        **TIMINGS,
        "MIPP_DATABASE_URL": chaos_pg_url,
        "MIPP_BROKER_URL": f"redis://{proxy.url_netloc}/{redis_db}",  # the API's side
        "MIPP_STORE": "s3",
        "MIPP_S3_ENDPOINT_URL": s3_endpoint,
        "MIPP_S3_BUCKET": f"mipp-chaos-{RUN_ID}",
        "MIPP_S3_ACCESS_KEY_ID": "testing",
        "MIPP_S3_SECRET_ACCESS_KEY": "testing",
    }
    service = _make_service("chaos", env, tmp, start_worker=False)
    service.env["MIPP_BROKER_URL"] = redis_url  # workers talk to Redis directly
    nodes = [WorkerNode(service, "chaos-a"), WorkerNode(service, "chaos-b")]
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=int(redis_db))
    state = Chaos(service, nodes, proxy, client)
    try:
        state.ensure_workers()
        yield state
    finally:
        for node in nodes:
            node.stop()
        proxy.down()
        if service.live is not None:
            service.live.stop()
        service.client.__exit__(None, None, None)
        client.close()


@pytest.fixture(scope="module")
def chaos_inputs(chaos, digits_files):
    service = chaos.service
    service.add_user("chaos")
    model = service.upload_model("chaos", digits_files["weights"])
    dataset = service.upload_dataset("chaos", digits_files["npz"])
    chaos.inputs = (model["id"], dataset["id"])
    return chaos.inputs


@pytest.fixture
def team(chaos, chaos_inputs):
    """The team setup with both worker nodes up and the broker reachable; after the case,
    the final-state checks over every job it made."""
    chaos.ensure_workers()
    chaos.proxy.up()  # a failed case may have left it down
    before = len(chaos.jobs)
    yield chaos
    assert_final_state(chaos, chaos.jobs[before:])


# --------------------------------------------------------------------------------------------
# Reading the state


def row(chaos: Chaos, job_id: str):
    from app.models import Job

    with chaos.service.app.state.sessionmaker() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def submit(chaos: Chaos, config: dict = QUICK, **extra) -> dict:
    model_id, dataset_id = chaos.inputs
    job = chaos.service.submit("chaos", model_id, dataset_id, config, **extra)
    chaos.jobs.append(job["id"])
    return job


def attempt_log_key(chaos: Chaos, job, attempt: int) -> str:
    from app.core.artifacts import attempt_log_key as key

    return key(job.owner_id, job.id, attempt)


def wait_running(chaos: Chaos, job_id: str, attempt: int, timeout: float = RESUME_BOUND_S + 20):
    """Wait until attempt `attempt` is retraining (inputs fetched, most of the job ahead)
    and has stored its log so far, so that a kill now is mid-job and leaves a log to keep;
    returns its row."""
    store = chaos.service.app.state.store

    def running():
        job = row(chaos, job_id)
        if job.status in FINAL:
            raise AssertionError(f"job {job_id} ended ({job.status}, attempt {job.attempt}) "
                                 f"before attempt {attempt} could be interrupted:\n{chaos.logs()}")
        if job.status == "running" and job.attempt == attempt and job.phase == "retraining":
            if store.exists(attempt_log_key(chaos, job, attempt)):
                return job
        return None

    try:
        return wait_for(running, timeout, f"attempt {attempt} of job {job_id} to run", poll=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{chaos.logs()}") from None


def wait_final(chaos: Chaos, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    def final():
        job = chaos.service.job("chaos", job_id)
        return job if job["status"] in FINAL else None

    try:
        return wait_for(final, timeout, f"job {job_id} to end", poll=0.1)
    except AssertionError as exc:
        job = chaos.service.job("chaos", job_id)
        raise AssertionError(f"{exc}: {job['status']}/{job['message']}\n{chaos.logs()}") from None


def scratch_of(chaos: Chaos, pid: int) -> list[Path]:
    return list(chaos.settings.tmp_dir.glob(f"job-*-{pid}-*"))


def leftovers(tmp_dir: Path) -> list[str]:
    if not tmp_dir.is_dir():
        return []
    return sorted(p.name for p in tmp_dir.iterdir() if p.name.startswith(("job-", "upload-")))


def assert_final_state(chaos: Chaos, job_ids: list[str]) -> None:
    """The issue's goals for the jobs of one case: all final, one result set each, every
    artifact equal to its row, nothing unreferenced under a job's prefix, no scratch left."""
    from sqlalchemy import select

    from app.models import Artifact, Job, JobLayer
    from app.storage import job_prefix

    service = chaos.service
    store = service.app.state.store
    with service.app.state.sessionmaker() as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job.status in FINAL, f"job {job_id} left {job.status}: {job.message}"
            layers = session.scalars(select(JobLayer).where(JobLayer.job_id == job_id)).all()
            positions = Counter(layer.position for layer in layers)
            assert all(n == 1 for n in positions.values()), f"duplicate layer rows: {positions}"
            artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
            names = Counter(a.name for a in artifacts)
            assert all(n == 1 for n in names.values()), f"duplicate artifacts: {names}"
            if job.status == "succeeded":
                assert len(layers) == 3 and {"model.tar.gz", "log.txt"} <= set(names)
            for artifact in artifacts:
                local = service.settings.tmp_dir.parent / f"check-{uuid.uuid4().hex}"
                try:
                    store.get_file(artifact.store_key, local)
                    data = local.read_bytes()
                finally:
                    local.unlink(missing_ok=True)
                assert len(data) == artifact.size_bytes, f"{artifact.store_key}: size differs"
                assert hashlib.sha256(data).hexdigest() == artifact.sha256, \
                    f"{artifact.store_key}: stored bytes differ from the row's sha256"
            referenced = {a.store_key for a in artifacts}
            stray = [k for k in store.list_keys(job_prefix(job.owner_id, job_id) + "/")
                     if k not in referenced]
            assert not stray, f"job {job_id}: objects no row points to: {stray}"
    # A killed process's scratch goes at the next maintenance round or job start.
    try:
        wait_for(lambda: not leftovers(service.settings.tmp_dir), 5, "scratch folders to go")
    except AssertionError:
        raise AssertionError(f"left in DATA/tmp: {leftovers(service.settings.tmp_dir)}") from None


def assert_killed_logs_kept(chaos: Chaos, job_id: str, killed: list[int], tmp: Path) -> None:
    api = chaos.service.api("chaos")
    names = {a["name"] for a in api.artifacts(job_id)}
    for attempt in killed:
        name = f"log-attempt-{attempt}.txt"
        assert name in names, f"the log of killed attempt {attempt} was not kept: {sorted(names)}"
        text = api.download(job_id, name, tmp / name).read_text()
        assert f"attempt {attempt} on" in text, text[:500]


# --------------------------------------------------------------------------------------------
# Kills


def test_worker_child_sigkill_mid_job_x3(team, tmp_path):
    """The job process dies three times mid-job: each time the next attempt starts well
    before a stale heartbeat would be noticed, and the fourth succeeds with the three
    killed attempts' logs."""
    job = submit(team, KILLABLE)
    resumed = []
    for attempt in (1, 2, 3):
        running = wait_running(team, job["id"], attempt)
        node = team.node_for(running.worker)
        pid = running.worker_pid
        assert node.owns(pid), f"pid {pid} is not a job process of {node.name}"
        assert scratch_of(team, pid), "the attempt has no scratch folder to leave behind"
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        resumed.append(wait_running(team, job["id"], attempt + 1).started_at.timestamp() - killed_at)
    done = wait_final(team, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 4, done
    assert_killed_logs_kept(team, job["id"], [1, 2, 3], tmp_path)
    print(f"\nchild SIGKILL: next attempt claimed after {', '.join(f'{s:.1f}' for s in resumed)} s")
    assert max(resumed) < STALE_S, f"resumed after {resumed} s: by the sweeper, not at once"


def test_worker_parent_sigkill_mid_job_x3(team, tmp_path):
    """The worker node's parent dies three times mid-job (its job process dies with it); the
    node is restarted as a supervisor would, and the job resumes on a node each time."""
    job = submit(team, KILLABLE)
    resumed = []
    running = wait_running(team, job["id"], 1)
    for attempt in (1, 2, 3):
        node = team.node_for(running.worker)
        assert node.owns(running.worker_pid)
        killed_at = time.time()
        node.kill_parent()
        wait_for(lambda: not _alive(running.worker_pid), 5, "the job process to die with its parent")
        node.launch()  # as a supervisor would; the sweeper may give the job away first
        running = wait_running(team, job["id"], attempt + 1)
        resumed.append(running.started_at.timestamp() - killed_at)
    team.ensure_workers()
    done = wait_final(team, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 4, done
    assert_killed_logs_kept(team, job["id"], [1, 2, 3], tmp_path)
    print(f"\nparent SIGKILL: next attempt claimed after {', '.join(f'{s:.1f}' for s in resumed)} s")
    # Bounded by a node's restart (celery and torch preloaded: seconds, more on a busy host)
    # when the other node is restarting too, else by the restart or the stale sweeper.
    assert max(resumed) < RESUME_BOUND_S + 15, resumed


def test_stale_attempt_revived_changes_nothing_readers_see(team, tmp_path):
    """SIGSTOP a job process: the sweeper gives the job to the other node and attempt 2
    succeeds. SIGCONT: the old attempt finds the row gone and writes nothing a reader sees."""
    from app.core.artifacts import attempt_log_key as log_key
    from app.storage import attempt_prefix

    job = submit(team, KILLABLE)
    running = wait_running(team, job["id"], 1)
    pid = running.worker_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        done = wait_final(team, job["id"], timeout=RESUME_BOUND_S + JOB_TIMEOUT_S)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        assert _alive(pid) and scratch_of(team, pid), "a stopped process's scratch must stay"
        api = team.service.api("chaos")
        before = sorted((a["name"], a["sha256"], a["size_bytes"]) for a in api.artifacts(job["id"]))
    finally:
        os.kill(pid, signal.SIGCONT)
    node = team.node_for(running.worker)
    wait_for(lambda: not _alive(pid), 30, "the revived attempt to end")
    assert "result not recorded" in node.tail(20000), node.tail()
    after = team.service.job("chaos", job["id"])
    assert (after["status"], after["attempt"], after["finished_at"], after["metrics"]) == \
        (done["status"], done["attempt"], done["finished_at"], done["metrics"])
    assert sorted((a["name"], a["sha256"], a["size_bytes"])
                  for a in api.artifacts(job["id"])) == before
    store = team.service.app.state.store
    assert store.list_keys(attempt_prefix(running.owner_id, job["id"], 1) + "/") == []
    assert not store.exists(log_key(running.owner_id, job["id"], 1))
    assert_killed_logs_kept(team, job["id"], [1], tmp_path)


# --------------------------------------------------------------------------------------------
# The broker


def test_broker_down_during_a_sweep(team):
    """A job process stops answering (SIGSTOP) and the broker goes down: the sweeper
    re-queues the stale attempt but cannot send it, so the job stays queued, unclaimed, and
    is sent and run on the other node once the broker answers."""
    job = submit(team, KILLABLE)
    running = wait_running(team, job["id"], 1)
    pid = running.worker_pid
    team.proxy.down()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: row(team, job["id"]).status == "queued", STALE_S + 5,
                 "the sweeper to re-queue the stale attempt")
        # Rounds go on failing to send it (a send is marked while it is tried and unmarked
        # when it fails); nothing claims it meanwhile.
        time.sleep(3 * float(TIMINGS["MIPP_SWEEPER_INTERVAL_S"]))
        still = row(team, job["id"])
        assert (still.status, still.attempt) == ("queued", 1), (still.status, still.message)
        team.proxy.up()
        up_at = time.time()
        done = wait_final(team, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        sent_after = datetime.fromisoformat(done["started_at"]).timestamp() - up_at
        print(f"\nbroker down during a sweep: claimed {sent_after:.1f} s after the broker was back")
        assert sent_after < 5.0
    finally:
        team.proxy.up()
        os.kill(pid, signal.SIGKILL)  # the stale attempt: its node replaces the process
    wait_for(lambda: not _alive(pid), 10, "the stopped attempt to be gone")


def test_broker_down_during_a_submit(team):
    """A job and a sweep (one child) submitted while the broker is down are kept queued and
    unsent, then sent by the maintenance loop once it answers; each runs once."""
    model_id, dataset_id = team.inputs
    team.proxy.down()
    try:
        job = submit(team)
        assert job["status"] == "queued" and job["enqueued_at"] is None, job
        config = {k: v for k, v in QUICK.items() if k not in ("method", "target")}
        sweep = team.service.api("chaos").submit_sweep(model_id, dataset_id, targets=[0.4],
                                                       methods=["random"], config=config)
    finally:
        team.proxy.up()
    children = [r["job_id"] for r in sweep["rows"]]
    team.jobs.extend(children)
    assert len(children) == 1
    for job_id in [job["id"], *children]:
        done = wait_final(team, job_id)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done


def test_redis_flushed_with_jobs_queued(team):
    """Both nodes busy, two jobs waiting in Redis, then Redis loses everything (a restart
    without persistence): the reconciler sends the two again and each runs once."""
    queue = team.settings.default_queue
    busy = [submit(team, LONG) for _ in team.nodes]
    for job in busy:
        wait_for(lambda job=job: row(team, job["id"]).status == "running", 30, "a busy node")
    waiting = [submit(team) for _ in range(2)]
    wait_for(lambda: team.redis.llen(queue) >= 2, 5, "two messages waiting in Redis")
    team.redis.flushdb()
    assert team.redis.llen(queue) == 0
    api = team.service.api("chaos")
    for job in busy:
        api.cancel(job["id"])
    # A node is free from the first cancelled job's end; the lost messages are re-sent
    # RECONCILE_S after their send, at the first round that sees fewer messages than jobs.
    free_at = min(datetime.fromisoformat(wait_final(team, job["id"])["finished_at"]).timestamp()
                  for job in busy)
    late = []
    for job in waiting:
        done = wait_final(team, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
        sent_at = datetime.fromisoformat(job["enqueued_at"]).timestamp()
        claimed_at = datetime.fromisoformat(done["started_at"]).timestamp()
        late.append(claimed_at - max(free_at, sent_at + RECONCILE_S))
    print(f"\nRedis flush: claimed {', '.join(f'{s:.1f}' for s in late)} s after a node was "
          "free and the reconcile interval had passed")
    assert min(late) < 3.0, late


# --------------------------------------------------------------------------------------------
# The API killed mid-upload


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"the API exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 60, "the API to answer", poll=0.1)
    return proc


def test_api_killed_mid_upload_leaves_no_spool(team, tmp_path):
    """SIGKILL of an API process while it copies and checks an upload leaves its
    `upload-*` folder; the restarted API removes it before serving, and nothing was stored."""
    data_dir = tmp_path / "api"
    env = {**team.service.env, "MIPP_DATA_DIR": str(data_dir), "MIPP_SWEEPER_INTERVAL_S": "0"}
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    big = tmp_path / "big.npz"
    with open(big, "wb") as fh:
        fh.truncate(160 * 1024 * 1024)  # sparse: the copy into the spool folder takes a while
    counts = team.service.row_counts()
    keys = set(team.service.store_keys())
    log = tmp_path / "api.log"
    api = _start_api(env, port, log)
    try:
        outcome = {}

        def upload():
            try:
                with open(big, "rb") as fh:
                    outcome["response"] = httpx.post(
                        f"http://127.0.0.1:{port}/api/v1/datasets",
                        headers=team.service.headers("chaos"),
                        files={"file": ("big.npz", fh)}, timeout=60)
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=upload)
        sender.start()
        spool = wait_for(lambda: list((data_dir / "tmp").glob("upload-*"))
                         if (data_dir / "tmp").is_dir() else None, 60, "the upload's spool folder",
                         poll=0.001)
        api.send_signal(signal.SIGKILL)
        api.wait()
        sender.join(30)
        assert "error" in outcome, f"the upload finished before the kill: {outcome}"
        assert all(p.exists() for p in spool), "the killed API left no spool folder (nothing tested)"
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()
    api = _start_api(env, port, log)
    try:
        assert leftovers(data_dir / "tmp") == []
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(20)
    assert team.service.row_counts() == counts and set(team.service.store_keys()) == keys


# --------------------------------------------------------------------------------------------
# Races, on PostgreSQL (the team setup) and SQLite (the embedded default)


@pytest.fixture(scope="module")
def embedded_race(tmp_path_factory):
    """The embedded default's database and store, with no worker: races need only the API."""
    tmp = tmp_path_factory.mktemp("chaos-embedded")
    env = {**_common_env(tmp, f"gpu-chaos-emb-{RUN_ID}")}
    service = _make_service("chaos-embedded", env, tmp, start_worker=False)
    yield service
    if service.live is not None:
        service.live.stop()
    service.client.__exit__(None, None, None)


@pytest.fixture(params=["team", "embedded"])
def racer(request, digits_files):
    if request.param == "team":
        service = request.getfixturevalue("chaos").service
        request.getfixturevalue("chaos_inputs")
    else:
        service = request.getfixturevalue("embedded_race")
    service.settings.queues = (IDLE_QUEUE,)
    try:
        yield service
    finally:
        service.settings.queues = ()


ROUNDS = 20


def _race(clients: list[httpx.Client], calls) -> list[httpx.Response]:
    """Run `calls` (client -> response) at once, one client each, released by a barrier."""
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        return calls[i](clients[i])

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, range(len(calls))))


def _clients(service, user: str, n: int) -> list[httpx.Client]:
    url = service.url
    return [httpx.Client(base_url=f"{url}/api/v1", headers=service.headers(user), timeout=30)
            for _ in range(n)]


def _upload_mlp(api, digits_files) -> dict:
    return api.upload_model(digits_files["weights"], arch="mlp", format="safetensors",
                            config={"widths": [64, 32, 16]}, input_shape=[64], num_classes=10)


def test_submit_vs_delete_race(racer, digits_files):
    """20 rounds of a submit racing a DELETE of its model (even rounds) or dataset (odd): a
    job is admitted and its inputs stay (the delete answers 409), or the delete wins (204)
    and the submit answers 404; an idempotency key only ever gives its own job."""
    from app.models import Dataset, ModelFile

    service = racer
    service.add_user("racer")
    api = service.api("racer")
    clients = _clients(service, "racer", 2)
    store = service.app.state.store
    outcomes = Counter()
    seen_jobs: set[str] = set()
    model0, dataset0 = _upload_mlp(api, digits_files), api.upload_dataset(digits_files["npz"])
    try:
        for i in range(ROUNDS):
            kind, cls = ("models", ModelFile) if i % 2 == 0 else ("datasets", Dataset)
            if kind == "models":
                target = _upload_mlp(api, digits_files)
                model, dataset = target, dataset0
            else:
                target = api.upload_dataset(digits_files["npz"])
                model, dataset = model0, target
            body = {"model_id": model["id"], "dataset_id": dataset["id"], "config": QUICK,
                    "queue": IDLE_QUEUE, "idempotency_key": f"race-{uuid.uuid4().hex}"}
            sub, dele = _race(clients, [lambda c: c.post("/jobs", json=body),
                                        lambda c: c.delete(f"/{kind}/{target['id']}")])
            outcome = (sub.status_code, dele.status_code)
            outcomes[outcome] += 1
            again = clients[0].post("/jobs", json=body)
            with service.app.state.sessionmaker() as session:
                kept = session.get(cls, target["id"])  # a delete keeps the row, marked
                deleted = kept.deleted_at is not None
                kept_file = store.exists(kept.store_key)
            if outcome == (201, 409):
                job = sub.json()
                assert job["id"] not in seen_jobs
                assert (job["model_id"], job["dataset_id"]) == (model["id"], dataset["id"])
                seen_jobs.add(job["id"])
                assert not deleted and kept_file, f"round {i}: the job's {kind[:-1]} is gone"
                assert again.status_code == 200 and again.json()["id"] == job["id"], again.text
                api.cancel(job["id"])
                assert clients[1].delete(f"/{kind}/{target['id']}").status_code == 204
            elif outcome == (404, 204):
                assert deleted and not kept_file
                assert again.status_code == 404, again.text  # never some other job
            else:
                raise AssertionError(f"round {i}: submit {sub.status_code} {sub.text[:300]}, "
                                     f"delete {dele.status_code} {dele.text[:300]}")
    finally:
        for client in clients:
            client.close()
    print(f"\n[{service.name}] submit vs delete, {ROUNDS} rounds: {dict(outcomes)}")


def test_active_jobs_quota_race(racer, digits_files):
    """20 rounds of 8 simultaneous submits under a limit of 3 active jobs: exactly 3 are
    admitted, never more are active; a key sent twice gives one job, a key reused with
    another body answers 409."""
    from sqlalchemy import func, select

    from app.models import Job, JobStatus

    service = racer
    service.add_user("quota")
    api = service.api("quota")
    model, dataset = _upload_mlp(api, digits_files), api.upload_dataset(digits_files["npz"])
    limit, n = 3, 8
    clients = _clients(service, "quota", n)
    saved_limit = service.settings.max_active_jobs_per_user
    service.settings.max_active_jobs_per_user = limit
    peak = 0
    try:
        for i in range(ROUNDS):
            keys = [f"q{i}-{k}-{uuid.uuid4().hex[:6]}" for k in range(6)]
            bodies = [{"model_id": model["id"], "dataset_id": dataset["id"], "config": QUICK,
                       "queue": IDLE_QUEUE, "idempotency_key": key} for key in keys]
            bodies.append(dict(bodies[0]))  # the same key and body again
            bodies.append({**bodies[1], "config": {**QUICK, "seed": 7}})  # same key, other body
            responses = _race(clients, [lambda c, b=b: c.post("/jobs", json=b) for b in bodies])
            codes = [r.status_code for r in responses]
            assert all(c in (200, 201, 409, 429) for c in codes), \
                [(c, r.text[:200]) for c, r in zip(codes, responses)]
            by_key: dict[str, set[str]] = {}
            for body, response in zip(bodies, responses):
                if response.status_code in (200, 201):
                    job = response.json()
                    assert (job["config"].get("seed") == 7) == ("seed" in body["config"]), job
                    by_key.setdefault(body["idempotency_key"], set()).add(job["id"])
                elif response.status_code == 409:
                    assert "idempotency_key" in response.json()["detail"]
            assert all(len(ids) == 1 for ids in by_key.values()), by_key  # never another job
            admitted = {job_id for ids in by_key.values() for job_id in ids}
            with service.app.state.sessionmaker() as session:
                active = session.scalar(select(func.count()).select_from(Job).where(
                    Job.owner_id == api.me()["id"], Job.status.in_(JobStatus.ACTIVE)))
            peak = max(peak, active)
            assert active <= limit and len(admitted) == limit, (codes, active, by_key)
            for job_id in admitted:
                api.cancel(job_id)
    finally:
        service.settings.max_active_jobs_per_user = saved_limit
        for client in clients:
            client.close()
    print(f"\n[{service.name}] quota race: {ROUNDS} rounds x {n} submits, limit {limit}, "
          f"peak active {peak}")


# --------------------------------------------------------------------------------------------
# The embedded default: `mipp serve` supervises its worker


def test_mipp_serve_survives_worker_sigkill(tmp_path, digits_files):
    """SIGKILL of `mipp serve`'s worker: the API keeps answering, the worker is restarted,
    and the job resumes within seconds (orphan recovery and the maintenance round), with the
    killed attempt's log kept."""
    from mipp.client import Client

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    data_dir = tmp_path / "serve"
    # The defaults, except a heartbeat (and so a stored log) every second and one thread.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPP_")}
    env.update({"PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1", "MIPP_TORCH_THREADS": "1",
                "MIPP_HEARTBEAT_INTERVAL_S": "1", "MIPP_DEFAULT_QUEUE": f"gpu-serve-{RUN_ID}"})
    out = open(tmp_path / "serve.log", "wb")
    started = time.monotonic()
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def serve_log() -> str:
        return (tmp_path / "serve.log").read_text(errors="replace")[-4000:]

    def worker_pid() -> int | None:
        for pid in _children(serve.pid):
            try:
                if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
        return None

    try:
        def up() -> bool:
            if serve.poll() is not None:
                raise AssertionError(f"mipp serve exited:\n{serve_log()}")
            try:
                api_up = httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
            return api_up and b" ready." in (tmp_path / "serve.log").read_bytes()

        wait_for(up, 90, "the API and the worker of mipp serve", poll=0.1)
        from app.db import make_engine, make_sessionmaker, session_scope
        from app.security import create_user

        engine = make_engine(f"sqlite:///{data_dir / 'mipp.db'}")
        with session_scope(make_sessionmaker(engine)) as session:
            _, key = create_user(session, "serve")
        engine.dispose()
        api = Client(base, key)
        model, dataset = _upload_mlp(api, digits_files), api.upload_dataset(digits_files["npz"])
        job = api.submit_job(model["id"], dataset["id"],
                             {**QUICK, "retrain": {"epochs": 160, "batch_size": 64}})
        log_key = data_dir / "store" / "users" / job["owner_id"] / "jobs" / job["id"] / "attempt-1" / "log.txt"
        wait_for(lambda: api.job(job["id"])["status"] == "running" and log_key.exists(), 60,
                 "attempt 1 to run and store its log", poll=0.1)
        first = worker_pid()
        # Past the supervisor's start-up window: a death then is a crash, not a failed start.
        time.sleep(max(0.0, 6.0 - (time.monotonic() - started)))
        assert api.job(job["id"])["status"] == "running", "the job ended before the kill"
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        answers = Counter()
        while True:
            try:
                answers[httpx.get(f"{base}/healthz", timeout=2).status_code] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1
            current = api.job(job["id"])
            if current["attempt"] >= 2 and current["status"] in ("running", *FINAL):
                resumed_s = time.monotonic() - killed_at
                break
            assert time.monotonic() - killed_at < 60, f"{current}\n{serve_log()}"
            time.sleep(0.2)
        assert set(answers) == {200}, answers  # the API answered throughout
        second = worker_pid()
        assert second is not None and second != first, serve_log()
        done = api.wait(job["id"], poll_s=0.2, timeout_s=JOB_TIMEOUT_S)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        names = {a["name"] for a in api.artifacts(job["id"])}
        assert "log-attempt-1.txt" in names, names
        assert leftovers(data_dir / "tmp") == []
        print(f"\nmipp serve: worker SIGKILL -> attempt 2 running after {resumed_s:.1f} s")
        assert resumed_s < 30, f"resumed after {resumed_s:.0f} s\n{serve_log()}"
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        out.close()
