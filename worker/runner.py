"""One job, start to end: claim the row, fetch inputs, run `mipp.prune`, store the outputs.

Outcomes: succeeded, failed (with a reason a user can act on) or cancelled; a duplicate
delivery claims nothing and returns "skipped". Every final write is conditional on the row
still being this attempt's, so a sweeper that gave the job away wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.db import make_engine, make_sessionmaker
from app.jobs import claim
from app.models import Artifact, Dataset, Job, JobLayer, JobStatus, ModelFile, utcnow
from app.settings import Settings
from app.storage import job_prefix, make_store

log = logging.getLogger("mipp.worker")

CONTENT_TYPES = {
    ".tar.gz": "application/gzip",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
}


class JobCancelled(Exception):
    """The user asked to stop (raised at a service-level step; the engine raises Cancelled)."""


class Reporter:
    """The engine's progress callback: writes phase/progress (throttled) and a heartbeat, and
    stops the run (mipp.errors.Cancelled) once the row's cancel flag is set."""

    def __init__(self, sessionmaker, job_id: str, attempt: int, settings: Settings):
        self.sessionmaker = sessionmaker
        self.job_id, self.attempt = job_id, attempt
        self.interval = settings.progress_interval_s
        self.heartbeat_interval = settings.heartbeat_interval_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # the row is no longer ours (sweeper re-queued/failed it)
        self._stop = threading.Event()
        self._last_write = 0.0
        self._phase: str | None = None
        self._thread = threading.Thread(target=self._heartbeat_loop, daemon=True)

    def _guard(self):
        return (Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.attempt == self.attempt)

    def _write(self, **values: Any) -> None:
        with self.sessionmaker() as session:
            changed = session.execute(
                update(Job).where(*self._guard()).values(heartbeat_at=utcnow(), **values)
                .execution_options(synchronize_session=False)
            ).rowcount
            flag = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
            session.commit()
        if not changed:
            self.lost.set()
        if flag:
            self.cancelled.set()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed heartbeat is not fatal
                log.warning("heartbeat write failed", exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        if self.cancelled.is_set() or self.lost.is_set():
            raise JobCancelled()

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if phase != self._phase or now - self._last_write >= self.interval or fraction >= 1.0:
            if phase != self._phase:
                log.info("phase %s: %s", phase, message)
            self._phase = phase
            self._last_write = now
            try:
                self._write(phase=phase, progress=float(min(max(fraction, 0.0), 1.0)),
                            message=message[:500])
            except Exception:  # noqa: BLE001 - progress is best effort; the run goes on
                log.warning("progress write failed", exc_info=True)
        if self.cancelled.is_set() or self.lost.is_set():
            from mipp.errors import Cancelled

            raise Cancelled("cancel requested")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _content_type(name: str) -> str:
    return next((t for suffix, t in CONTENT_TYPES.items() if name.endswith(suffix)), "application/octet-stream")


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
    def __init__(self, job: Job, settings: Settings, sessionmaker, store):
        self.job, self.settings, self.sessionmaker, self.store = job, settings, sessionmaker, store
        self.prefix = job_prefix(job.owner_id, job.id)
        self.reporter = Reporter(sessionmaker, job.id, job.attempt, settings)
        self.artifacts: list[Artifact] = []

    def upload(self, path: Path, name: str) -> None:
        key = f"{self.prefix}/{name}"
        content_type = _content_type(name)
        self.store.put_file(key, path, content_type)
        self.artifacts.append(
            Artifact(
                job_id=self.job.id, name=name, store_key=key, size_bytes=path.stat().st_size,
                sha256=_sha256(path), content_type=content_type,
            )
        )

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

        weights = work / ("weights.safetensors" if model_row.format == "safetensors" else "weights.pt")
        self.store.get_file(model_row.store_key, weights)
        reporter.check()

        import torch

        import mipp  # lazily: torch is imported in the job's process only
        from mipp.config import PruneConfig
        from mipp.data import load_dataset, load_npz
        from mipp.zoo import ModelSpec, load_weights

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if data_row.kind == "npz":
            data_path = work / "data.npz"
            self.store.get_file(data_row.store_key, data_path)
            data = load_npz(data_path)
        else:
            datasets_dir = self.settings.datasets_dir
            data = load_dataset(
                data_row.builtin_name, datasets_dir if datasets_dir and datasets_dir.exists() else None
            )
        reporter("loading", 0.5, "building the model")
        spec = ModelSpec(
            arch=model_row.arch,
            input_shape=tuple(model_row.input_shape or data.input_shape),
            num_classes=model_row.num_classes or data.num_classes,
            config=model_row.arch_config or {},
        )
        model = spec.build()
        load_weights(model, weights, model_row.format)
        config = PruneConfig.model_validate(job.config)
        if config.device == "auto" and self.settings.worker_device != "auto":
            config = config.model_copy(update={"device": self.settings.worker_device})
        reporter("loading", 1.0, f"{spec.arch} on {config.device}")

        result = mipp.prune(model, data, config, spec=spec, progress=reporter)

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

            onnx_path = export_onnx(result.model, spec.input_shape, work / "model.onnx")
            self.upload(onnx_path, "model.onnx")
        except Exception as exc:  # noqa: BLE001 - ONNX is a convenience, not the result
            log.warning("ONNX export failed, skipping model.onnx: %s", exc)
        reporter("uploading", 1.0, "stored")
        return {
            "metrics": _jsonable(result.metrics),
            "masks": _jsonable(result.masks),
            "layers": _jsonable(result.layers),
        }

    def finish(self, status: str, *, error: str | None = None, message: str = "",
               outputs: dict[str, Any] | None = None) -> bool:
        """Write the final state if the row is still this attempt's; True when written."""
        job = self.job
        values: dict[str, Any] = dict(
            status=status, phase=status, finished_at=utcnow(), heartbeat_at=utcnow(),
            error=error, message=message,
        )
        if status == JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        if outputs is not None:
            values["metrics"] = outputs["metrics"]
            values["masks"] = outputs["masks"]
        with self.sessionmaker() as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempt == job.attempt)
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if changed:
                for position, layer in enumerate((outputs or {}).get("layers", [])):
                    extra = {k: v for k, v in layer.items() if k not in ("name", "units_before", "units_after")}
                    session.add(JobLayer(
                        job_id=job.id, position=position, name=layer["name"],
                        units_before=layer["units_before"], units_after=layer["units_after"],
                        details=extra,
                    ))
                session.add_all(self.artifacts)
            session.commit()
        return bool(changed)


_ENGINES: dict[str, Any] = {}


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


def after_fork() -> None:
    """In a fresh job process: never reuse a connection the parent might have opened."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)


def run_job(job_id: str, *, settings: Settings, worker_name: str = "worker") -> str:
    """Run one job to its end; returns "succeeded" | "failed" | "cancelled" | "skipped"."""
    log.info("job %s: task started", job_id)
    sessionmaker = make_sessionmaker(database(settings))
    with sessionmaker() as session:
        job = claim(session, job_id, worker_name)
    if job is None:
        log.info("job %s: nothing to claim (duplicate delivery, cancelled or finished)", job_id)
        return "skipped"
    log.info("job %s: claimed (attempt %d)", job_id, job.attempt)
    return _run_claimed(job, settings, sessionmaker)


def _run_claimed(job: Job, settings: Settings, sessionmaker) -> str:
    run = JobRun(job, settings, sessionmaker, make_store(settings))
    (settings.tmp_dir).mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir, prefix=f"job-{job.id}-") as tmp:
        work = Path(tmp)
        log_path = work / "log.txt"
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
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
                raise  # the worker is shutting down: the sweeper re-queues the job
            else:
                error = _failure_reason(exc, job)
                log.error("job %s failed: %s\n%s", job.id, error, traceback.format_exc())
        finally:
            run.reporter.stop()
            root.removeHandler(handler)
            handler.close()
        try:
            run.upload(log_path, "log.txt")
        except Exception:  # noqa: BLE001 - the log must not change the outcome
            log.warning("could not store log.txt", exc_info=True)
        if run.reporter.lost.is_set() and outcome == JobStatus.CANCELLED:
            log.warning("job %s: the row was taken over (sweeper); leaving it", job.id)
            return "lost"
        written = run.finish(outcome, error=error, message=message, outputs=outputs)
        if not written:
            log.warning("job %s: the row changed under us; result not recorded", job.id)
        return outcome
