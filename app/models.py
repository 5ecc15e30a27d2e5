"""ORM tables. Ids are uuid4 hex strings; times are timezone-aware UTC on every backend."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores UTC; returns aware datetimes (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    ACTIVE = (QUEUED, RUNNING)
    FINAL = (SUCCEEDED, FAILED, CANCELLED)
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Per-user overrides of the server's defaults (settings storage_quota_bytes and
    # requests_per_minute); None = the default, 0 = no limit. Set by `mipp admin quota`.
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiKey(Base):
    """An API key; only its sha256 is kept, plus a visible prefix to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship(back_populates="api_keys")


class ModelFile(Base):
    """An uploaded model and its weights in the store: kind "zoo" (a zoo `arch` + config) or
    "code" (the team's own source at `code_store_key`, built by `factory(**factory_kwargs)`
    in a worker's job process only)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20), default="zoo", server_default="zoo")
    arch: Mapped[str] = mapped_column(String(100))
    code_store_key: Mapped[str | None] = mapped_column(String(500), nullable=True)
    factory: Mapped[str | None] = mapped_column(String(300), nullable=True)
    factory_kwargs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    arch_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    input_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    num_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    format: Mapped[str] = mapped_column(String(20))
    store_key: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Soft delete: the stored file is removed and the row leaves the lists, but the jobs
    # that used it keep a readable reference (GET by id still answers, with deleted_at).
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Dataset(Base):
    """An uploaded .npz (kind "npz") or a reference to a built-in dataset (kind "builtin")."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    builtin_name: Mapped[str | None] = mapped_column(String(50), nullable=True)
    store_key: Mapped[str | None] = mapped_column(String(500), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # How the engine prepares inputs: {"kind": "none" | "standardize"} or given
    # {"kind": "given", "mean", "std", "scale"}; None on rows from before it was recorded.
    preprocessing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Soft delete: the stored file is removed and the row leaves the lists, but the jobs
    # that used it keep a readable reference (GET by id still answers, with deleted_at).
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    """A pruning job. This row, not Celery's result backend, is the job's state."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
        Index("ix_jobs_owner_status_created", "owner_id", "status", "created_at"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        # The retention query of every maintenance round: ended jobs by finished_at.
        Index("ix_jobs_status_finished", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), nullable=True, index=True
    )
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True, index=True
    )
    sweep_id: Mapped[str | None] = mapped_column(
        ForeignKey("sweeps.id", ondelete="SET NULL"), nullable=True, index=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(100))
    time_limit_s: Mapped[int] = mapped_column(Integer)

    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    phase: Mapped[str] = mapped_column(String(50), default=JobStatus.QUEUED)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # the whole job, 0-1
    phase_progress: Mapped[float] = mapped_column(Float, default=0.0)  # within `phase`, 0-1
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # left in `phase`
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The running attempt's job process on `worker`'s host: a restarted worker re-queues the
    # jobs of its node whose process is gone at once (app.core.jobs.requeue_orphans).
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    masks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The tol the selection used (chosen by the search when the job gave a target), and the
    # units per layer {name: {"before", "after"}}: first-class, not buried in layer details.
    tol: Mapped[float | None] = mapped_column(Float, nullable=True)
    layer_units: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    layers: Mapped[list[JobLayer]] = relationship(
        cascade="all, delete-orphan", order_by="JobLayer.position"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        cascade="all, delete-orphan", order_by="Artifact.name"
    )


class Sweep(Base):
    """One submission of several targets/tols x methods x seeds; its jobs carry `sweep_id`."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), nullable=True
    )
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the submitted body, minus the ids
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    jobs: Mapped[list[Job]] = relationship(order_by="Job.created_at")


class JobLogLine(Base):
    """One line of a job's log, written by the worker as it runs (read by GET /jobs/{id}/log).

    The complete log is also kept as the artifact log.txt when the job ends."""

    __tablename__ = "job_log_lines"
    __table_args__ = (Index("ix_job_log_lines_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    line: Mapped[str] = mapped_column(Text)


class JobLayer(Base):
    """Per-layer result of a finished job: widths before/after and the MI-loss figures."""

    __tablename__ = "job_layers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(300))
    units_before: Mapped[int] = mapped_column(Integer)
    units_after: Mapped[int] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Artifact(Base):
    """A file a job produced, kept in the store under the job's key prefix."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    store_key: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
