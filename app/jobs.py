"""Job state transitions on the database row, shared by the API, the worker and the sweeper.

Every transition is one conditional UPDATE, so concurrent actors (two deliveries of one
message, a cancel racing a finish, two sweepers) cannot both win.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, utcnow


def claim(session: Session, job_id: str, worker: str) -> Job | None:
    """queued -> running, attempt+1. None when there is nothing to claim (duplicate delivery,
    cancelled while queued, already finished)."""
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
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def request_cancel(session: Session, job: Job) -> str:
    """Cancel a queued job at once; flag a running one (its worker stops at the next step).

    Returns the resulting status."""
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


def sweep(session: Session, *, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """Handle running jobs whose worker died (heartbeat older than `stale_after_s`).

    A job with attempts left goes back to queued (the caller re-enqueues it); the others fail
    with a reason. Returns (requeued ids, failed ids).
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = session.execute(
        select(Job.id, Job.attempt, Job.cancel_requested).where(
            Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff
        )
    ).all()
    requeued, failed = [], []
    for job_id, attempt, cancel_requested in stale:
        guard = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)
        if cancel_requested:
            values = dict(
                status=JobStatus.CANCELLED, finished_at=utcnow(), phase=JobStatus.CANCELLED,
                message="cancelled (its worker stopped responding)",
            )
            bucket = failed
        elif attempt < max_attempts:
            values = dict(
                status=JobStatus.QUEUED, phase=JobStatus.QUEUED, progress=0.0,
                message=f"re-queued: the worker of attempt {attempt} stopped responding",
                enqueued_at=utcnow(),
            )
            bucket = requeued
        else:
            values = dict(
                status=JobStatus.FAILED, finished_at=utcnow(), phase=JobStatus.FAILED,
                error=(
                    f"the worker stopped responding {attempt} time(s) (killed by the hard time "
                    "limit, out of host memory, or the host went down); try a smaller "
                    "calibration_samples/batch_size or a longer time limit"
                ),
            )
            bucket = failed
        changed = session.execute(
            update(Job).where(*guard).values(**values).execution_options(synchronize_session=False)
        ).rowcount
        if changed:
            bucket.append(job_id)
    session.commit()
    return requeued, failed
