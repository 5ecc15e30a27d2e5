"""Job artifacts in the store: hashing, the attempt key layout, and keeping attempts' logs.

An attempt writes only under `users/{uid}/jobs/{jid}/attempt-{n}/`. The artifact rows that
readers see are added by the conditional final write (app.core.jobs.finish_attempt), so the
files of a stale attempt (one the sweeper gave away) are never pointed to. The logs of
earlier, killed attempts are copied into the finishing writer's own prefix, so a revived
stale attempt that rewrites its log cannot change a file a row points to.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from app.core.scratch import scratch_dir
from app.models import Artifact, Job
from app.storage import StoreError, attempt_prefix, job_prefix

log = logging.getLogger("mipp.artifacts")

CONTENT_TYPES = {
    ".tar.gz": "application/gzip",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
}
LOG_NAME = "log.txt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def content_type(name: str) -> str:
    return next((t for suffix, t in CONTENT_TYPES.items() if name.endswith(suffix)),
                "application/octet-stream")


def store_artifact(store, job_id: str, key: str, path: Path, name: str) -> Artifact:
    """Upload `path` to `key`; returns the (unsaved) row with the file's size and sha256."""
    kind = content_type(name)
    store.put_file(key, path, kind)
    return Artifact(job_id=job_id, name=name, store_key=key, size_bytes=path.stat().st_size,
                    sha256=sha256_file(path), content_type=kind)


def attempt_log_key(owner_id: str, job_id: str, attempt: int) -> str:
    return f"{attempt_prefix(owner_id, job_id, attempt)}/{LOG_NAME}"


def copy_attempt_logs(store, owner_id: str, job_id: str, attempts: range, dest_prefix: str,
                      tmp_dir: Path) -> list[Artifact]:
    """Copy the logs the attempts in `attempts` left (killed ones upload theirs as they run)
    to `dest_prefix/log-attempt-{n}.txt`; returns their rows. A missing log is skipped."""
    rows: list[Artifact] = []
    with scratch_dir(tmp_dir, "job") as tmp:
        for attempt in attempts:
            src = attempt_log_key(owner_id, job_id, attempt)
            local = tmp / f"log-attempt-{attempt}.txt"
            try:
                if not store.exists(src):
                    continue
                store.get_file(src, local)
                rows.append(store_artifact(store, job_id, f"{dest_prefix}/{local.name}", local, local.name))
            except (StoreError, OSError) as exc:
                log.warning("job %s: could not keep the log of attempt %d: %s", job_id, attempt, exc)
    return rows


class SweptLogs:
    """For the sweeper and orphan recovery: when they end a job, keep every attempt's log
    under a prefix of their own (`swept-<random>/`); `discard` removes the copies of a write
    that lost its race."""

    def __init__(self, store, tmp_dir: Path):
        self.store, self.tmp_dir = store, tmp_dir

    def collect(self, session: Session, job_id: str, attempt: int) -> list[Artifact]:
        owner_id = session.scalar(Job.__table__.select().with_only_columns(Job.owner_id)
                                  .where(Job.id == job_id))
        if owner_id is None:
            return []
        dest = f"{job_prefix(owner_id, job_id)}/swept-{uuid.uuid4().hex[:12]}"
        return copy_attempt_logs(self.store, owner_id, job_id, range(1, attempt + 1), dest, self.tmp_dir)

    def discard(self, rows: list[Artifact]) -> None:
        for row in rows:
            try:
                self.store.delete(row.store_key)
            except StoreError:
                log.warning("could not delete %s", row.store_key)
