"""Model zoo: the architectures users can name, built for any input shape and class count.

Every model is made of modules (no functional ReLU/pooling/flatten) so Torch-Pruning's
DependencyGraph traces it, and the classifier producing the logits is the last `nn.Linear` in
`model.named_modules()` order. Usage:

    model = build_model("resnet20", (3, 32, 32), 10, width_mult=0.5)
    save_weights(model, "w.safetensors")
    load_weights(ModelSpec(arch="resnet20", input_shape=(3, 32, 32), num_classes=10,
                           config={"width_mult": 0.5}).build(), "w.safetensors")
"""

from __future__ import annotations

import math
import numbers
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from mipp import zoo_shapes
from mipp.errors import ModelError

# ---------------------------------------------------------------------------------------------
# Per-architecture configuration (validated, so a typo names the field instead of being ignored)


# The config schemas live in mipp.zoo_shapes (torch-free), so the API validates them too.
_ArchConfig = zoo_shapes._ArchConfig
MlpConfig, LeNet5Config, WidthConfig = (zoo_shapes.MlpConfig, zoo_shapes.LeNet5Config,
                                        zoo_shapes.WidthConfig)


def _scaled(width: int, mult: float) -> int:
    return max(1, round(width * mult))


# ---------------------------------------------------------------------------------------------
# Architectures


class MLP(nn.Sequential):
    """flatten -> (fc_i, relu_i) per hidden width -> fc_N. Input any shape, flattened."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int]):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        d_in = math.prod(input_shape)
        for i, width in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(d_in, width)
            layers[f"relu{i}"] = nn.ReLU()
            d_in = width
        layers[f"fc{len(widths) + 1}"] = nn.Linear(d_in, num_classes)
        super().__init__(layers)


def _pool_for(height: int, width: int) -> nn.Module | None:
    """A 2x2 max-pool, shrunk to 1 along an axis already of size 1; None when both are 1."""
    kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
    return None if kernel == (1, 1) else nn.MaxPool2d(kernel)


class LeNet5(nn.Sequential):
    """conv1(5x5, pad 2)-relu-pool, conv2(5x5)-relu-pool, fc1-relu, fc2-relu, fc3.

    On inputs too small for the classic shapes (e.g. 8x8 digits) conv2 gets just enough
    padding for a spatial size >= 1 and a pool is skipped along axes already of size 1.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, config: LeNet5Config):
        c_in, height, width = input_shape
        c1, c2 = config.channels
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(c_in, c1, 5, padding=2)
        layers["relu1"] = nn.ReLU()
        if (pool := _pool_for(height, width)) is not None:
            layers["pool1"] = pool
            height, width = height // pool.kernel_size[0], width // pool.kernel_size[1]
        # Minimal padding that keeps conv2's output at least 1x1.
        pad = (max(0, math.ceil((5 - height) / 2)), max(0, math.ceil((5 - width) / 2)))
        layers["conv2"] = nn.Conv2d(c1, c2, 5, padding=pad)
        layers["relu2"] = nn.ReLU()
        height, width = height + 2 * pad[0] - 4, width + 2 * pad[1] - 4
        if (pool := _pool_for(height, width)) is not None:
            layers["pool2"] = pool
        layers["flatten"] = nn.Flatten()
        features = _feature_count(nn.Sequential(layers), input_shape)
        layers["fc1"] = nn.Linear(features, config.widths[0])
        layers["relu3"] = nn.ReLU()
        layers["fc2"] = nn.Linear(config.widths[0], config.widths[1])
        layers["relu4"] = nn.ReLU()
        layers["fc3"] = nn.Linear(config.widths[1], num_classes)
        super().__init__(layers)


def _feature_count(prefix: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Width of `prefix`'s flattened output, found by a dummy forward of one zero sample."""
    with torch.no_grad():
        return prefix(torch.zeros(1, *input_shape)).shape[1]


VGG_LAYOUTS = zoo_shapes.VGG_LAYOUTS


class VGG(nn.Module):
    """CIFAR-style VGG: (conv3x3-BN-ReLU | maxpool)* -> global avg pool -> flatten -> Linear."""

    def __init__(self, layout: Sequence[int | str], input_shape: tuple[int, ...],
                 num_classes: int, width_mult: float):
        super().__init__()
        c_in, height, width = input_shape
        layers: list[nn.Module] = []
        for item in layout:
            if item == "M":
                # A pool on an axis already of size 1 would fail; skip or shrink it.
                if (pool := _pool_for(height, width)) is not None:
                    layers.append(pool)
                    height, width = height // pool.kernel_size[0], width // pool.kernel_size[1]
                continue
            c_out = _scaled(int(item), width_mult)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut (1x1 conv + BN when the shape changes),
    then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), stages of BasicBlocks (the first block of
    every stage after the first has stride 2), global avg pool, Linear `fc`."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int],
                 input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c_in = widths[0]
        for stage, (n_blocks, c_out) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if stage == 1 else 2
            stage_blocks = []
            for i in range(n_blocks):
                stage_blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


# ---------------------------------------------------------------------------------------------
# Registry


class _Arch(NamedTuple):
    config: type[_ArchConfig]
    build: Callable[[tuple[int, ...], int, Any], nn.Module]
    needs_image: bool  # True: input must be (C, H, W)


def _mlp(shape: tuple[int, ...], classes: int, cfg: MlpConfig) -> nn.Module:
    return MLP(shape, classes, cfg.widths)


def _resnet(blocks: Sequence[int], widths: Sequence[int]) -> Callable[..., nn.Module]:
    def build(shape: tuple[int, ...], classes: int, cfg: WidthConfig) -> nn.Module:
        return ResNet(blocks, [_scaled(w, cfg.width_mult) for w in widths], shape, classes)
    return build


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(shape: tuple[int, ...], classes: int, cfg: WidthConfig) -> nn.Module:
        return VGG(VGG_LAYOUTS[name], shape, classes, cfg.width_mult)
    return build


ARCHITECTURES: dict[str, _Arch] = {
    "mlp": _Arch(MlpConfig, _mlp, False),
    "lenet5": _Arch(LeNet5Config, LeNet5, True),
    "vgg11": _Arch(WidthConfig, _vgg("vgg11"), True),
    "vgg16": _Arch(WidthConfig, _vgg("vgg16"), True),
    "vgg19": _Arch(WidthConfig, _vgg("vgg19"), True),
    **{name: _Arch(WidthConfig, _resnet(*layout), True)
       for name, layout in zoo_shapes.RESNET_LAYOUTS.items()},
}


def list_architectures() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(ARCHITECTURES)


def _check_shape(arch: str, input_shape: Sequence[int], num_classes: int,
                 needs_image: bool) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ModelError(f"input_shape must be a list of integers, got {input_shape!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"input_shape must be positive sizes like (C, H, W) or (D,), got {shape}")
    if needs_image and len(shape) != 3:
        raise ModelError(
            f"arch {arch!r} needs image input_shape (C, H, W), got {shape}; "
            "use arch 'mlp' for flat features or reshape the data to (N, C, H, W)")
    if len(shape) > 3:
        raise ModelError(f"input_shape must be (D,), (H, W) or (C, H, W), got {shape}")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ModelError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return shape


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, *,
                seed: int | None = None, **config: Any) -> nn.Module:
    """Build zoo architecture `arch` for per-sample `input_shape` and `num_classes` logits.

    `config` holds the architecture's options (mlp: widths; lenet5: channels, widths;
    vgg*/resnet*: width_mult). With `seed`, weights are initialised from that seed without
    touching the global RNG. The returned model's `zoo_spec` attribute is the `ModelSpec`.
    Raises ModelError for an unknown arch, an unknown/invalid config field or a bad shape.
    """
    entry = ARCHITECTURES.get(arch)
    if entry is None:
        raise ModelError(
            f"unknown arch {arch!r}; choose one of: {', '.join(list_architectures())}")
    shape = _check_shape(arch, input_shape, num_classes, entry.needs_image)
    num_classes = int(num_classes)
    try:
        cfg = entry.config(**config)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        valid = ", ".join(entry.config.model_fields) or "(none)"
        raise ModelError(
            f"bad config for arch {arch!r}: {problems}. Valid config fields: {valid}") from None
    if seed is None:
        model = entry.build(shape, num_classes, cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = entry.build(shape, num_classes, cfg)
    model.zoo_spec = ModelSpec(arch=arch, input_shape=shape, num_classes=num_classes,
                               config=dict(config))
    return model


class ModelSpec(BaseModel):
    """A zoo model described as data: what `build_model` needs, shareable as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    config: dict[str, Any] = {}

    def build(self, seed: int | None = None) -> nn.Module:
        """`build_model(arch, input_shape, num_classes, **config)`; raises ModelError."""
        return build_model(self.arch, self.input_shape, self.num_classes, seed=seed,
                           **self.config)


# ---------------------------------------------------------------------------------------------
# Weights

_FORMAT_BY_SUFFIX = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
_SHOW = 5  # keys listed per kind of mismatch


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # the Rust error type is not importable under a stable name
        raise ModelError(f"weights file {path.name!r} is not a valid safetensors file ({exc})") \
            from None


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise ModelError(
                f"weights file {path.name!r} holds pickled Python objects (e.g. a whole model "
                "saved with torch.save(model)), which are not loaded for safety; save "
                "model.state_dict() or use safetensors instead") from None
        raise ModelError(f"weights file {path.name!r} is not a readable PyTorch file") from None
    except Exception:  # torch raises RuntimeError/EOFError/... for damaged archives
        raise ModelError(f"weights file {path.name!r} is not a readable PyTorch file") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelError(
            f"weights file {path.name!r} must hold a state_dict (a dict of name -> tensor, "
            "optionally under 'state_dict'); save it with torch.save(model.state_dict(), path)")
    return dict(obj)


_READERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "safetensors": _read_safetensors,
    "pt": _read_pt,
}


def _describe(model: nn.Module) -> str:
    spec = getattr(model, "zoo_spec", None)
    if isinstance(spec, ModelSpec):
        return (f"arch {spec.arch!r} with config {spec.config}, input_shape "
                f"{spec.input_shape}, {spec.num_classes} classes")
    return f"model {type(model).__name__}"


def _mismatch_message(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return ""
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            parts.append(f"{label}: {', '.join(items[:_SHOW])}{more}")
    hint = ""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and not (missing or unexpected):
        # Only the classifier differs: the usual cause is a different class count.
        head = f"{linears[-1]}."
        if all(k.startswith(head) for k in state if state[k].shape != expected[k].shape):
            hint = f" The file seems to be for {state[head + 'weight'].shape[0]} classes."
    return (f"weights file {path.name!r} does not match {_describe(model)}: "
            f"{'; '.join(parts)}.{hint} Use the architecture, config and class count the "
            "weights were saved from.")


def load_weights(model: nn.Module, path: str | Path, fmt: str | None = None) -> nn.Module:
    """Load a state_dict file into `model` strictly (every key, every shape) and return it.

    `fmt` is "safetensors" or "pt" (a state_dict read with weights_only=True, optionally
    under a "state_dict" key); None infers it from the suffix (.safetensors, .pt/.pth/.bin).
    Raises ModelError for a missing, corrupt or pickled-object file, or for weights whose
    keys or shapes do not match the model (listing the first few of each).
    """
    path = Path(path)
    if fmt is None:
        fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise ModelError(
                f"cannot tell the format of weights file {path.name!r} from its suffix; "
                f"pass fmt as one of {', '.join(_READERS)} or rename it to "
                f"{', '.join(_FORMAT_BY_SUFFIX)}")
    reader = _READERS.get(fmt)
    if reader is None:
        raise ModelError(f"unknown weights format {fmt!r}; choose one of {', '.join(_READERS)}")
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    state = reader(path)
    if message := _mismatch_message(path, model, state):
        raise ModelError(message)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise ModelError(f"weights file {path.name!r} cannot be loaded: {exc}") from None
    return model


def save_weights(model: nn.Module, path: str | Path,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model.state_dict()` to `path` as safetensors (contiguous CPU copies); returns path.

    The copies also break shared storage, which safetensors refuses to write.
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous()
               for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata=dict(metadata or {}))
    return path
