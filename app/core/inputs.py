"""Deleting a model or a dataset without racing a submit that uses it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.jobs import lock_row
from app.core.errors import Conflict, NotFound
from app.models import Job, JobStatus, utcnow


def delete_unless_in_use(session: Session, store, row, job_column, what: str) -> None:
    """Delete an uploaded model/dataset (soft: the row stays, marked `deleted_at`, for the
    history of its jobs) and its stored file, unless an active job uses it.

    The row is locked first (FOR UPDATE; SQLite: the database write lock), which waits for a
    submit holding it (FOR SHARE) to commit: that submit's job is then seen here and the
    delete answers 409. The row goes first (committed), then the file: a failed store delete
    leaves an orphan file, never a row that points at nothing.
    """
    cls, row_id, key = type(row), row.id, row.store_key
    session.rollback()  # the lock must be this transaction's first statement
    try:
        if not lock_row(session, cls, row_id):
            raise NotFound(f"{what} {row_id!r} not found")
        active = session.scalar(
            select(Job.id).where(job_column == row_id, Job.status.in_(JobStatus.ACTIVE)).limit(1)
        )
        if active:
            raise Conflict(f"{what} {row_id!r} is used by active job {active!r}; cancel it first")
        live = session.get(cls, row_id, populate_existing=True)
        if live.deleted_at is not None:
            raise NotFound(f"{what} {row_id!r} was already deleted")
        # Soft delete: the jobs that used it keep a readable reference (name, arch, summary).
        live.deleted_at = utcnow()
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if key:
        store.delete(key)
