"""Every state change of a job, in one place: submit, send, claim, progress, cancel, final
write, sweep, orphan recovery and reconcile. The routes and the worker call these functions;
neither writes a Job row itself.

Each change is one conditional UPDATE, or one short transaction holding row locks, so
concurrent actors (two deliveries of one message, a cancel racing a finish, two sweepers, a
submit racing a delete of its model) cannot both win.

The row says whether a job still needs a message: `queued` with `enqueued_at` NULL has none
(never sent, or the send failed); `queued` with an old `enqueued_at` may have lost its
message (a broker restarted without persistence, a worker killed between fetching and
claiming). `send_unsent` and `reconcile` (run by the API's maintenance loop) send those
again; the atomic claim makes a duplicate message harmless.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from app.core.model_checks import check_fits
from app.models import (
    Artifact,
    Dataset,
    Job,
    JobLayer,
    JobLogLine,
    JobStatus,
    ModelFile,
    Sweep,
    User,
    utcnow,
)

log = logging.getLogger("mipp.jobs")


# --------------------------------------------------------------------------------------------
# Row locks that work on both backends


def lock_row(session: Session, cls, row_id: str, *, shared: bool = False) -> bool:
    """Lock one row until the transaction ends; False when the row does not exist.

    PostgreSQL: SELECT ... FOR UPDATE (FOR SHARE when `shared`). SQLite has no row locks: a
    write takes its single database write lock, which orders this transaction against every
    other writer until commit, so a no-op UPDATE stands in for the lock.
    """
    if session.get_bind().dialect.name == "sqlite":
        changed = session.execute(
            update(cls).where(cls.id == row_id).values(name=cls.name)
            .execution_options(synchronize_session=False)
        ).rowcount
        return changed == 1
    stmt = select(cls.id).where(cls.id == row_id).with_for_update(read=shared)
    return session.execute(stmt).first() is not None


# --------------------------------------------------------------------------------------------
# Submit


@dataclass(frozen=True)
class JobRequest:
    """What a submit asks for, already validated against the schema."""

    model_id: str
    dataset_id: str
    config: dict[str, Any]
    queue: str | None = None
    time_limit_s: int | None = None
    idempotency_key: str | None = None


def check_compatible(model: ModelFile, dataset: Dataset) -> None:
    """The model's input shape, class count and (zoo safetensors) weights against the
    dataset's summary; see app.core.model_checks.check_fits."""
    summary = dataset.summary or {}
    check_fits(model, summary.get("input_shape"), summary.get("num_classes"))


def _same_request(job: Job, request: JobRequest, queue: str, time_limit_s: int) -> bool:
    return (
        job.model_id == request.model_id
        and job.dataset_id == request.dataset_id
        and job.config == request.config
        and job.queue == queue
        and job.time_limit_s == time_limit_s
    )


def _job_for_key(session: Session, user: User, request: JobRequest, queue: str,
                 time_limit_s: int) -> Job | None:
    """The job this idempotency key already made, or None; 409 if it was made by another body."""
    if not request.idempotency_key:
        return None
    job = session.scalar(
        select(Job).where(Job.owner_id == user.id, Job.idempotency_key == request.idempotency_key)
        .execution_options(populate_existing=True)
    )
    if job is not None and not _same_request(job, request, queue, time_limit_s):
        raise Conflict(
            f"idempotency_key {request.idempotency_key!r} was already used for a different "
            f"request (job {job.id!r}); use a new key for a new job"
        )
    return job


def _owned(session: Session, cls, row_id: str, user: User, what: str):
    row = session.get(cls, row_id, populate_existing=True)
    if row is None or (row.owner_id != user.id and not user.is_admin):
        raise NotFound(f"{what} {row_id!r} not found")
    if row.deleted_at is not None:  # soft-deleted: its file is gone
        raise NotFound(f"{what} {row_id!r} was deleted; upload it again")
    return row


def submit_job(session: Session, queue, settings, user: User, request: JobRequest) -> tuple[Job, bool]:
    """Write a queued job row and send its id; returns (job, created).

    A repeated idempotency key returns the key's own job (created False), or raises Conflict
    when the key came with a different body. The user's row is locked for the transaction, so
    the active-jobs limit and the key check hold under concurrent submits; the model and the
    dataset are locked (shared) so that a concurrent delete either waits and then sees this
    job (409) or wins first and this submit answers 404.

    The row is committed before the send; if the broker is unreachable the job stays
    `queued` with no `enqueued_at` and the maintenance loop sends it once the broker answers.
    """
    queue_name, time_limit = _queue_and_limit(settings, request.queue, request.time_limit_s)
    try:
        lock_row(session, User, user.id)
        existing = _job_for_key(session, user, request, queue_name, time_limit)
        if existing is not None:
            session.commit()
            return existing, False
        if not lock_row(session, ModelFile, request.model_id, shared=True):
            raise NotFound(f"model {request.model_id!r} not found")
        if not lock_row(session, Dataset, request.dataset_id, shared=True):
            raise NotFound(f"dataset {request.dataset_id!r} not found")
        model = _owned(session, ModelFile, request.model_id, user, "model")
        dataset = _owned(session, Dataset, request.dataset_id, user, "dataset")
        check_compatible(model, dataset)
        _check_active_limit(session, user, settings, adding=1)
        job = Job(
            owner_id=user.id,
            model_id=model.id,
            dataset_id=dataset.id,
            idempotency_key=request.idempotency_key,
            config=request.config,
            queue=queue_name,
            time_limit_s=time_limit,
            status=JobStatus.QUEUED,
            phase=JobStatus.QUEUED,
            message="waiting for a worker",
        )
        session.add(job)
        session.commit()
    except IntegrityError:
        # Only a key raced past the lock (it cannot, short of a bug): answer with its job.
        session.rollback()
        existing = _job_for_key(session, user, request, queue_name, time_limit)
        if existing is None:
            raise Conflict("the job's model or dataset changed while submitting; try again") from None
        return existing, False
    except BaseException:
        session.rollback()
        raise
    send_job(session, queue, job)
    return job, True


def _queue_and_limit(settings, queue: str | None, time_limit_s: int | None) -> tuple[str, int]:
    """A submit's queue and soft time limit, checked against the server's."""
    queue_name = queue or settings.default_queue
    if queue_name not in settings.all_queues:
        raise InvalidRequest(
            f"queue {queue_name!r} does not exist; choose one of {', '.join(settings.all_queues)}"
        )
    time_limit = time_limit_s or settings.job_time_limit_s
    if time_limit > settings.job_time_limit_s:
        raise InvalidRequest(
            f"time_limit_s {time_limit} is above the server's limit of {settings.job_time_limit_s}"
        )
    return queue_name, time_limit


def _check_active_limit(session: Session, user: User, settings, adding: int) -> None:
    """429 when `adding` more jobs would put the user above the queued + running limit
    (the caller holds the user's row lock)."""
    active = session.scalar(
        select(func.count()).where(Job.owner_id == user.id, Job.status.in_(JobStatus.ACTIVE))
    )
    if active + adding > settings.max_active_jobs_per_user:
        more = f" and this submits {adding}" if adding > 1 else ""
        raise QuotaExceeded(
            f"you have {active} queued or running jobs{more} (limit "
            f"{settings.max_active_jobs_per_user}); wait for some to finish or cancel them"
        )


def submit_sweep(session: Session, queue, settings, user: User, *, model_id: str,
                 dataset_id: str, configs: list[dict[str, Any]], queue_name: str | None,
                 time_limit_s: int | None, name: str, spec: dict[str, Any]) -> Sweep:
    """Write a sweep and one queued job per config in one transaction, then send them.

    Locks and checks as `submit_job` does, with room for every job under the active-jobs
    limit. A job whose send fails stays queued without `enqueued_at`; the maintenance loop
    sends it once the broker answers."""
    queue_name, time_limit = _queue_and_limit(settings, queue_name, time_limit_s)
    try:
        lock_row(session, User, user.id)
        if not lock_row(session, ModelFile, model_id, shared=True):
            raise NotFound(f"model {model_id!r} not found")
        if not lock_row(session, Dataset, dataset_id, shared=True):
            raise NotFound(f"dataset {dataset_id!r} not found")
        model = _owned(session, ModelFile, model_id, user, "model")
        dataset = _owned(session, Dataset, dataset_id, user, "dataset")
        check_compatible(model, dataset)
        _check_active_limit(session, user, settings, adding=len(configs))
        sweep = Sweep(owner_id=user.id, model_id=model.id, dataset_id=dataset.id,
                      name=name, spec=spec)
        session.add(sweep)
        session.flush()
        children = [
            Job(owner_id=user.id, model_id=model.id, dataset_id=dataset.id, sweep_id=sweep.id,
                config=config, queue=queue_name, time_limit_s=time_limit,
                status=JobStatus.QUEUED, phase=JobStatus.QUEUED, message="waiting for a worker")
            for config in configs
        ]
        session.add_all(children)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    for job in children:
        if not send_job(session, queue, job):
            break  # the broker is down; the maintenance loop sends the rest
    session.refresh(sweep)
    return sweep


def append_log(session: Session, job_id: str, attempt: int, lines: list[str]) -> None:
    """Add lines to a job's live log (GET /jobs/{id}/log reads them while it runs)."""
    session.add_all(JobLogLine(job_id=job_id, attempt=attempt, line=line) for line in lines)
    session.commit()


# --------------------------------------------------------------------------------------------
# Sending: the message carries only the id


def send_job(session: Session, queue, job: Job) -> bool:
    """Send `job`'s id to its queue and record when; False (job left unsent) if the broker
    is unreachable. Only a still-queued row is marked sent."""
    try:
        queue.enqueue(job.id, job.queue, job.time_limit_s)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the maintenance loop retries
        log.warning("job %s: could not send it (%s: %s); it stays queued and is sent once the "
                    "broker answers", job.id, type(exc).__name__, exc)
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED)
            .values(enqueued_at=None, message="waiting for the job queue (broker unreachable)")
            .execution_options(synchronize_session=False)
        )
        session.commit()
        session.refresh(job)
        return False
    session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(enqueued_at=utcnow()).execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)
    return True


def _send_claimed(session: Session, queue, rows: Iterable[tuple[str, str, int, Any]]) -> list[str]:
    """Send each (id, queue, time limit, previous enqueued_at) after winning a conditional
    UPDATE of its enqueued_at, so two API processes never both send one job in one round."""
    sent = []
    for job_id, queue_name, time_limit_s, previous in rows:
        guard = [Job.id == job_id, Job.status == JobStatus.QUEUED]
        guard.append(Job.enqueued_at.is_(None) if previous is None else Job.enqueued_at == previous)
        won = session.execute(
            update(Job).where(*guard).values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        session.commit()
        if not won:
            continue
        try:
            queue.enqueue(job_id, queue_name, time_limit_s)
        except Exception as exc:  # noqa: BLE001 - leave it unsent; the next round retries
            log.warning("job %s: send failed (%s); retrying next round", job_id, type(exc).__name__)
            session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(enqueued_at=None).execution_options(synchronize_session=False)
            )
            session.commit()
            break  # the broker is down: the others would fail the same way
        sent.append(job_id)
    return sent


def send_unsent(session: Session, queue, only: Iterable[str] | None = None) -> list[str]:
    """Send every queued job that has no message (enqueued_at NULL), or only those of
    `only`; returns the ids sent."""
    stmt = select(Job.id, Job.queue, Job.time_limit_s, Job.enqueued_at).where(
        Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))
    if only is not None:
        stmt = stmt.where(Job.id.in_(list(only)))
    rows = session.execute(stmt.order_by(Job.created_at)).all()
    session.commit()
    return _send_claimed(session, queue, rows)


def reconcile(session: Session, queue, *, resend_after_s: float) -> list[str]:
    """Send again the queued jobs whose message may be lost: sent more than `resend_after_s`
    ago and still unclaimed, on a queue where the broker holds fewer waiting messages than
    the database has queued jobs (so jobs merely waiting behind busy workers are left alone).
    Returns the ids sent."""
    cutoff = utcnow() - timedelta(seconds=resend_after_s)
    rows = session.execute(
        select(Job.id, Job.queue, Job.time_limit_s, Job.enqueued_at)
        .where(Job.status == JobStatus.QUEUED, Job.enqueued_at < cutoff)
        .order_by(Job.created_at)
    ).all()
    queued_per_queue = dict(session.execute(
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    ).all())
    session.commit()
    resend = []
    for queue_name in sorted({row.queue for row in rows}):
        try:
            waiting = queue.waiting(queue_name)
        except Exception as exc:  # noqa: BLE001 - broker down: nothing can be sent this round
            log.warning("reconciler: the broker does not answer (%s); next round", exc)
            return []
        if waiting is not None and waiting >= queued_per_queue.get(queue_name, 0):
            continue
        resend.extend(row for row in rows if row.queue == queue_name)
    sent = _send_claimed(session, queue, resend)
    if sent:
        log.warning("reconciler: sent %d queued job(s) again (message lost?): %s", len(sent), sent)
    return sent


# --------------------------------------------------------------------------------------------
# The worker's side: claim, progress, final write


def claim(session: Session, job_id: str, worker: str, pid: int | None = None) -> Job | None:
    """queued -> running, attempt+1. None when there is nothing to claim (duplicate delivery,
    cancelled while queued, already finished). `worker` is the Celery node name and `pid` the
    job process, which `requeue_orphans` uses to tell a dead attempt from a live one."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            started_at=now,
            heartbeat_at=now,
            phase="starting",
            progress=0.0,
            message="claimed by a worker",
            worker=worker,
            worker_pid=pid if pid is not None else os.getpid(),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _attempt_guard(job_id: str, attempt: int):
    return (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == attempt)


def record_progress(session: Session, job_id: str, attempt: int, **values: Any) -> tuple[bool, bool]:
    """Write a heartbeat (and phase/progress/message when given) if the row is still this
    attempt's. Returns (still ours, cancel requested)."""
    changed = session.execute(
        update(Job).where(*_attempt_guard(job_id, attempt)).values(heartbeat_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return bool(changed), bool(cancel)


def chosen_tol(layers: list[dict[str, Any]]) -> float | None:
    """The tol the selection used (one for every layer: the searched or configured one);
    None for methods without a tol."""
    tols = {layer["tol"] for layer in layers if layer.get("tol") is not None}
    return float(tols.pop()) if len(tols) == 1 else None


def finish_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    *,
    error: str | None = None,
    message: str = "",
    outputs: dict[str, Any] | None = None,
    artifacts: Iterable[Artifact] = (),
) -> bool:
    """The final write: status, outputs, per-layer rows and the artifact rows, in one
    transaction, only if the row is still this attempt's. True when written.

    The artifacts must live under this attempt's own key prefix: a stale attempt that loses
    this write leaves only objects no row points to."""
    values: dict[str, Any] = dict(
        status=status, phase=status, finished_at=utcnow(), heartbeat_at=utcnow(),
        error=error, message=message,
    )
    if status == JobStatus.SUCCEEDED:
        values.update(progress=1.0, phase_progress=1.0)
    values["eta_s"] = None
    if outputs is not None:
        values["metrics"] = outputs["metrics"]
        values["masks"] = outputs["masks"]
        values["tol"] = chosen_tol(outputs["layers"])
        values["layer_units"] = {
            layer["name"]: {"before": layer["units_before"], "after": layer["units_after"]}
            for layer in outputs["layers"]
        }
    changed = session.execute(
        update(Job).where(*_attempt_guard(job_id, attempt)).values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if changed:
        for position, layer in enumerate((outputs or {}).get("layers", [])):
            details = {k: v for k, v in layer.items() if k not in ("name", "units_before", "units_after")}
            session.add(JobLayer(
                job_id=job_id, position=position, name=layer["name"],
                units_before=layer["units_before"], units_after=layer["units_after"],
                details=details,
            ))
        session.add_all(artifacts)
    session.commit()
    return bool(changed)


# --------------------------------------------------------------------------------------------
# Cancel


def request_cancel(session: Session, job: Job) -> str:
    """Cancel a queued job at once; flag a running one (its worker stops at the next step).

    Returns the resulting status."""
    if job.status in JobStatus.FINAL:
        raise Conflict(f"job {job.id!r} already ended ({job.status}); nothing to cancel")
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            cancel_requested=True,
            finished_at=now,
            phase=JobStatus.CANCELLED,
            message="cancelled before it started",
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True, message="cancel requested")
            .execution_options(synchronize_session=False)
        )
    session.commit()
    session.refresh(job)
    return job.status


def cancel_sweep(session: Session, sweep: Sweep) -> int:
    """Cancel every job of a sweep that has not ended; returns how many were asked to stop."""
    asked = 0
    for job in list(sweep.jobs):
        session.refresh(job)
        if job.status in JobStatus.ACTIVE:
            try:
                request_cancel(session, job)
                asked += 1
            except Conflict:  # it ended meanwhile
                pass
    return asked


# --------------------------------------------------------------------------------------------
# Dead attempts: the sweeper (stale heartbeat) and orphan recovery (dead job process)


@dataclass
class DeadAttempts:
    requeued: list[str]
    ended: list[str]  # failed or cancelled


class AttemptLogs(Protocol):
    """Keeps the logs of a job's attempts when the job is ended by someone else than a
    worker (see app.core.artifacts.SweptLogs)."""

    def collect(self, session: Session, job_id: str, attempt: int) -> list[Artifact]: ...
    def discard(self, rows: list[Artifact]) -> None: ...


def _retire(session: Session, rows, guard_for, reason: str, max_attempts: int,
            attempt_logs: AttemptLogs | None) -> DeadAttempts:
    """Re-queue (attempts left), cancel (cancel requested) or fail each dead attempt, each
    with one conditional UPDATE; an ended job gets the attempts' logs as artifacts."""
    result = DeadAttempts([], [])
    for job_id, attempt, cancel_requested in rows:
        guard = guard_for(job_id, attempt)
        if not cancel_requested and attempt < max_attempts:
            changed = session.execute(
                update(Job).where(*guard).values(
                    status=JobStatus.QUEUED, phase=JobStatus.QUEUED, progress=0.0,
                    message=f"re-queued: {reason} (attempt {attempt})",
                    enqueued_at=None, worker=None, worker_pid=None,
                ).execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
            if changed:
                result.requeued.append(job_id)
            continue
        if cancel_requested:
            values = dict(status=JobStatus.CANCELLED, phase=JobStatus.CANCELLED,
                          message=f"cancelled ({reason})")
        else:
            values = dict(
                status=JobStatus.FAILED, phase=JobStatus.FAILED,
                error=(
                    f"{reason} {attempt} time(s) (killed by the hard time limit, out of host "
                    "memory, or the host went down); try a smaller calibration_samples/"
                    "batch_size or a longer time limit"
                ),
            )
        logs = attempt_logs.collect(session, job_id, attempt) if attempt_logs else []
        changed = session.execute(
            update(Job).where(*guard).values(finished_at=utcnow(), **values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed:
            session.add_all(logs)
            result.ended.append(job_id)
        session.commit()
        if not changed and logs:
            attempt_logs.discard(logs)
    return result


def sweep_stale(session: Session, *, stale_after_s: float, max_attempts: int,
                attempt_logs: AttemptLogs | None = None) -> DeadAttempts:
    """Running jobs whose heartbeat is older than `stale_after_s` (worker killed, host down,
    process stopped): re-queued while attempts remain, else failed with a reason."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    rows = session.execute(
        select(Job.id, Job.attempt, Job.cancel_requested)
        .where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)
    ).all()
    session.commit()

    def guard(job_id: str, attempt: int):
        return (*_attempt_guard(job_id, attempt), Job.heartbeat_at < cutoff)

    return _retire(session, rows, guard, "the worker stopped responding", max_attempts, attempt_logs)


def requeue_orphans(session: Session, worker: str, *, max_attempts: int,
                    is_alive: Callable[[int], bool],
                    attempt_logs: AttemptLogs | None = None) -> DeadAttempts:
    """Running jobs of this worker node whose job process is gone (the node restarted, or
    its job process was killed): re-queued at once instead of after the stale-heartbeat
    delay. A live process (even a stopped one) is left to the sweeper."""
    rows = session.execute(
        select(Job.id, Job.attempt, Job.cancel_requested, Job.worker_pid)
        .where(Job.status == JobStatus.RUNNING, Job.worker == worker)
    ).all()
    session.commit()
    dead = [(r.id, r.attempt, r.cancel_requested) for r in rows
            if r.worker_pid is None or not is_alive(r.worker_pid)]

    def guard(job_id: str, attempt: int):
        return (*_attempt_guard(job_id, attempt), Job.worker == worker)

    return _retire(session, dead, guard, "its job process died", max_attempts, attempt_logs)


# --------------------------------------------------------------------------------------------
# Deleting ended jobs (DELETE /jobs/{id} and the retention setting)


def delete_ended_job(session: Session, job_id: str) -> str:
    """Delete an ended job's row, with its layers, artifact rows and log lines (the foreign
    keys cascade); returns the store prefix of its files for the caller to remove (row first,
    then files: a failed store delete leaves orphans for the garbage collection, never a row
    pointing at nothing).

    One conditional DELETE: a job that is queued or running is not deleted (Conflict: cancel
    it first); NotFound when the row is gone."""
    from app.storage import job_prefix  # the key layout, shared with the worker

    session.rollback()  # a fresh transaction: the status read below must be current
    owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    deleted = session.execute(
        Job.__table__.delete().where(Job.id == job_id, Job.status.in_(JobStatus.FINAL))
    ).rowcount
    if not deleted:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        session.rollback()
        if status is None:
            raise NotFound(f"job {job_id!r} not found")
        raise Conflict(
            f"job {job_id!r} is {status}: cancel it first (POST /api/v1/jobs/{job_id}/cancel "
            "or `mipp jobs cancel`), then delete it once it has ended"
        )
    session.commit()
    return job_prefix(owner_id, job_id)


def delete_expired_jobs(session: Session, *, older_than_s: float, batch: int = 500) -> list[str]:
    """Delete up to `batch` jobs that ended more than `older_than_s` ago (the retention
    setting); returns their store prefixes for the caller to remove."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    ids = session.scalars(
        select(Job.id).where(Job.status.in_(JobStatus.FINAL), Job.finished_at < cutoff)
        .order_by(Job.finished_at).limit(batch)
    ).all()
    session.commit()
    prefixes = []
    for job_id in ids:
        try:
            prefixes.append(delete_ended_job(session, job_id))
        except (NotFound, Conflict):  # deleted by someone else meanwhile
            continue
    return prefixes
