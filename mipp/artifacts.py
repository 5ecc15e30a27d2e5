"""The pruned-model directory: a format a user can load without our code guessing.

    out/model.json          {"format": "mipp-model", "version": 1, "spec": ModelSpec,
                             "pruning": [{"group": "conv1", "removed": [3, 4]}], ...}
    out/weights.safetensors  the pruned weights
    out/masks.json           kept unit indices per layer (original numbering)
    out/metrics.json         accuracy, params, MACs, latency, per-layer figures, seconds

`load_model_dir(out)` rebuilds the zoo model, replays the removals with Torch-Pruning and
loads the weights: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mipp.errors import ModelError
from mipp.groups import replay_history
from mipp.zoo import ModelSpec, load_weights, save_weights

FORMAT, VERSION = "mipp-model", 1


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_model_dir(result, out_dir: str | Path) -> Path:
    """Write a PruneResult as a model directory; returns the directory."""
    if result.spec is None:
        raise ModelError("only zoo models (built from a ModelSpec) can be saved as a model "
                         "directory; build the model with mipp.zoo.build_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "model.json", {
        "format": FORMAT, "version": VERSION, "spec": result.spec.model_dump(mode="json"),
        "pruning": result.history, "config": result.config.model_dump(mode="json"),
    })
    save_weights(result.model, out / "weights.safetensors")
    _write_json(out / "masks.json", result.masks)
    _write_json(out / "metrics.json", {**result.metrics, "layers": result.layers})
    _write_json(out / "selection.json", result.details.get("selection", {}))
    return out


def save_dense_dir(model: nn.Module, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write an unpruned zoo model (e.g. after `mipp train`) in the same directory format."""
    spec = getattr(model, "zoo_spec", None)
    if spec is None:
        raise ModelError("the model was not built from the zoo; use mipp.zoo.build_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "model.json", {"format": FORMAT, "version": VERSION,
                                     "spec": spec.model_dump(mode="json"), "pruning": []})
    save_weights(model, out / "weights.safetensors")
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


def load_model_dir(model_dir: str | Path) -> nn.Module:
    """Rebuild the model saved in `model_dir` (eval mode, CPU); `.zoo_spec` holds its spec.

    Raises ModelError when the directory, spec, history or weights do not fit together.
    """
    info = read_model_json(model_dir)
    spec = ModelSpec.model_validate(info["spec"])
    model = spec.build()
    example = torch.zeros(2, *spec.input_shape)
    replay_history(model, example, info.get("pruning", []))
    load_weights(model, Path(model_dir) / "weights.safetensors", "safetensors")
    model.zoo_spec = spec
    model.pruning_history = info.get("pruning", [])
    return model.eval()


def export_onnx(model: nn.Module, input_shape, path: str | Path) -> Path:
    """Export `model` to ONNX with a dynamic batch dimension (opset 17)."""
    path = Path(path)
    example = torch.zeros(1, *input_shape)
    torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path
