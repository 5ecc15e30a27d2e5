"""Housekeeping the maintenance round runs: the retention of ended jobs and the garbage
collection of store objects no row refers to (also `mipp admin gc`).

Objects become unreferenced when a delete removed the row but the store delete failed (the
rows go first, by design), when an attempt lost its final write, or when a process died
between writing an object and committing its row. The collection spares what may still get
its row: anything under the prefix of a queued or running job, and anything younger than
`grace_s`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import jobs
from app.db import session_scope
from app.models import Artifact, Dataset, Job, JobStatus, ModelFile
from app.storage import StoreError, job_prefix

log = logging.getLogger("mipp.housekeeping")

STORE_ROOT = "users/"  # every object the service writes lives under users/{uid}/


def referenced_keys(session: Session) -> set[str]:
    """Every store key a row points to (soft-deleted models and datasets hold none)."""
    keys: set[str] = set()
    for stmt in (
        select(ModelFile.store_key).where(ModelFile.deleted_at.is_(None)),
        select(ModelFile.code_store_key).where(ModelFile.deleted_at.is_(None),
                                               ModelFile.code_store_key.is_not(None)),
        select(Dataset.store_key).where(Dataset.deleted_at.is_(None),
                                        Dataset.store_key.is_not(None)),
        select(Artifact.store_key),
    ):
        keys.update(session.scalars(stmt).all())
    return keys


def collect_garbage(session: Session, store, *, grace_s: float) -> list[str]:
    """Delete the store objects under users/ that no row refers to, except those under an
    active job's prefix or written less than `grace_s` ago; returns the keys deleted.

    The rows are read before the store is listed: an object whose row commits after that
    read is younger than the grace period (when it is not too short), so it is kept."""
    referenced = referenced_keys(session)
    active = [job_prefix(owner, job_id) + "/" for job_id, owner in session.execute(
        select(Job.id, Job.owner_id).where(Job.status.in_(JobStatus.ACTIVE))).all()]
    session.commit()
    cutoff = time.time() - grace_s
    removed = []
    for key in store.list_keys(STORE_ROOT):
        if key in referenced or any(key.startswith(prefix) for prefix in active):
            continue
        written = store.modified_at(key)
        if written is None or written > cutoff:
            continue
        store.delete(key)
        removed.append(key)
    if removed:
        log.warning("garbage collection: removed %d unreferenced object(s)", len(removed))
    return removed


def delete_job_files(store, prefixes: list[str]) -> None:
    """Remove the files of deleted jobs; a failure leaves them to the garbage collection."""
    for prefix in prefixes:
        try:
            store.delete_prefix(prefix)
        except StoreError as exc:
            log.warning("could not remove %s (the garbage collection will): %s", prefix, exc)


@dataclass
class Housekeeping:
    """What one call of `run` did."""

    deleted_jobs: list[str] = field(default_factory=list)
    removed_objects: list[str] = field(default_factory=list)


class Housekeeper:
    """Runs retention every call and the garbage collection every `gc_interval_s` (it lists
    the whole store), the first one an interval after this process started."""

    def __init__(self) -> None:
        self.last_gc = time.monotonic()

    def run(self, sessionmaker, store, settings) -> Housekeeping:
        done = Housekeeping()
        if settings.job_retention_days > 0:
            with session_scope(sessionmaker) as session:
                prefixes = jobs.delete_expired_jobs(
                    session, older_than_s=settings.job_retention_days * 86400)
            delete_job_files(store, prefixes)
            done.deleted_jobs = [p.rsplit("/", 1)[-1] for p in prefixes]
        now = time.monotonic()
        if settings.gc_interval_s > 0 and now - self.last_gc >= settings.gc_interval_s:
            self.last_gc = now
            with session_scope(sessionmaker) as session:
                done.removed_objects = collect_garbage(session, store,
                                                       grace_s=settings.gc_grace_s)
        return done


housekeeper = Housekeeper()  # one per process: the maintenance round's
