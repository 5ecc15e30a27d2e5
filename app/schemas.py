"""Request and response bodies. The job-submit body embeds the engine's own `PruneConfig`,
so the API validates exactly the fields the engine uses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mipp.config import METHODS, PruneConfig

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
    kind: Literal["zoo", "code"] = "zoo"
    arch: str = Field(description="The zoo architecture, or a code model's factory.")
    arch_config: dict[str, Any]
    factory: str | None = None
    factory_kwargs: dict[str, Any] | None = None
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
    preprocessing: dict[str, Any] | None = Field(
        None, description="How the engine prepares inputs: kind none | standardize | given "
        "(with mean, std, scale). Recorded in every model a job writes."
    )
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
    sweep_id: str | None = Field(None, description="The sweep this job belongs to, if any.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str
    progress: float = Field(description="Whole job, 0-1 (phases weighted by their usual cost).")
    phase_progress: float = Field(0.0, description="Within the current phase, 0-1.")
    eta_s: float | None = Field(
        None, description="Seconds left in the current phase, from its rate so far; null "
        "until it can be estimated."
    )
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
    tol: float | None = Field(
        None, description="The tol the selection used: the one a target search chose, or the "
        "configured one; null for baselines."
    )
    layer_units: dict[str, dict[str, int]] | None = Field(
        None, description='Units per layer once the job succeeded: {"fc1": {"before": 64, '
        '"after": 20}, ...}, in forward order.'
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


class SweepIn(BaseModel):
    """Several jobs from one submission: every method x (target or tol) x seed."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    dataset_id: str
    targets: list[float] | None = Field(
        None, min_length=1, max_length=50,
        description="Fractions of units to remove (each in (0, 1)); one job per target.",
    )
    tols: list[float] | None = Field(
        None, min_length=1, max_length=50,
        description="MIPP tolerances (instead of targets); only for method mipp.",
    )
    methods: list[Literal[METHODS]] = Field(  # type: ignore[valid-type]
        ["mipp"], min_length=1, max_length=len(METHODS), description="Selection methods."
    )
    seeds: list[int] = Field([0], min_length=1, max_length=20, description="One job per seed.")
    config: PruneConfig = Field(
        PruneConfig(), description="Every other setting; method, target, tol and seed are "
        "set per job from the lists above."
    )
    queue: str | None = None
    time_limit_s: int | None = Field(None, ge=1, description="Soft time limit of each job.")
    name: str | None = Field(None, max_length=200)


class SweepRow(BaseModel):
    """One job of a sweep, with the figures the sweep's table and plot show."""

    job_id: str
    method: str
    target: float | None
    tol: float | None = Field(description="The tol the job used (chosen by a target search).")
    seed: int
    status: str
    phase: str
    progress: float
    error: str | None
    units_removed_fraction: float | None
    params_before: int | None
    params_after: int | None
    macs_before: int | None
    macs_after: int | None
    accuracy_dense: float | None
    accuracy_pruned: float | None = Field(description="After removal, before the refit.")
    accuracy_refit: float | None = Field(description="After the least-squares refit.")
    accuracy_retrained: float | None


class SweepOut(BaseModel):
    id: str
    owner_id: str
    name: str
    model_id: str | None
    dataset_id: str | None
    spec: dict[str, Any]
    created_at: datetime
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="running while any job is queued or running; then succeeded if every job "
        "succeeded, else failed (or cancelled if every job was cancelled)."
    )
    counts: dict[str, int] = Field(description="Jobs per status.")
    rows: list[SweepRow]
    plot_url: str = Field(description="The SVG plot: accuracy vs units removed, params, MACs.")
