"""Configuration: one typed object per run, shared by the CLI, the API schema and the worker.

Every default here is a choice documented in docs/engine.md (and ../shared/mipp-spec.md).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from mipp.method_registry import method_names

# Devices a run may name: torch accepts more ("meta", "xla", ...), but the engine then fails
# deep inside a run; refuse them here with the list.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
# Frozen, unknown fields refused, and NaN/Infinity refused: every bound below compares false
# with NaN, and inf would pass a lower bound only.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
ALLOCATION_PATTERN = re.compile(r"auto|counts|uniform|global|from:[A-Za-z0-9_-]{1,64}")


def __getattr__(name: str):
    # METHODS is read from the registry when asked for, so a method registered after this
    # module was imported is listed too.
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module 'mipp.config' has no attribute {name!r}")


def _known_method(value: str) -> str:
    if value not in method_names():
        raise ValueError(f"method {value[:64]!r} is not one of {', '.join(method_names())}")
    return value


def _method_enum(schema: dict) -> None:
    schema["enum"] = list(method_names())


# A method name, checked against the registry when a config is validated (not when this module
# is imported), with the registry's names as the JSON schema's enum.
MethodName = Annotated[str, AfterValidator(_known_method), Field(json_schema_extra=_method_enum)]


class TrainConfig(BaseModel):
    """Training or retraining settings."""

    model_config = _STRICT

    epochs: int = Field(3, ge=0, le=10_000, description="Passes over the training set.")
    batch_size: int = Field(128, ge=1, le=65_536, description="Samples per step.")
    optimizer: Literal["sgd", "adam"] = Field("adam", description="sgd or adam.")
    lr: float = Field(1e-3, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 weight decay.")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "cosine", description="Learning-rate schedule over the epochs.")


class ReconstructorConfig(BaseModel):
    """The small MLPs that estimate loss reduction (MI) between adjacent layers."""

    model_config = _STRICT

    hidden_cap: int = Field(
        256, ge=1, le=65_536, description="Hidden width = min(2*d_out, hidden_cap).")
    lr: float = Field(3e-3, gt=0, le=10, description="Adam learning rate of the reconstructors.")
    batch_size: int = Field(256, ge=8, le=65_536, description="Calibration rows per step.")
    epochs: int = Field(100, ge=1, le=10_000, description="Budget of the reference fit (spec step 6).")
    finetune_epochs: int = Field(
        12, ge=1, le=10_000, description="Budget of the control and each masked fine-tune "
        "(step 7).")
    finetune_batch_size: int | None = Field(
        512, ge=8, le=65_536, description="Rows per step of the control and the masked "
        "fine-tunes (None: batch_size).")
    patience: int = Field(3, ge=1, le=10_000, description="Early-stopping patience on validation loss.")
    ordering_epochs: int = Field(
        10, ge=1, le=10_000, description="Budget of the single-unit predictors.")
    min_delta: float = Field(
        0.01, ge=0, lt=1, description="Early stopping counts an epoch as an improvement only "
        "when it lowers the validation loss by more than this fraction (0: any decrease).")
    linear_below: int = Field(
        0, ge=0, le=1_000_000, description="Layers with at most this many units get linear "
        "reconstructors (no ReLU; 0: none).")
    logits_loss: Literal["mse", "ce"] = Field(
        "mse", description="Loss of the last hidden layer's reconstructors: MSE on the "
        "standardised logits, or cross-entropy on the network's class probabilities.")
    compensate: bool = Field(
        True, description="Start each masked fine-tune from a least-squares compensation.")
    conv_grid: int = Field(
        1, ge=1, le=8, description="Summarise each conv channel by its means over a "
        "conv_grid x conv_grid grid of spatial cells (1: one spatial mean), for its own layer's "
        "tests and as the target of the layer below.")
    screen_keep: float = Field(
        3.0, ge=0, le=1e6, description="Keep a unit without fine-tune when its compensated "
        "loss increase exceeds this multiple of the threshold (0: always fine-tune).")


class PruneConfig(BaseModel):
    """Everything `mipp.prune` needs besides the model and the data.

    `confidence` is the paper's x; `tol` the effect-size tolerance (a fraction of the layer's
    estimated MI that removing a unit may cost); `target` a fraction of units to remove overall,
    reached by searching `tol` (MIPP) or used directly (baselines).
    """

    model_config = _STRICT

    method: MethodName = Field(
        "mipp", description="Selection method: mipp or a baseline (the registry's names: "
        "mipp.method_registry.method_names()).")
    allocation: str = Field(
        "auto", description="How many units each layer keeps: auto, counts, uniform, global or "
        "from:<method> (docs/engine.md, Methods and allocation).")
    counts: dict[str, Annotated[int, Field(ge=1, le=10_000_000)]] | None = Field(
        None, max_length=10_000, description="Units to keep per layer, for allocation counts.")
    mode: Literal["after-training", "at-init"] = Field(
        "after-training", description="Prune a trained model, or at initialisation (then train).")
    confidence: float = Field(0.9, gt=0, lt=1, description="Confidence of the keep test (the paper's x).")
    tol: float = Field(0.05, ge=0, le=100, description="Fraction of a layer's estimated MI that "
                       "removing a unit may cost (MIPP); ignored when `target` is set.")
    target: float | None = Field(None, gt=0, lt=1, description="Fraction of units to remove "
                                 "overall: MIPP searches tol for it; baselines use it directly.")
    repeats: int = Field(5, ge=2, le=64, description="Reconstructors per decision (R).")
    min_units: int = Field(
        1, ge=1, le=1_000_000, description="Never prune a layer below this many units.")
    test: Literal["t", "null-unit"] = Field(
        "t", description="Keep test: one-sided Student t, or the authors' null-unit rule.")
    tol_scale: Literal["mi", "reference"] = Field(
        "mi", description="tol scales the layer's estimated MI, or the reference loss.")
    control: bool = Field(True, description="Fine-tune the reference unmasked as the baseline of "
                          "each decision (without it every unit looks removable).")
    std_floor: float = Field(
        0.1, ge=0, le=1e6, description="Column std floor, x the layer's median std.")
    calibration_samples: int = Field(
        5120, ge=64, le=10_000_000, description="Training rows whose activations the estimator uses.")
    val_fraction: float = Field(0.2, gt=0, lt=0.9, description="Share of those rows for early stopping.")
    reconstructor: ReconstructorConfig = Field(
        ReconstructorConfig(), description="The estimator's reconstructor MLPs.")
    path: Literal["fast", "sequential"] = Field(
        "fast", description="fast: blocks of candidates batched with exact speculation; "
        "sequential: one at a time (the reference).")
    speculation: Literal["auto", "prune", "keep", "off"] = Field(
        "auto", description="What the fast path assumes of a block's candidates.")
    block_size: int | None = Field(
        None, ge=1, le=256, description="Candidates per batched block (fast path); None: 2 on "
        "the CPU (fits are compute-bound there, so speculation that goes stale costs its full "
        "price), 8 on an accelerator.")
    refit: bool = Field(True, description="Least-squares refit of the next layer after removal.")
    retrain: TrainConfig = Field(
        TrainConfig(epochs=1), description="Retraining after pruning (epochs 0: none).")
    ignored_layers: tuple[str, ...] = Field(
        (), max_length=10_000, description="Layer names never pruned.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed of the whole run.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device {value[:40]!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, value: str) -> str:
        if not ALLOCATION_PATTERN.fullmatch(value):
            raise ValueError(f"allocation {value[:70]!r} is not one of auto, counts, uniform, "
                             "global, from:<method>")
        source = value.removeprefix("from:")
        if value.startswith("from:") and source not in method_names():
            raise ValueError(f"allocation {value!r}: {source!r} is not a method; use from: "
                             f"one of {', '.join(method_names())}")
        return value

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        rule = self.allocation
        if self.counts is not None and rule not in ("auto", "counts"):
            raise ValueError(f"counts are given but allocation is {rule!r}; set allocation "
                             "'counts' (or 'auto'), or drop counts")
        if rule == "counts" and self.counts is None:
            raise ValueError("allocation 'counts' needs `counts` (units to keep per layer, "
                             'e.g. {"fc1": 30, "fc2": 10})')
        if rule in ("uniform", "global") and self.target is None:
            raise ValueError(f"allocation {rule!r} needs `target` (fraction of units to "
                             "remove, 0-1)")
        source = rule.removeprefix("from:") if rule.startswith("from:") else None
        if source is not None and source != "mipp" and self.target is None:
            raise ValueError(f"allocation {rule!r} needs `target`: {source!r} sets its "
                             "per-layer counts from it; only `mipp` can choose its own ratio")
        if self.method != "mipp" and self.target is None and self.counts is None \
                and source is None:
            raise ValueError(
                f"method {self.method!r} needs `target` (fraction of units to remove, 0-1), "
                "`counts`, or allocation 'from:mipp'; only `mipp` can choose its own ratio"
            )
        return self
