"""Configuration: one typed object per run, shared by the CLI, the API schema and the worker.

Every default here is a choice documented in docs/engine.md (and ../shared/mipp-spec.md).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHODS = ("mipp", "random", "l1", "taylor", "thinet", "snip", "grasp", "synflow")
# Devices a run may name: torch accepts more ("meta", "xla", ...), but the engine then fails
# deep inside a run; refuse them here with the list.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
# Frozen, unknown fields refused, and NaN/Infinity refused: every bound below compares false
# with NaN, and inf would pass a lower bound only.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainConfig(BaseModel):
    """Training or retraining settings."""

    model_config = _STRICT

    epochs: int = Field(3, ge=0, le=10_000, description="Passes over the training set.")
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: Literal["constant", "cosine", "step"] = "cosine"


class ReconstructorConfig(BaseModel):
    """The small MLPs that estimate loss reduction (MI) between adjacent layers."""

    model_config = _STRICT

    hidden_cap: int = Field(
        256, ge=1, le=65_536, description="Hidden width = min(2*d_out, hidden_cap).")
    lr: float = Field(3e-3, gt=0, le=10)
    batch_size: int = Field(256, ge=8, le=65_536)
    epochs: int = Field(100, ge=1, le=10_000, description="Budget of the reference fit (spec step 6).")
    finetune_epochs: int = Field(
        25, ge=1, le=10_000, description="Budget of each masked fine-tune (step 7).")
    patience: int = Field(3, ge=1, le=10_000, description="Early-stopping patience on validation loss.")
    ordering_epochs: int = Field(
        30, ge=1, le=10_000, description="Budget of the single-unit predictors.")


class PruneConfig(BaseModel):
    """Everything `mipp.prune` needs besides the model and the data.

    `confidence` is the paper's x; `tol` the effect-size tolerance (a fraction of the layer's
    estimated MI that removing a unit may cost); `target` a fraction of units to remove overall,
    reached by searching `tol` (MIPP) or used directly (baselines).
    """

    model_config = _STRICT

    method: Literal[METHODS] = "mipp"  # type: ignore[valid-type]
    mode: Literal["after-training", "at-init"] = "after-training"
    confidence: float = Field(0.9, gt=0, lt=1)
    tol: float = Field(0.05, ge=0, le=100)
    target: float | None = Field(None, gt=0, lt=1)
    repeats: int = Field(5, ge=2, le=64)
    min_units: int = Field(
        1, ge=1, le=1_000_000, description="Never prune a layer below this many units.")
    test: Literal["t", "null-unit"] = "t"
    tol_scale: Literal["mi", "reference"] = "mi"
    control: bool = True
    std_floor: float = Field(
        0.1, ge=0, le=1e6, description="Column std floor, x the layer's median std.")
    calibration_samples: int = Field(5120, ge=64, le=10_000_000)
    val_fraction: float = Field(0.2, gt=0, lt=0.9)
    reconstructor: ReconstructorConfig = ReconstructorConfig()
    path: Literal["fast", "sequential"] = "fast"
    speculation: Literal["auto", "prune", "keep", "off"] = "auto"
    block_size: int = Field(8, ge=1, le=256)
    refit: bool = True
    retrain: TrainConfig = TrainConfig(epochs=1)
    ignored_layers: tuple[str, ...] = Field((), max_length=10_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device {value[:40]!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.method != "mipp" and self.target is None:
            raise ValueError(
                f"method {self.method!r} needs `target` (fraction of units to remove, 0-1); "
                "only `mipp` can choose its own ratio"
            )
        return self
