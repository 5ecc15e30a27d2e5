"""Request and response bodies. The job-submit body embeds the engine's own `PruneConfig`,
so the API validates exactly the fields the engine uses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mipp.config import PruneConfig

T = TypeVar("T")

# The engine's built-in datasets (mipp.data.list_datasets); listed here because importing
# mipp.data would import torch into the API process.
BUILTIN_DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist", "mnist")
MODEL_FORMATS = ("safetensors", "pt")
MAX_CLASSES = 10_000  # as mipp.npz.validate_npz's default max_classes
# The engine's zoo (mipp.zoo.list_architectures), for the same reason; a test keeps both in sync.
ZOO_ARCHITECTURES = (
    "lenet5", "mlp", "resnet18", "resnet20", "resnet56", "vgg11", "vgg16", "vgg19",
)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    is_admin: bool
    created_at: datetime


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str
    name: str
    arch: str
    arch_config: dict[str, Any]
    input_shape: list[int] | None
    num_classes: int | None
    format: str
    size_bytes: int
    sha256: str
    summary: dict[str, Any]
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str
    name: str
    kind: Literal["npz", "builtin"]
    builtin_name: str | None
    size_bytes: int
    sha256: str | None
    summary: dict[str, Any]
    created_at: datetime


class BuiltinDatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal[BUILTIN_DATASETS] = Field(description="A dataset the engine ships a loader for.")  # type: ignore[valid-type]
    display_name: str | None = Field(None, max_length=200)


class JobIn(BaseModel):
    """A pruning job: which model, which data, and the engine's PruneConfig."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    dataset_id: str
    config: PruneConfig = PruneConfig()
    queue: str | None = Field(None, description="GPU class queue; default: the server's.")
    time_limit_s: int | None = Field(
        None, ge=1, description="Soft time limit for this job, at most the server's limit."
    )
    idempotency_key: str | None = Field(
        None, max_length=100, description="Submitting twice with the same key returns one job."
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    owner_id: str
    model_id: str | None
    dataset_id: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str
    progress: float
    message: str
    error: str | None
    attempt: int
    cancel_requested: bool
    queue: str
    time_limit_s: int
    config: dict[str, Any]
    idempotency_key: str | None
    worker: str | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    metrics: dict[str, Any] | None = Field(
        None, description="accuracy, params, macs, latency_ms, units, seconds (engine figures)."
    )


class LayerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    position: int
    name: str
    units_before: int
    units_after: int
    details: dict[str, Any] = Field(description="MI-loss figures from the engine, per layer.")


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: datetime
    url: str = Field(description="Download path (authenticated GET).")
