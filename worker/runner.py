"""One job, start to end: claim the row, fetch inputs, run `mipp.prune`, store the outputs.

Outcomes: succeeded, failed (with a reason a user can act on) or cancelled; a duplicate
delivery claims nothing and returns "skipped". Job state changes are calls into
app.core.jobs: the final write is conditional on the row still being this attempt's, and an
attempt stores its files under its own prefix (`.../attempt-{n}/`), so an attempt the sweeper
gave away can write nothing a reader sees.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core import jobs
from app.core.artifacts import (
    LOG_NAME,
    SweptLogs,
    attempt_log_key,
    copy_attempt_logs,
    store_artifact,
)
from app.core.scratch import pid_alive, remove_abandoned, scratch_dir
from app.db import make_engine, make_sessionmaker
from app.models import Artifact, Dataset, Job, JobStatus, ModelFile
from app.settings import Settings
from app.storage import StoreError, attempt_prefix, make_store
from worker.live import JobProgress, LogLineBuffer, format_eta

log = logging.getLogger("mipp.worker")


class JobCancelled(Exception):
    """The user asked to stop (raised at a service-level step; the engine raises Cancelled)."""


class Reporter:
    """The engine's progress callback: writes phase, progress over the whole job, progress
    and ETA within the phase (throttled) and a heartbeat; logs a line at each phase change,
    each tenth of a phase (unless the last line is under 2 s old) and at least every
    `LOG_EVERY_S`; flushes the job's log lines to the database as it goes; stops the run
    (mipp.errors.Cancelled) once the row's cancel flag is set."""

    LOG_EVERY_S = 60.0

    def __init__(self, sessionmaker, job: Job, settings: Settings,
                 keep_log: Callable[[], None] | None = None):
        self.sessionmaker = sessionmaker
        self.job_id, self.attempt = job.id, job.attempt
        self.interval = settings.progress_interval_s
        self.heartbeat_interval = settings.heartbeat_interval_s
        self.keep_log = keep_log  # stores the log so far: a killed attempt's log survives it
        self.progress = JobProgress(job.config or {})
        self.log_lines = LogLineBuffer()  # the live copy of the log, for GET /jobs/{id}/log
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # the row is no longer ours (sweeper re-queued/failed it)
        self._stop = threading.Event()
        self._last_write = 0.0
        self._phase: str | None = None
        self._logged_step, self._logged_at = -1, 0.0
        self._flush_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._heartbeat_loop, daemon=True),
                         threading.Thread(target=self._log_loop, daemon=True)]

    def _write(self, **values: Any) -> None:
        with self.sessionmaker() as session:
            ours, cancel = jobs.record_progress(session, self.job_id, self.attempt, **values)
        if not ours:
            self.lost.set()
        if cancel:
            self.cancelled.set()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed heartbeat is not fatal
                log.warning("heartbeat write failed", exc_info=True)
            if self.keep_log is not None and not self.lost.is_set():
                try:
                    self.keep_log()
                except Exception:  # noqa: BLE001 - the final upload retries
                    log.warning("could not store the log so far", exc_info=True)

    def flush_log(self) -> None:
        """Write the log lines gathered so far to the database."""
        with self._flush_lock:  # one writer at a time keeps the lines in order
            lines = self.log_lines.take()
            if lines:
                with self.sessionmaker() as session:
                    jobs.append_log(session, self.job_id, self.attempt, lines)

    def _log_loop(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            try:
                self.flush_log()
            except Exception:  # noqa: BLE001 - the lines stay in log.txt; the run goes on
                log.warning("log flush failed", exc_info=True)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)  # no log upload may follow the final one

    def check(self) -> None:
        if self.cancelled.is_set() or self.lost.is_set():
            raise JobCancelled()

    def _log_progress(self, phase: str, fraction: float, message: str, eta: float | None) -> None:
        now = time.monotonic()
        step = int(fraction * 10)  # a line per tenth of a phase, not per report
        if phase != self._phase:
            log.info("phase %s: %s", phase, message)
        elif (step > self._logged_step and (now - self._logged_at >= 2.0 or fraction >= 1.0)) \
                or now - self._logged_at >= self.LOG_EVERY_S:
            left = f", ~{format_eta(eta)} left in phase" if eta is not None else ""
            log.info("%s %3.0f%%%s: %s", phase, 100 * fraction, left, message)
        else:
            return
        self._logged_step, self._logged_at = step, now

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        fraction = float(min(max(fraction, 0.0), 1.0))
        overall, eta = self.progress.update(phase, fraction)
        self._log_progress(phase, fraction, message, eta)
        if phase != self._phase or now - self._last_write >= self.interval or fraction >= 1.0:
            self._phase = phase
            self._last_write = now
            try:
                self._write(phase=phase, progress=overall, phase_progress=fraction, eta_s=eta,
                            message=message[:500])
            except Exception:  # noqa: BLE001 - progress is best effort; the run goes on
                log.warning("progress write failed", exc_info=True)
        if self.cancelled.is_set() or self.lost.is_set():
            from mipp.errors import Cancelled

            raise Cancelled("cancel requested")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _failure_reason(exc: BaseException, job: Job) -> str:
    """A message the user can act on; the traceback goes to the job's log only."""
    from celery.exceptions import SoftTimeLimitExceeded

    from mipp.errors import MippError

    if isinstance(exc, SoftTimeLimitExceeded):
        return (
            f"time limit: the job ran longer than {job.time_limit_s} s and was stopped; "
            "submit it with a larger time_limit_s (up to the server's limit) or fewer "
            "retrain epochs / calibration_samples"
        )
    if isinstance(exc, MippError):
        return str(exc)
    text = str(exc)
    if isinstance(exc, MemoryError) or "DefaultCPUAllocator" in text or (
        "can't allocate memory" in text
    ):
        # torch reports a failed host allocation as a RuntimeError, not a MemoryError.
        return (
            "out of host memory: the model (its widths) or the data is too large for this "
            "worker; use a smaller architecture config, dataset or calibration_samples "
            f"({text[:200]})"
        )
    try:
        import torch

        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
    except Exception:  # noqa: BLE001
        oom = False
    if oom or "CUDA out of memory" in text or "out of memory" in text.lower():
        return (
            "out of GPU memory: reduce config.retrain.batch_size, config.reconstructor.batch_size "
            f"or config.calibration_samples, or use a queue with a larger GPU ({text[:300]})"
        )
    if isinstance(exc, RuntimeError) and ("shape" in text or "size mismatch" in text):
        return f"the model and the dataset do not fit together: {text[:500]}"
    return f"internal error in the worker ({type(exc).__name__}: {text[:300]}); see log.txt"


class JobRun:
    def __init__(self, job: Job, settings: Settings, sessionmaker, store, log_path: Path):
        self.job, self.settings, self.sessionmaker, self.store = job, settings, sessionmaker, store
        self.prefix = attempt_prefix(job.owner_id, job.id, job.attempt)
        self.log_path = log_path
        self._log_size_stored = -1
        self.reporter = Reporter(sessionmaker, job, settings, keep_log=self.keep_log)
        self.artifacts: list[Artifact] = []

    def upload(self, path: Path, name: str) -> None:
        """Store an output under this attempt's prefix; it becomes the job's at the final write."""
        self.artifacts.append(store_artifact(self.store, self.job.id, f"{self.prefix}/{name}", path, name))
        log.info("stored %s (%d bytes)", name, path.stat().st_size)

    def keep_log(self) -> None:
        """Store the log so far under this attempt's prefix (when it grew)."""
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        if size != self._log_size_stored:
            self.store.put_file(attempt_log_key(self.job.owner_id, self.job.id, self.job.attempt),
                                self.log_path, "text/plain; charset=utf-8")
            self._log_size_stored = size

    def keep_earlier_logs(self) -> None:
        """Copy the logs of this job's earlier (killed) attempts into this attempt's prefix."""
        if self.job.attempt > 1:
            self.artifacts += copy_attempt_logs(
                self.store, self.job.owner_id, self.job.id, range(1, self.job.attempt),
                self.prefix, self.settings.tmp_dir,
            )

    def discard(self) -> None:
        """After a lost final write: remove this attempt's files, which no row points to. The
        log stays while the job is still active, so the attempt that ends it can keep it."""
        with self.sessionmaker() as session:
            status = session.scalar(select(Job.status).where(Job.id == self.job.id))
        keep_log = status in JobStatus.ACTIVE
        try:
            for key in self.store.list_keys(self.prefix + "/"):
                if not (keep_log and key.endswith("/" + LOG_NAME)):
                    self.store.delete(key)
        except StoreError:
            log.warning("job %s: could not remove the files of lost attempt %d", self.job.id,
                        self.job.attempt, exc_info=True)

    def remove_earlier_attempts(self) -> None:
        """After this attempt's final write: earlier attempts' files are unreferenced (their
        logs were copied)."""
        try:
            for attempt in range(1, self.job.attempt):
                prefix = attempt_prefix(self.job.owner_id, self.job.id, attempt)
                for key in self.store.list_keys(prefix + "/"):
                    self.store.delete(key)
        except StoreError:
            log.warning("job %s: could not remove earlier attempts' files", self.job.id, exc_info=True)

    def execute(self, work: Path) -> dict[str, Any]:
        """Fetch inputs, prune, store outputs; returns the values of the succeeded row."""
        from mipp.errors import ModelError

        job, reporter = self.job, self.reporter
        reporter("loading", 0.0, "fetching the model and the dataset")
        with self.sessionmaker() as session:
            model_row = session.get(ModelFile, job.model_id) if job.model_id else None
            data_row = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if model_row is None or data_row is None:
            raise ModelError("the job's model or dataset was deleted before the job started")
        log.info("model %s: %s %s (%s, %d bytes)", model_row.id, model_row.arch,
                 json.dumps(model_row.arch_config or {}), model_row.format, model_row.size_bytes)
        log.info("dataset %s: %s", data_row.id,
                 data_row.builtin_name if data_row.kind == "builtin" else
                 f"{data_row.name} ({data_row.size_bytes} bytes) {json.dumps(data_row.summary)}")

        weights = work / ("weights.safetensors" if model_row.format == "safetensors" else "weights.pt")
        self.store.get_file(model_row.store_key, weights)
        reporter.check()

        import torch

        import mipp  # lazily: torch is imported in the job's process only
        from mipp.builtin_datasets import server_data_dir
        from mipp.config import PruneConfig
        from mipp.data import load_dataset, load_npz
        from mipp.zoo import load_weights

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if data_row.kind == "npz":
            data_path = work / "data.npz"
            self.store.get_file(data_row.store_key, data_path)
            data = load_npz(data_path, preprocessing=data_row.preprocessing or "none")
        else:
            data = load_dataset(data_row.builtin_name,
                                server_data_dir(self.settings.datasets_dir, data_row.builtin_name))
        log.info("data: %d training and %d test samples of shape %s, %d classes, preprocessing %s",
                 len(data.x_train), len(data.x_test), tuple(data.input_shape), data.num_classes,
                 data.preprocessing.kind)
        reporter("loading", 0.5, "building the model")
        model, spec = self.build_model(model_row, data, work)
        load_weights(model, weights, model_row.format)
        config = PruneConfig.model_validate(job.config)
        if config.device == "auto" and self.settings.worker_device != "auto":
            config = config.model_copy(update={"device": self.settings.worker_device})
        reporter("loading", 1.0, f"{model_row.factory or model_row.arch} on {config.device}")
        knob = (f"target {config.target:.1%} of units (tol searched from {config.tol:g})"
                if config.target is not None else f"tol {config.tol:g}")
        log.info("pruning with %s: %s, confidence %g, refit %s, retrain %d epochs, "
                 "%d calibration samples, seed %d, device %s", config.method, knob,
                 config.confidence, config.refit, config.retrain.epochs,
                 config.calibration_samples, config.seed, config.device)

        result = mipp.prune(model, data, config, spec=spec, progress=reporter)

        from mipp.cli import format_report

        tol = jobs.chosen_tol(result.layers)
        if tol is not None:
            log.info("tol used: %g", tol)
        for line in format_report(result.layers, result.metrics).splitlines():
            if line.strip():
                log.info("%s", line)

        reporter.check()
        reporter("uploading", 0.0, "storing the pruned model")
        model_dir = result.save(work / "model")
        archive = work / "model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(model_dir, arcname="model")
        self.upload(archive, "model.tar.gz")
        for name in ("masks.json", "metrics.json"):
            self.upload(model_dir / name, name)
        try:
            from mipp.artifacts import export_onnx

            onnx_path = export_onnx(result.model, spec.input_shape, work / "model.onnx",
                                    result.preprocessing, result.class_names)
            self.upload(onnx_path, "model.onnx")
        except Exception as exc:  # noqa: BLE001 - ONNX is a convenience, not the result
            log.warning("ONNX export failed, skipping model.onnx: %s", exc)
        reporter("uploading", 1.0, "stored")
        return {
            "metrics": _jsonable(result.metrics),
            "masks": _jsonable(result.masks),
            "layers": _jsonable(result.layers),
        }

    def build_model(self, model_row: ModelFile, data, work: Path):
        """The uploaded model, unweighted, and its spec: a zoo arch, or the team's own code,
        which is imported here, in this job's process, and nowhere else."""
        from mipp.custom import CodeSpec, build_code_model, copy_code
        from mipp.zoo import ModelSpec

        input_shape = tuple(model_row.input_shape or data.input_shape)
        num_classes = model_row.num_classes or data.num_classes
        if model_row.kind == "code":
            archive = work / "source" / Path(model_row.code_store_key).name  # keeps mynet.py
            archive.parent.mkdir()
            self.store.get_file(model_row.code_store_key, archive)
            spec = CodeSpec(factory=model_row.factory, kwargs=model_row.factory_kwargs or {},
                            input_shape=input_shape, num_classes=num_classes)
            return build_code_model(spec, copy_code(archive, work / "code")), spec
        spec = ModelSpec(arch=model_row.arch, input_shape=input_shape, num_classes=num_classes,
                         config=model_row.arch_config or {})
        return spec.build(), spec

    def finish(self, status: str, *, error: str | None = None, message: str = "",
               outputs: dict[str, Any] | None = None) -> bool:
        """Write the final state if the row is still this attempt's; True when written."""
        with self.sessionmaker() as session:
            return jobs.finish_attempt(
                session, self.job.id, self.job.attempt, status, error=error, message=message,
                outputs=outputs, artifacts=self.artifacts,
            )


_ENGINES: dict[str, Any] = {}
_STORES: dict[int, Any] = {}
_QUEUES: dict[int, Any] = {}


def store(settings: Settings):
    """This process's object store client (created once: a boto3 client costs ~0.1 s of CPU,
    and orphan recovery and the job both need one)."""
    client = _STORES.get(id(settings))
    if client is None:
        client = _STORES[id(settings)] = make_store(settings)
    return client


def database(settings: Settings):
    """This process's engine for the job database (created once, reused by later jobs)."""
    engine = _ENGINES.get(settings.database_url)
    if engine is None:
        engine = _ENGINES[settings.database_url] = make_engine(settings.database_url)
    return engine


def warm_database(settings: Settings) -> None:
    """In the worker's parent, before it forks job processes: connect once so that the
    dialect is initialised (~0.1 s on PostgreSQL), then close the connection, so that each
    child inherits an initialised engine and no socket."""
    engine = database(settings)
    with engine.connect():
        pass
    engine.dispose()


def job_queue(settings: Settings):
    """This process's producer for job messages (app.queue.JobQueue, created once)."""
    producer = _QUEUES.get(id(settings))
    if producer is None:
        from app.queue import JobQueue

        producer = _QUEUES[id(settings)] = JobQueue(settings)
    return producer


def preload_engine() -> None:
    """In the worker's parent, before it forks job processes: import torch and the engine
    once, so that every fresh job process inherits them instead of spending ~1.5 s of CPU
    (several seconds on a busy host) importing torch. Importing initialises neither CUDA
    nor torch's thread pools (each job process does that itself), so forking after it is
    safe; nothing here runs a tensor operation. The list is what a job imports (measured
    with `python -X importtime`): torch._dynamo (pulled in by the optimizers) and onnx
    (the export) alone cost more than the pruning of a small model."""
    import importlib

    for name in ("torch", "torch._dynamo", "torch.onnx", "onnx", "mipp.artifacts",
                 "mipp.builtin_datasets", "mipp.cli", "mipp.config", "mipp.data",
                 "mipp.methods", "mipp.pipeline", "mipp.refit", "mipp.training", "mipp.zoo"):
        try:
            importlib.import_module(name)
        except ImportError:  # onnx is optional (no model.onnx then); the job reports the rest
            log.info("preload: %s is not importable", name)


def after_fork() -> None:
    """In a fresh job process: never reuse a connection the parent might have opened."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _STORES.clear()  # a client's pooled sockets must not be shared with the parent
    _QUEUES.clear()


def recover_orphans(settings: Settings, worker_name: str) -> jobs.DeadAttempts:
    """Re-queue (or end) the running jobs of this worker node whose job process is gone: the
    node was restarted, or its job process was killed. They are sent at once from here (the
    API's maintenance round would send them too, up to `sweeper_interval_s` later); a send
    that fails leaves them to that round."""
    sessionmaker = make_sessionmaker(database(settings))
    with sessionmaker() as session:
        dead = jobs.requeue_orphans(
            session, worker_name, max_attempts=settings.max_attempts, is_alive=pid_alive,
            attempt_logs=SweptLogs(store(settings), settings.tmp_dir),
        )
        if dead.requeued:
            jobs.send_unsent(session, job_queue(settings), only=dead.requeued)
    if dead.requeued or dead.ended:
        log.warning("orphaned jobs of %s: re-queued %s, ended %s", worker_name, dead.requeued,
                    dead.ended)
    return dead


def run_job(job_id: str, *, settings: Settings, worker_name: str = "worker") -> str:
    """Run one job to its end; returns "succeeded" | "failed" | "cancelled" | "skipped"."""
    log.info("job %s: task started", job_id)
    # This process already re-queued its node's orphans when it started (celery_app).
    remove_abandoned(settings.tmp_dir, ("job",))
    sessionmaker = make_sessionmaker(database(settings))
    with sessionmaker() as session:
        job = jobs.claim(session, job_id, worker_name, os.getpid())
    if job is None:
        log.info("job %s: nothing to claim (duplicate delivery, cancelled or finished)", job_id)
        return "skipped"
    log.info("job %s: claimed (attempt %d)", job_id, job.attempt)
    return _run_claimed(job, settings, sessionmaker)


def _run_claimed(job: Job, settings: Settings, sessionmaker) -> str:
    root = logging.getLogger()
    with scratch_dir(settings.tmp_dir, "job") as work:
        log_path = work / LOG_NAME
        run = JobRun(job, settings, sessionmaker, store(settings), log_path)
        handler = logging.FileHandler(log_path)
        handler.setLevel(logging.INFO)  # the same lines as the database copy (LogLineBuffer)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.addHandler(run.reporter.log_lines)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        log.info("job %s: attempt %d on %s (pid %d, queue %s, time limit %d s)", job.id,
                 job.attempt, job.worker, os.getpid(), job.queue, job.time_limit_s)
        try:  # stored at once, then at each heartbeat: an attempt killed early keeps a log too
            run.keep_log()
        except Exception:  # noqa: BLE001 - the heartbeat retries
            log.warning("could not store the log so far", exc_info=True)
        run.reporter.start()
        outcome, error, outputs, message = JobStatus.FAILED, None, None, ""
        try:
            outputs = run.execute(work)
            outcome, message = JobStatus.SUCCEEDED, "done"
        except BaseException as exc:  # noqa: BLE001 - every outcome is written to the row
            from mipp.errors import Cancelled

            if isinstance(exc, Cancelled | JobCancelled):
                outcome, message = JobStatus.CANCELLED, "cancelled by the user"
                log.info("job %s: cancelled", job.id)
            elif isinstance(exc, KeyboardInterrupt | SystemExit):
                raise  # the worker is shutting down: orphan recovery re-queues the job
            else:
                error = _failure_reason(exc, job)
                log.error("job %s failed: %s\n%s", job.id, error, traceback.format_exc())
        finally:
            if outcome == JobStatus.SUCCEEDED:
                log.info("job %s succeeded", job.id)
            run.reporter.stop()
            root.removeHandler(handler)
            root.removeHandler(run.reporter.log_lines)
            handler.close()
            try:
                run.reporter.flush_log()  # every line is in the database before the final state
            except Exception:  # noqa: BLE001 - log.txt still has them
                log.warning("could not store the last log lines", exc_info=True)
        if run.reporter.lost.is_set():
            log.warning("job %s: attempt %d lost the row (the sweeper gave it away)", job.id, job.attempt)
        try:
            run.upload(log_path, LOG_NAME)
            run.keep_earlier_logs()
        except Exception:  # noqa: BLE001 - the log must not change the outcome
            log.warning("could not store log.txt", exc_info=True)
        written = run.finish(outcome, error=error, message=message, outputs=outputs)
        if not written:
            log.warning("job %s: the row changed under attempt %d; result not recorded",
                        job.id, job.attempt)
            run.discard()
            return "lost"
        run.remove_earlier_attempts()
        return outcome
