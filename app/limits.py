"""Per-user limits: the storage quota (413) and the per-key request rate (429).

Both take the user's own value when an administrator set one (`mipp admin quota`), else the
server's default (settings `storage_quota_bytes`, `requests_per_minute`); 0 means no limit.
"""

from __future__ import annotations

import math
import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.jobs import lock_row
from app.errors import RateLimited, StorageQuotaExceeded
from app.models import Artifact, Dataset, Job, ModelFile, User


def effective(user_value: int | None, default: int) -> int:
    return default if user_value is None else user_value


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------
# Storage


def storage_used(session: Session, user_id: str) -> int:
    """Bytes the user keeps in the store: live models' and datasets' files and their jobs'
    artifacts (soft-deleted inputs no longer hold a file)."""
    total = 0
    for stmt in (
        select(func.sum(ModelFile.size_bytes)).where(ModelFile.owner_id == user_id,
                                                     ModelFile.deleted_at.is_(None)),
        select(func.sum(Dataset.size_bytes)).where(Dataset.owner_id == user_id,
                                                   Dataset.deleted_at.is_(None)),
        select(func.sum(Artifact.size_bytes)).join(Job, Job.id == Artifact.job_id)
        .where(Job.owner_id == user_id),
    ):
        total += int(session.scalar(stmt) or 0)
    return total


def check_storage_quota(session: Session, user: User, settings, adding: int) -> None:
    """Raise StorageQuotaExceeded (413) when `adding` bytes would put the user above their
    quota. Locks the user's row until the transaction ends, so two concurrent uploads cannot
    both pass on the same free space; call it first in the upload's write transaction."""
    limit = effective(user.storage_quota_bytes, settings.storage_quota_bytes)
    if limit == 0:
        return
    user_id, name = user.id, user.name
    session.rollback()  # the lock must be the transaction's first statement (SQLite)
    lock_row(session, User, user_id)
    used = storage_used(session, user_id)
    if used + adding > limit:
        session.rollback()
        raise StorageQuotaExceeded(
            f"storage quota exceeded: this upload is {human_bytes(adding)} and you already "
            f"keep {human_bytes(used)} of your limit of {human_bytes(limit)} (models, datasets "
            "and job artifacts). Delete models, datasets or jobs you no longer need, or ask an "
            f"administrator to raise it: `mipp admin quota {name} --storage-bytes N` (server "
            "default: MIPP_STORAGE_QUOTA_BYTES)"
        )


# --------------------------------------------------------------------------------------------
# Request rate


class RateLimiter:
    """A token bucket per API key, in this process's memory: each key may burst one minute's
    worth of requests, refilled at `per_minute / 60` per second. With several API processes
    each keeps its own buckets (the limit is per process)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: str, per_minute: int) -> float | None:
        """Spend one token: None when the request may go, else the seconds until it could."""
        if per_minute <= 0:
            return None
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


_limiter_lock = threading.Lock()


def rate_limiter(state) -> RateLimiter:
    """The app's limiter (`app.state.rate_limiter`), made on first use."""
    limiter = getattr(state, "rate_limiter", None)
    if limiter is None:
        with _limiter_lock:
            limiter = getattr(state, "rate_limiter", None)
            if limiter is None:
                limiter = state.rate_limiter = RateLimiter()
    return limiter


def check_rate(state, user: User, key_id: str, settings) -> None:
    """Raise RateLimited (429, Retry-After) when this key is over its request rate."""
    per_minute = effective(user.requests_per_minute, settings.requests_per_minute)
    wait_s = rate_limiter(state).take(key_id, per_minute)
    if wait_s is not None:
        retry = max(1, math.ceil(wait_s))
        raise RateLimited(
            f"rate limit: this API key may send {per_minute} requests per minute (per API "
            f"process); retry in {retry} s. An administrator can change it with `mipp admin "
            f"quota {user.name} --requests-per-minute N` (server default: "
            "MIPP_REQUESTS_PER_MINUTE)",
            retry_after_s=retry,
        )
