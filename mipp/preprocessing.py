"""Preprocessing as data: how raw inputs become what a model was fed (torch-free to import).

The API process validates a dataset's `preprocessing` field with this module; the engine
applies it (`Preprocessing.apply`, importing torch then) and writes it into model.json and
the ONNX metadata, so a deployed model takes raw inputs.

    parse_preprocessing("standardize")                        # -> "standardize"
    parse_preprocessing({"mean": [0.5], "std": [0.25], "scale": 255})  # -> Preprocessing
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mipp.errors import DataError


def per_sample_view(stat, ndim: int):
    """(C,) -> (1, C, 1, 1) for images, (D,) -> (1, D) for flat batches."""
    return stat.view(1, -1, *([1] * (ndim - 2)))


PREPROCESSING_KINDS = ("none", "standardize", "given")


@dataclass(frozen=True)
class Preprocessing:
    """Raw input -> model input: `x / scale`, then `(x - mean) / std` per channel (images,
    axis 1 of (N, C, H, W)) or per feature ((N, D)); one value broadcasts to every channel.

    kind: "none" (values as uploaded), "standardize" (statistics computed on the training
    set) or "given" (the user's own mean/std/scale). `as_dict`/`from_dict` are the JSON form
    written into model.json and the ONNX metadata.
    """

    kind: str = "none"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, info: dict[str, Any] | None) -> Preprocessing:
        if not info:
            return cls()
        return cls(kind=str(info.get("kind", "given")), scale=float(info.get("scale", 1.0)),
                   mean=tuple(float(v) for v in info.get("mean", (0.0,))),
                   std=tuple(float(v) for v in info.get("std", (1.0,))))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and all(m == 0 for m in self.mean) and \
            all(s == 1 for s in self.std)

    def apply(self, x_raw):
        """Raw inputs (N, *input_shape), array or tensor -> float32 model inputs (a tensor)."""
        import torch

        x = torch.as_tensor(np.asarray(x_raw) if not isinstance(x_raw, torch.Tensor) else x_raw)
        x = x.to(torch.float32)
        if self.is_identity:
            return x
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
        return (x / self.scale - per_sample_view(mean, x.ndim)) / per_sample_view(std, x.ndim)


def parse_preprocessing(value: str | dict | Preprocessing | None,
                        field: str = "preprocessing") -> str | Preprocessing:
    """"none" | "standardize" | {"mean": [...], "std": [...], "scale": s} -> "none",
    "standardize" or a given Preprocessing. Raises DataError naming `field` and the fix."""
    if value is None:
        return "none"
    if isinstance(value, Preprocessing):
        return value
    if isinstance(value, str):
        if value in ("none", "standardize"):
            return value
        raise DataError(f"{field} must be 'none', 'standardize' or an object "
                        f'{{"mean": [...], "std": [...], "scale": 255}}, got {value!r}')
    if not isinstance(value, dict):
        raise DataError(f"{field} must be 'none', 'standardize' or an object with mean/std/scale")
    if value.get("kind") in ("none", "standardize") and set(value) == {"kind"}:
        return value["kind"]  # the stored form of the two named kinds
    unknown = sorted(set(value) - {"mean", "std", "scale", "kind"})
    if unknown:
        raise DataError(f"{field} has unknown key(s) {', '.join(unknown)}; "
                        "use mean, std and scale")

    def numbers(key: str, default: list[float]) -> tuple[float, ...]:
        raw = value.get(key, default)
        raw = [raw] if isinstance(raw, int | float) else raw
        if not isinstance(raw, list | tuple) or not raw or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
                for v in raw):
            raise DataError(f"{field}.{key} must be a number or a list of numbers (one per "
                            f"channel/feature), got {raw!r}")
        return tuple(float(v) for v in raw)
    mean, std = numbers("mean", [0.0]), numbers("std", [1.0])
    scale = numbers("scale", [1.0])
    if len(scale) != 1 or scale[0] <= 0:
        raise DataError(f"{field}.scale must be one positive number (e.g. 255), got {scale}")
    if any(v <= 0 for v in std):
        raise DataError(f"{field}.std must be positive, got {list(std)}")
    return Preprocessing(kind="given", scale=scale[0], mean=mean, std=std)


def stored_form(value: str | Preprocessing) -> dict[str, Any]:
    """What a service row keeps: {"kind": "none" | "standardize"} or a given one's dict."""
    return {"kind": value} if isinstance(value, str) else value.as_dict()


def check_preprocessing_fits(prep: Preprocessing, input_shape: tuple[int, ...],
                             field: str = "preprocessing") -> None:
    """Raise DataError unless mean/std have 1 value or one per channel/feature."""
    channels = input_shape[0]
    for key in ("mean", "std"):
        values = getattr(prep, key)
        if len(values) not in (1, channels):
            raise DataError(f"{field}.{key} has {len(values)} values but the samples have "
                            f"{channels} {'channels' if len(input_shape) > 1 else 'features'}; "
                            f"give 1 value or {channels}")
