"""The one entry point the CLI and the worker call: select, remove, refit, retrain, report.

    result = mipp.prune(model, data, PruneConfig(tol=0.1), progress=print_progress)
    result.save("runs/lenet5-pruned")      # model.json, weights.safetensors, masks.json, ...
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mipp.config import PruneConfig
from mipp.errors import ConfigError, DataError
from mipp.groups import UnitGroup, apply_keep_sets, execution_order, unprunable_layers
from mipp.methods.allocation import prunable_groups, select
from mipp.methods.context import SelectionContext
from mipp.progress import Phase, ProgressCallback, no_progress
from mipp.refit import refit_consumers
from mipp.training import evaluate, resolve_device, train
from mipp.zoo import ModelSpec


@dataclass
class PruneResult:
    """A pruned model and everything measured on the way.

    model: the physically smaller module; spec: the zoo or code spec it was built from (None
    for a model built otherwise); history: replayable removals; masks: kept indices per layer;
    layers: per-layer rows for the report; metrics: JSON-able headline figures;
    preprocessing/class_names: what the engine fed the model and what its outputs mean (from
    the dataset), written into every artifact so the saved model takes raw inputs.
    """

    model: nn.Module
    spec: ModelSpec | None
    history: list[dict]
    masks: dict[str, list[int]]
    layers: list[dict]
    metrics: dict
    config: PruneConfig
    details: dict = field(default_factory=dict)
    preprocessing: Any = None
    class_names: tuple[str, ...] | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write the model directory (see mipp.artifacts); returns its path."""
        from mipp.artifacts import save_model_dir
        return save_model_dir(self, out_dir)


def model_cost(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass of one sample."""
    macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    return {"params": int(params), "macs": int(macs)}


@torch.no_grad()
def measure_latency_ms(model: nn.Module, example_input: torch.Tensor, *, batch_size: int = 64,
                       repeats: int = 20, device: torch.device | str = "cpu") -> float:
    """Median forward time of one batch, in milliseconds (after two warm-up passes)."""
    model.eval()
    batch = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous().to(device)
    times = []
    for i in range(repeats + 2):
        if torch.cuda.is_available() and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(batch)
        if torch.cuda.is_available() and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def _check_data(data, spec: ModelSpec | None) -> None:
    shape = tuple(data.x_train.shape[1:])
    if spec is not None and tuple(spec.input_shape) != shape and \
            int(torch.tensor(spec.input_shape).prod()) != int(torch.tensor(shape).prod()):
        raise DataError(f"the dataset's samples have shape {shape} but the model expects "
                        f"{tuple(spec.input_shape)}; pick a dataset that matches the model")
    if spec is not None and data.num_classes > spec.num_classes:
        raise DataError(f"the dataset has {data.num_classes} classes but the model outputs "
                        f"{spec.num_classes}; build the model with num_classes={data.num_classes}")
    if data.x_train.shape[0] < 32:
        raise DataError(f"the dataset has {data.x_train.shape[0]} training samples; "
                        "pruning needs at least 32 for calibration")


def prune(model: nn.Module, data, config: PruneConfig = PruneConfig(), *,
          spec: ModelSpec | None = None, progress: ProgressCallback = no_progress,
          counts: Mapping[str, int] | None = None) -> PruneResult:
    """Prune `model` (left untouched) with `config.method` and return the smaller copy.

    data: a mipp.data.Dataset (x_train, y_train, x_test, y_test tensors). counts: units to
    keep per layer (the same as `config.counts`, which it replaces). after-training mode
    evaluates the dense model, refits (if config.refit) and retrains; at-init mode
    re-initialises the model from `config.seed` (its weights are not used), prunes it and
    trains the pruned model with config.retrain. Raises ConfigError/DataError for bad settings
    or data; mipp.errors.Cancelled propagates from `progress`.
    """
    if counts is not None:
        # Validated again, so that counts given here meet the same rules as config.counts.
        config = PruneConfig.model_validate({**config.model_dump(), "counts": dict(counts)})
    spec = spec or getattr(model, "zoo_spec", None)
    _check_data(data, spec)
    device = resolve_device(config.device)
    timer = _Timer()
    torch.manual_seed(config.seed)
    if config.mode == "at-init":
        model = initialised(model, spec, config.seed)
    dense = copy.deepcopy(model).to(device).eval()
    example = data.x_train[:2].to(device)
    metrics: dict = {"method": config.method, "mode": config.mode, "device": str(device)}
    accuracy: dict[str, float | None] = {}

    with timer.phase("evaluate_dense"):
        progress(Phase.EVALUATING, 0.0, "dense model")
        accuracy["dense"] = evaluate(dense, data.x_test, data.y_test, device=device)["accuracy"]
    groups = prunable_groups(dense, example, config)
    if not groups:
        raise ConfigError("the model has no prunable layer (every Conv/Linear is ignored "
                          "or is the classifier)")

    generator = torch.Generator().manual_seed(config.seed)
    n_calib = min(config.calibration_samples, data.x_train.shape[0])
    calib = torch.randperm(data.x_train.shape[0], generator=generator)[:n_calib]
    ctx = SelectionContext(model=dense, groups=groups, x=data.x_train[calib], y=data.y_train[calib],
                           config=config, device=device, progress=progress)
    with timer.phase("selection"):
        selection = select(ctx)

    with timer.phase("surgery"):
        progress(Phase.PRUNING, 0.0, "removing units")
        pruned = copy.deepcopy(dense)
        history = apply_keep_sets(pruned, example, selection.keep)
        progress(Phase.PRUNING, 1.0, f"{len(history)} layers shrunk")
    accuracy["pruned_no_refit"] = evaluate(pruned, data.x_test, data.y_test, device=device)["accuracy"]

    refit_done: list[str] = []
    if config.refit and config.mode == "after-training" and history:
        with timer.phase("refit"):
            progress(Phase.REFITTING, 0.0, "least-squares refit of the next layers")
            refit_done = _refit(pruned, dense, groups, selection.keep, history, ctx.x, device,
                                config.seed)
            progress(Phase.REFITTING, 1.0, f"{len(refit_done)} layers refit")
    accuracy["pruned"] = evaluate(pruned, data.x_test, data.y_test, device=device)["accuracy"]

    with timer.phase("retrain"):
        train(pruned, data, config.retrain, device=device, seed=config.seed, progress=progress,
              phase=Phase.RETRAINING)
    accuracy["retrained"] = evaluate(pruned, data.x_test, data.y_test, device=device)["accuracy"]

    masks = {g.name: sorted(selection.keep.get(g.name, range(g.size))) for g in groups}
    layers = [{"name": g.name, "units_before": g.size, "units_after": len(masks[g.name]),
               **{k: v for k, v in selection.layers.get(g.name, {}).items()
                  if k in ("loss_empty", "loss_ref", "mi_estimate", "constant_units", "tol",
                           "candidate_fits", "seconds", "partition_rounding", "replayed",
                           "sweeps")}}
              for g in groups]
    before, after = model_cost(dense, example), model_cost(pruned, example)
    units_before = sum(g.size for g in groups)
    units_after = sum(len(m) for m in masks.values())
    metrics.update({
        "accuracy": accuracy,
        "params": {"before": before["params"], "after": after["params"]},
        "macs": {"before": before["macs"], "after": after["macs"]},
        "latency_ms": {"before": measure_latency_ms(dense, example, device=device),
                       "after": measure_latency_ms(pruned, example, device=device),
                       "batch_size": 64},
        "units": {"before": units_before, "after": units_after,
                  "removed_fraction": 1 - units_after / units_before},
        "refit_layers": refit_done,
        "unprunable_layers": unprunable_layers(dense, example, config.ignored_layers),
        "calibration_samples": n_calib,
        "seconds": timer.seconds,
    })
    if selection.phases:  # where the selection's seconds went (MIPP records them)
        metrics["selection_phases"] = selection.phases
    progress(Phase.SAVING, 1.0, "done")
    return PruneResult(model=pruned.cpu().eval(), spec=spec, history=history, masks=masks,
                       layers=layers, metrics=metrics, config=config,
                       details={"selection": selection.layers},
                       preprocessing=getattr(data, "preprocessing", None),
                       class_names=getattr(data, "class_names", None))


def initialised(model: nn.Module, spec, seed: int) -> nn.Module:
    """`model` at initialisation from `seed`, as mode="at-init" prunes it: rebuilt from its
    zoo or code spec (the same weights `build_model(..., seed=seed)` gives), else a copy whose
    modules' `reset_parameters` ran under that seed. `model` itself is left untouched."""
    from mipp.custom import CodeSpec
    if isinstance(spec, CodeSpec) and getattr(model, "code_dir", None) is not None:
        return spec.build(model.code_dir, seed=seed)
    if isinstance(spec, ModelSpec):
        return spec.build(seed=seed)
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def _refit(pruned: nn.Module, dense: nn.Module, groups: list[UnitGroup], keep, history, x,
           device, seed) -> list[str]:
    """Refit every consumer of a group that lost units, in forward order."""
    shrunk = {step["group"] for step in history}
    owner = {m: g.name for g in groups for m in g.members}
    rank = {n: i for i, n in enumerate(execution_order(dense, x[:2].to(device)))}
    names = sorted({c for g in groups if g.name in shrunk for c in g.consumers},
                   key=lambda n: rank.get(n, len(rank)))
    return refit_consumers(pruned, dense, names, keep, owner, x, device=device, seed=seed)
