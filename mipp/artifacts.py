"""The pruned-model directory: a format a user can load without our code guessing.

    out/model.json          {"format": "mipp-model", "version": 1, "spec": ModelSpec | CodeSpec,
                             "pruning": [{"group": "conv1", "removed": [3, 4]}],
                             "preprocessing": {"kind", "scale", "mean", "std"},
                             "class_names": [...] | null, ...}
    out/weights.safetensors  the pruned weights
    out/code/                the model's Python source (code models only)
    out/masks.json           kept unit indices per layer (original numbering)
    out/metrics.json         accuracy, params, MACs, latency, per-layer figures, seconds

`load_model_dir(out)` rebuilds the model (zoo, or the team's code with `trust_code=True`),
replays the removals with Torch-Pruning and loads the weights: nothing is unpickled. The
network takes *prepared* inputs (what the engine fed it); `load_predictor(out)` wraps it so
that raw inputs, as in the user's data, go in:

    predictor = mipp.load_predictor("model.tar.gz")   # the downloaded archive or its folder
    labels = predictor.predict(x_raw)                  # numpy (N,) class indices
    names = [predictor.class_names[i] for i in labels] # when the dataset named its classes
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mipp.custom import CODE_DIR, CodeSpec, copy_code
from mipp.preprocessing import Preprocessing
from mipp.errors import ModelError
from mipp.groups import replay_history
from mipp.zoo import ModelSpec, load_weights, save_weights

FORMAT, VERSION = "mipp-model", 1


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _spec_of(model: nn.Module, spec: ModelSpec | CodeSpec | None) -> ModelSpec | CodeSpec:
    spec = spec or getattr(model, "zoo_spec", None)
    if not isinstance(spec, ModelSpec | CodeSpec):
        raise ModelError("only zoo models (mipp.zoo.build_model) and code models "
                         "(mipp.custom.build_code_model) can be saved as a model directory")
    return spec


def _write_model(out: Path, model: nn.Module, spec: ModelSpec | CodeSpec, history: list,
                 preprocessing: Preprocessing | None, class_names, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, CodeSpec):
        code_dir = getattr(model, "code_dir", None)
        if code_dir is None:
            raise ModelError("a code model must carry `code_dir` (build it with "
                             "mipp.custom.build_code_model)")
        if Path(code_dir).resolve() != (out / CODE_DIR).resolve():
            copy_code(code_dir, out / CODE_DIR)
    _write_json(out / "model.json", {
        "format": FORMAT, "version": VERSION, "spec": spec.model_dump(mode="json"),
        "pruning": history,
        "preprocessing": (preprocessing or Preprocessing()).as_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        **extra,
    })
    save_weights(model, out / "weights.safetensors")


def save_model_dir(result, out_dir: str | Path) -> Path:
    """Write a PruneResult as a model directory; returns the directory."""
    out = Path(out_dir)
    spec = _spec_of(result.model, result.spec)
    _write_model(out, result.model, spec, result.history, result.preprocessing,
                 result.class_names, {"config": result.config.model_dump(mode="json")})
    _write_json(out / "masks.json", result.masks)
    _write_json(out / "metrics.json", {**result.metrics, "layers": result.layers})
    _write_json(out / "selection.json", result.details.get("selection", {}))
    return out


def save_dense_dir(model: nn.Module, out_dir: str | Path, metrics: dict | None = None,
                   data=None) -> Path:
    """Write an unpruned model (e.g. after `mipp train`) in the same directory format.

    `data` (the Dataset it was trained on) supplies the preprocessing and class names.
    """
    out = Path(out_dir)
    spec = _spec_of(model, None)
    _write_model(out, model, spec, list(getattr(model, "pruning_history", [])),
                 data.preprocessing if data is not None else getattr(model, "preprocessing", None),
                 data.class_names if data is not None else getattr(model, "class_names", None),
                 {})
    if metrics is not None:
        _write_json(out / "metrics.json", metrics)
    return out


def read_model_json(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "model.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} not found: a model directory holds model.json and "
                         "weights.safetensors (written by `mipp train` or `mipp prune`)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ModelError(f"{path} is not a {FORMAT} v{VERSION} file")
    return info


@contextmanager
def model_dir_of(path: str | Path):
    """Yield a model directory for `path`: the directory itself, or a downloaded model.tar.gz
    extracted into a temporary folder (removed afterwards). Raises ModelError otherwise."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ModelError(f"{str(path)!r} is neither a model directory nor a model.tar.gz "
                         "archive (as downloaded from a job's artifacts)")
    with tempfile.TemporaryDirectory(prefix="mipp-model-") as tmp:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")  # no absolute paths, links out, devices
        except (tarfile.TarError, OSError) as exc:
            raise ModelError(f"{path.name!r} cannot be extracted ({exc})") from None
        found = sorted(Path(tmp).glob("model.json")) + sorted(Path(tmp).glob("*/model.json"))
        if not found:
            raise ModelError(f"{path.name!r} holds no model.json (expected model/model.json)")
        yield found[0].parent


def _build(info: dict, model_dir: Path, trust_code: bool) -> nn.Module:
    raw = info["spec"]
    if isinstance(raw, dict) and raw.get("kind") == "code":
        spec = CodeSpec.model_validate(raw)
        if not trust_code:
            raise ModelError(
                f"{model_dir / 'model.json'} is a code model (factory {spec.factory!r}): "
                "loading it runs the Python source in its code/ folder. If you trust it, "
                "pass trust_code=True (CLI: --trust-code)")
        return spec.build(model_dir / CODE_DIR)
    return ModelSpec.model_validate(raw).build()


def load_model_dir(model_dir: str | Path, trust_code: bool = False) -> nn.Module:
    """Rebuild the model saved in `model_dir` (or a model.tar.gz), in eval mode on the CPU.

    The network takes prepared inputs; `.preprocessing` (a Preprocessing) turns raw inputs into
    them and `.class_names` names the outputs (use `load_predictor` for raw inputs). `.zoo_spec`
    holds the spec. A code model imports its source only with `trust_code=True`. Raises
    ModelError when the directory, spec, history or weights do not fit together.
    """
    with model_dir_of(model_dir) as directory:
        info = read_model_json(directory)
        model = _build(info, directory, trust_code)
        spec = model.zoo_spec
        example = torch.zeros(2, *spec.input_shape)
        replay_history(model, example, info.get("pruning", []))
        load_weights(model, directory / "weights.safetensors", "safetensors")
    model.zoo_spec = spec
    model.pruning_history = info.get("pruning", [])
    model.preprocessing = Preprocessing.from_dict(info.get("preprocessing"))
    model.class_names = info.get("class_names")
    return model.eval()


class RawInputModel(nn.Module):
    """`model((x / scale - mean) / std)`: the network with its preprocessing folded in, so it
    takes raw inputs (N, *input_shape). Used for the ONNX export and by `Predictor`."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, input_rank: int):
        super().__init__()
        self.model = model
        view = (1, -1, *([1] * (input_rank - 1)))  # per channel (C, H, W) or feature (D,)
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(view))
        self.register_buffer("inv_std", (1.0 / torch.tensor(preprocessing.std)).view(view))
        self.inv_scale = 1.0 / preprocessing.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() * self.inv_scale - self.mean) * self.inv_std)


class Predictor:
    """A loaded model that takes raw inputs (as in the user's data, before any preprocessing).

    predictor(x_raw) -> logits tensor (N, num_classes); predictor.predict(x_raw) -> numpy (N,)
    class indices; `class_names` (or None), `preprocessing`, `model` (the bare network).
    """

    def __init__(self, model: nn.Module, batch_size: int = 1024):
        self.model = model.eval()
        self.preprocessing: Preprocessing = getattr(model, "preprocessing", Preprocessing())
        self.class_names: list[str] | None = getattr(model, "class_names", None)
        self.input_shape = tuple(model.zoo_spec.input_shape)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, x_raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x_raw) if not isinstance(x_raw, torch.Tensor) else x_raw)
        if x.ndim == len(self.input_shape) and tuple(x.shape) == self.input_shape:
            x = x.unsqueeze(0)  # one sample
        if tuple(x.shape[1:]) != self.input_shape:
            if x[0].numel() != int(np.prod(self.input_shape)):
                raise ModelError(f"inputs have per-sample shape {tuple(x.shape[1:])}; the model "
                                 f"takes {self.input_shape}")
            x = x.reshape(len(x), *self.input_shape)  # e.g. (N, H, W) -> (N, 1, H, W)
        outputs = [self.model(self.preprocessing.apply(x[i:i + self.batch_size]))
                   for i in range(0, len(x), self.batch_size)]
        return torch.cat(outputs) if outputs else torch.empty(0)

    def predict(self, x_raw: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class indices (N,) for raw inputs (N, *input_shape)."""
        return self(x_raw).argmax(1).numpy()


def load_predictor(path: str | Path, trust_code: bool = False) -> Predictor:
    """`Predictor(load_model_dir(path, trust_code))`: a model directory or model.tar.gz."""
    return Predictor(load_model_dir(path, trust_code=trust_code))


def export_onnx(model: nn.Module, input_shape, path: str | Path,
                preprocessing: Preprocessing | None = None,
                class_names: list[str] | None = None) -> Path:
    """Export `model` to ONNX taking raw inputs, with a dynamic batch dimension (opset 17).

    `preprocessing` (default: the model's `.preprocessing`, else none) is folded into the
    graph, and stated with the class names in the metadata: `mipp.input` = "raw",
    `mipp.preprocessing` and `mipp.class_names` (JSON).
    """
    import onnx

    path = Path(path)
    prep = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    wrapped = RawInputModel(model, prep, len(input_shape)).eval()
    example = torch.zeros(1, *input_shape)
    torch.onnx.export(wrapped, (example,), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    graph = onnx.load(str(path))
    metadata: dict[str, Any] = {
        "mipp.input": "raw",
        "mipp.preprocessing": json.dumps(prep.as_dict()),
        "mipp.class_names": json.dumps(list(names) if names is not None else None),
    }
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))
    return path
