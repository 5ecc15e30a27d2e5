"""The zoo's configurations and the state_dict each architecture expects, without torch.

The API process validates an uploaded model here, at the door: the `config` against the
architecture's schema, and the names and shapes in the weights file's header against what
`mipp.zoo.build_model` would make. `mipp.zoo` builds the modules from the same configs; a test
checks `expected_state_shapes` against `build_model(...).state_dict()` for every architecture.

    expected_state_shapes("mlp", (64,), 10, {"widths": [32]})
    -> {"fc1.weight": (32, 64), "fc1.bias": (32,), "fc2.weight": (10, 32), "fc2.bias": (10,)}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from mipp.errors import ModelError

Shapes = dict[str, tuple[int, ...]]


class _ArchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlpConfig(_ArchConfig):
    widths: tuple[PositiveInt, ...] = Field((300, 100), description="Hidden widths, in order.")


class LeNet5Config(_ArchConfig):
    channels: tuple[PositiveInt, PositiveInt] = Field((6, 16), description="conv1, conv2 outputs.")
    widths: tuple[PositiveInt, PositiveInt] = Field((120, 84), description="fc1, fc2 widths.")


class WidthConfig(_ArchConfig):
    width_mult: float = Field(1.0, gt=0, le=16, description="Multiplies every layer's width.")


def scaled(width: int, mult: float) -> int:
    return max(1, round(width * mult))


def pool_kernel(height: int, width: int) -> tuple[int, int] | None:
    """The zoo's 2x2 max-pool, shrunk to 1 along an axis of size 1; None when both are 1."""
    kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
    return None if kernel == (1, 1) else kernel


VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
RESNET_LAYOUTS: dict[str, tuple[list[int], list[int]]] = {
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet20": ([3, 3, 3], [16, 32, 64]),
    "resnet56": ([9, 9, 9], [16, 32, 64]),
}


# ---------------------------------------------------------------------------------------------
# Expected state_dict shapes per architecture


def _linear(shapes: Shapes, name: str, d_in: int, d_out: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d_out, d_in), (d_out,)


def _conv(shapes: Shapes, name: str, c_in: int, c_out: int, k: int, bias: bool) -> None:
    shapes[f"{name}.weight"] = (c_out, c_in, k, k)
    if bias:
        shapes[f"{name}.bias"] = (c_out,)


def _bn(shapes: Shapes, name: str, c: int) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{key}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()


def _mlp_shapes(shape: tuple[int, ...], classes: int, cfg: MlpConfig) -> Shapes:
    shapes: Shapes = {}
    d_in = math.prod(shape)
    for i, width in enumerate(cfg.widths, start=1):
        _linear(shapes, f"fc{i}", d_in, width)
        d_in = width
    _linear(shapes, f"fc{len(cfg.widths) + 1}", d_in, classes)
    return shapes


def _lenet5_shapes(shape: tuple[int, ...], classes: int, cfg: LeNet5Config) -> Shapes:
    (c_in, height, width), (c1, c2), (w1, w2) = shape, cfg.channels, cfg.widths
    shapes: Shapes = {}
    _conv(shapes, "conv1", c_in, c1, 5, True)
    if (kernel := pool_kernel(height, width)) is not None:
        height, width = height // kernel[0], width // kernel[1]
    pad = (max(0, math.ceil((5 - height) / 2)), max(0, math.ceil((5 - width) / 2)))
    _conv(shapes, "conv2", c1, c2, 5, True)
    height, width = height + 2 * pad[0] - 4, width + 2 * pad[1] - 4
    if (kernel := pool_kernel(height, width)) is not None:
        height, width = height // kernel[0], width // kernel[1]
    _linear(shapes, "fc1", c2 * height * width, w1)
    _linear(shapes, "fc2", w1, w2)
    _linear(shapes, "fc3", w2, classes)
    return shapes


def _vgg_shapes(name: str) -> Callable[..., Shapes]:
    def shapes_of(shape: tuple[int, ...], classes: int, cfg: WidthConfig) -> Shapes:
        (c_in, height, width), shapes, index = shape, {}, 0
        for item in VGG_LAYOUTS[name]:
            if item == "M":
                if (kernel := pool_kernel(height, width)) is not None:
                    height, width = height // kernel[0], width // kernel[1]
                    index += 1
                continue
            c_out = scaled(int(item), cfg.width_mult)
            _conv(shapes, f"features.{index}", c_in, c_out, 3, False)
            _bn(shapes, f"features.{index + 1}", c_out)
            index, c_in = index + 3, c_out
        _linear(shapes, "classifier", c_in, classes)
        return shapes
    return shapes_of


def _resnet_shapes(name: str) -> Callable[..., Shapes]:
    def shapes_of(shape: tuple[int, ...], classes: int, cfg: WidthConfig) -> Shapes:
        blocks, widths = RESNET_LAYOUTS[name]
        widths = [scaled(w, cfg.width_mult) for w in widths]
        shapes: Shapes = {}
        _conv(shapes, "conv1", shape[0], widths[0], 3, False)
        _bn(shapes, "bn1", widths[0])
        c_in = widths[0]
        for stage, (n_blocks, c_out) in enumerate(zip(blocks, widths), start=1):
            for i in range(n_blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                prefix = f"layer{stage}.{i}"
                _conv(shapes, f"{prefix}.conv1", c_in, c_out, 3, False)
                _bn(shapes, f"{prefix}.bn1", c_out)
                _conv(shapes, f"{prefix}.conv2", c_out, c_out, 3, False)
                _bn(shapes, f"{prefix}.bn2", c_out)
                if stride != 1 or c_in != c_out:
                    _conv(shapes, f"{prefix}.downsample.0", c_in, c_out, 1, False)
                    _bn(shapes, f"{prefix}.downsample.1", c_out)
                c_in = c_out
        _linear(shapes, "fc", c_in, classes)
        return shapes
    return shapes_of


# arch -> (config schema, needs (C, H, W) input, expected shapes)
ARCH_SHAPES: dict[str, tuple[type[_ArchConfig], bool, Callable[..., Shapes]]] = {
    "mlp": (MlpConfig, False, _mlp_shapes),
    "lenet5": (LeNet5Config, True, _lenet5_shapes),
    **{name: (WidthConfig, True, _vgg_shapes(name)) for name in VGG_LAYOUTS},
    **{name: (WidthConfig, True, _resnet_shapes(name)) for name in RESNET_LAYOUTS},
}


def validate_config(arch: str, config: Mapping[str, Any]) -> _ArchConfig:
    """The architecture's config object; ModelError naming the field and the valid fields."""
    entry = ARCH_SHAPES.get(arch)
    if entry is None:
        raise ModelError(f"unknown arch {arch!r}; choose one of: {', '.join(sorted(ARCH_SHAPES))}")
    schema = entry[0]
    try:
        return schema(**config)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        valid = ", ".join(schema.model_fields) or "(none)"
        raise ModelError(
            f"bad config for arch {arch!r}: {problems}. Valid config fields: {valid}") from None


def expected_state_shapes(arch: str, input_shape: Sequence[int], num_classes: int,
                          config: Mapping[str, Any]) -> Shapes:
    """{state_dict name: shape} that `build_model(arch, input_shape, num_classes, **config)`
    holds. Raises ModelError for an unknown arch, a bad config or an input shape the arch
    cannot take."""
    cfg = validate_config(arch, config)
    _, needs_image, shapes_of = ARCH_SHAPES[arch]
    shape = tuple(int(d) for d in input_shape)
    if needs_image and len(shape) != 3:
        raise ModelError(f"arch {arch!r} needs image input_shape (C, H, W), got {list(shape)}; "
                         "use arch 'mlp' for flat features")
    return shapes_of(shape, int(num_classes), cfg)


def weights_mismatch(expected: Mapping[str, Sequence[int]],
                     found: Mapping[str, Sequence[int]], show: int = 5) -> str | None:
    """None when `found` (name -> shape, e.g. from a safetensors header) has exactly the
    expected names and shapes, else what differs: missing, unexpected, shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {list(found[k])} vs architecture {list(v)}"
              for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts) or None
