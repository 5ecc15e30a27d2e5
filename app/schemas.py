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


class ErrorField(BaseModel):
    """One bad field of a refused request."""

    loc: list[str | int] = Field(description='Where: e.g. ["body", "config", "tol"].')
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="Pydantic's error type, e.g. finite_number.")


class ErrorOut(BaseModel):
    """Every error answer (4xx and 5xx) has this shape."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "invalid request: config.tol: Input should be a finite number",
         "code": "validation_error",
         "errors": [{"loc": ["body", "config", "tol"], "msg": "Input should be a finite number",
                     "type": "finite_number"}]},
        {"detail": "invalid or revoked API key", "code": "unauthorized"},
    ]})

    detail: str = Field(description="What went wrong and how to fix it, in one message.")
    code: str = Field(description="A stable machine-readable code, e.g. not_found, conflict, "
                      "validation_error, storage_quota_exceeded, rate_limited.")
    errors: list[ErrorField] | None = Field(
        None, description="Validation errors only: one entry per bad field.")


class Page(BaseModel, Generic[T]):
    items: list[T] = Field(description="This page's items, newest first.")
    total: int = Field(description="Items matching the query, over all pages.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Items skipped before this page.")


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Id: 32 hex characters.")
    name: str = Field(description="Unique user name.")
    is_admin: bool = Field(description="Admins see every user's models, datasets and jobs.")
    created_at: datetime = Field(description="When the user was created (UTC).")
    storage_quota_bytes: int | None = Field(
        None, description="Your storage limit in bytes (0: none): this user's own value, else "
        "the server's default.")
    storage_used_bytes: int | None = Field(
        None, description="Bytes you keep: models, datasets and job artifacts.")
    requests_per_minute: int | None = Field(
        None, description="Your API key's request rate limit (0: none), per API process.")


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Id: 32 hex characters.")
    owner_id: str = Field(description="Id of the user who uploaded it.")
    name: str = Field(description="Display name (default: the file name).")
    kind: Literal["zoo", "code"] = Field(
        "zoo", description="zoo: a built-in architecture; code: the team's own source.")
    arch: str = Field(description="The zoo architecture, or a code model's factory.")
    arch_config: dict[str, Any] = Field(description='Zoo config, e.g. {"widths": [64, 32]}.')
    factory: str | None = Field(None, description="Code models: module:function building it.")
    factory_kwargs: dict[str, Any] | None = Field(
        None, description="Code models: the factory's keyword arguments.")
    input_shape: list[int] | None = Field(description="Per-sample input shape, e.g. [64].")
    num_classes: int | None = Field(description="Number of output classes.")
    format: str = Field(description="Weights format: safetensors or pt (a state_dict).")
    size_bytes: int = Field(description="Size of the weights file.")
    sha256: str = Field(description="sha256 of the weights file (hex).")
    summary: dict[str, Any] = Field(description="What the upload checks read: tensors and "
                                    "their shapes, code modules.")
    created_at: datetime = Field(description="Upload time (UTC).")
    deleted_at: datetime | None = Field(
        None, description="Set once deleted: the file is gone and the model is out of the "
        "lists, but this row stays readable for the jobs that used it.")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Id: 32 hex characters.")
    owner_id: str = Field(description="Id of the user who added it.")
    name: str = Field(description="Display name (default: the file name).")
    kind: Literal["npz", "builtin"] = Field(description="npz: uploaded; builtin: the server's.")
    builtin_name: str | None = Field(description="The built-in dataset's name (kind builtin).")
    size_bytes: int = Field(description="Size of the uploaded .npz (0 for a built-in).")
    sha256: str | None = Field(description="sha256 of the uploaded .npz (hex).")
    summary: dict[str, Any] = Field(description="input_shape, num_classes, sample counts.")
    preprocessing: dict[str, Any] | None = Field(
        None, description="How the engine prepares inputs: kind none | standardize | given "
        "(with mean, std, scale). Recorded in every model a job writes."
    )
    created_at: datetime = Field(description="Upload time (UTC).")
    deleted_at: datetime | None = Field(
        None, description="Set once deleted: the file is gone, the row stays for its jobs.")


class BuiltinDatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal[BUILTIN_DATASETS] = Field(description="A dataset the engine ships a loader for.")  # type: ignore[valid-type]
    display_name: str | None = Field(None, max_length=200,
                                     description="Name shown in lists (default: `name`).")


class JobIn(BaseModel):
    """A pruning job: which model, which data, and the engine's PruneConfig."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "dataset_id":
         "00112233445566778899aabbccddeeff", "config": {"target": 0.5},
         "idempotency_key": "nightly-2026-12-01"},
    ]})

    model_id: str = Field(description="The model to prune (POST /models).")
    dataset_id: str = Field(description="Its data (POST /datasets or /datasets/builtin).")
    config: PruneConfig = Field(PruneConfig(), description="The engine's settings; every "
                                "field is optional.")
    queue: str | None = Field(None, description="GPU class queue; default: the server's.")
    time_limit_s: int | None = Field(
        None, ge=1, description="Soft time limit for this job, at most the server's limit."
    )
    idempotency_key: str | None = Field(
        None, max_length=100, description="Submitting twice with the same key returns one job."
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Id: 32 hex characters.")
    owner_id: str = Field(description="Id of the user who submitted it.")
    model_id: str | None = Field(description="The model (still readable by id once deleted).")
    dataset_id: str | None = Field(description="The dataset (readable by id once deleted).")
    sweep_id: str | None = Field(None, description="The sweep this job belongs to, if any.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="queued, running, then succeeded, failed or cancelled.")
    phase: str = Field(description="What it is doing: queued, loading, selecting, refitting, "
                       "retraining, evaluating, saving, or its final status.")
    progress: float = Field(description="Whole job, 0-1 (phases weighted by their usual cost).")
    phase_progress: float = Field(0.0, description="Within the current phase, 0-1.")
    eta_s: float | None = Field(
        None, description="Seconds left in the current phase, from its rate so far; null "
        "until it can be estimated."
    )
    message: str = Field(description="The latest progress message.")
    error: str | None = Field(description="Why it failed, and what to change.")
    attempt: int = Field(description="Runs so far (a worker death re-queues the job).")
    cancel_requested: bool = Field(description="A cancel was asked for.")
    queue: str = Field(description="The GPU-class queue it runs on.")
    time_limit_s: int = Field(description="Its soft time limit.")
    config: dict[str, Any] = Field(description="The engine's PruneConfig, as submitted.")
    idempotency_key: str | None = Field(description="The key it was submitted with.")
    worker: str | None = Field(description="The worker node running (or that ran) it.")
    created_at: datetime = Field(description="Submitted (UTC).")
    enqueued_at: datetime | None = Field(description="Its message was sent to the queue.")
    started_at: datetime | None = Field(description="A worker claimed it.")
    heartbeat_at: datetime | None = Field(description="The worker's latest sign of life.")
    finished_at: datetime | None = Field(description="It ended.")
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

    position: int = Field(description="Forward order, from 0.")
    name: str = Field(description="The layer (group) name.")
    units_before: int = Field(description="Units (neurons, filters) before pruning.")
    units_after: int = Field(description="Units kept.")
    details: dict[str, Any] = Field(description="MI-loss figures from the engine, per layer.")


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="File name, e.g. model.tar.gz, report.json, log.txt.")
    size_bytes: int = Field(description="Size in bytes.")
    sha256: str = Field(description="sha256 of the file (hex).")
    content_type: str = Field(description="Its media type, as the download sends it.")
    created_at: datetime = Field(description="Written (UTC).")
    url: str = Field(description="Download path (authenticated GET).")


class SweepIn(BaseModel):
    """Several jobs from one submission: every method x (target or tol) x seed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "dataset_id":
         "00112233445566778899aabbccddeeff", "targets": [0.3, 0.5, 0.7],
         "methods": ["mipp", "l1"]},
    ]})

    model_id: str = Field(description="The model every job prunes.")
    dataset_id: str = Field(description="Its data.")
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
    queue: str | None = Field(None, description="GPU class queue; default: the server's.")
    time_limit_s: int | None = Field(None, ge=1, description="Soft time limit of each job.")
    name: str | None = Field(None, max_length=200, description="Default: model, methods and knob.")


class SweepRow(BaseModel):
    """One job of a sweep, with the figures the sweep's table and plot show."""

    job_id: str = Field(description="The child job.")
    method: str = Field(description="Its selection method.")
    target: float | None = Field(description="Its target fraction (null with tols).")
    tol: float | None = Field(description="The tol the job used (chosen by a target search).")
    seed: int = Field(description="Its seed.")
    status: str = Field(description="Its status.")
    phase: str = Field(description="Its phase.")
    progress: float = Field(description="Its progress, 0-1.")
    error: str | None = Field(description="Why it failed.")
    units_removed_fraction: float | None = Field(description="Share of units removed.")
    params_before: int | None = Field(description="Parameters of the dense model.")
    params_after: int | None = Field(description="Parameters after pruning.")
    macs_before: int | None = Field(description="Multiply-accumulates per sample, dense.")
    macs_after: int | None = Field(description="Multiply-accumulates per sample, pruned.")
    accuracy_dense: float | None = Field(description="Test accuracy of the dense model.")
    accuracy_pruned: float | None = Field(description="After removal, before the refit.")
    accuracy_refit: float | None = Field(description="After the least-squares refit.")
    accuracy_retrained: float | None = Field(description="After retraining.")


class SweepOut(BaseModel):
    id: str = Field(description="Id: 32 hex characters.")
    owner_id: str = Field(description="Id of the user who submitted it.")
    name: str = Field(description="Its name.")
    model_id: str | None = Field(description="The model its jobs prune.")
    dataset_id: str | None = Field(description="Their data.")
    spec: dict[str, Any] = Field(description="The submitted body, minus the ids.")
    created_at: datetime = Field(description="Submitted (UTC).")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="running while any job is queued or running; then succeeded if every job "
        "succeeded, else failed (or cancelled if every job was cancelled)."
    )
    counts: dict[str, int] = Field(description="Jobs per status.")
    rows: list[SweepRow] = Field(description="One row per child job.")
    plot_url: str = Field(description="The SVG plot: accuracy vs units removed, params, MACs.")
