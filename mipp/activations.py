"""Activation capture: what each unit passes to the next layer, one scalar per unit per sample.

A unit's activation is the input its consumers read (after norm, non-linearity and pooling).
A conv channel is summarised by spatial average pooling; a channel that a Flatten spreads over
k inputs of a Linear is averaged over those k. When several layers consume a group (a
residual stream), the unit's activation is the mean over its consumers (choice; the spec asks
for the stream, which each consumer sees at a different depth).

    acts, logits = capture_unit_activations(model, groups, x, batch_size=256)
    acts["conv1"].shape == (len(x), groups[0].size)

With `grid=g` (`reconstructor.conv_grid`) a conv channel is summarised by its means over a g x g
grid of spatial cells instead (adaptive average pooling), and every group's activations are
(n, size, cells): cells = g² for a channel, 1 for a Linear's units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mipp.groups import UnitGroup


def _at(inputs: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """inputs' columns (dim 1) at `index`, e.g. the second half of a concatenation (all of them
    when None or when `index` is every column in order)."""
    if index is None or (len(index) == inputs.shape[1] and index[-1] == len(index) - 1):
        return inputs
    return inputs[:, index.to(inputs.device)]


def _grid_pool(inputs: torch.Tensor, size: int, index: torch.Tensor | None, grid: int
               ) -> torch.Tensor:
    """(n, C, H, W) conv input or (n, F) flat input -> (n, size, cells): each channel's mean
    over a grid x grid of spatial cells (cells = grid ** 2), or (n, size, 1) where the input
    has no square spatial layout of at least grid x grid (a Linear's units)."""
    n = inputs.shape[0]
    if inputs.dim() == 2:
        inputs = _at(inputs, index)
        k = inputs.shape[1] // size
        side = int(round(k ** 0.5))
        if side * side != k or side < grid:
            return inputs.reshape(n, size, k).mean(-1, keepdim=True)
        grids = inputs.reshape(n * size, 1, side, side)
        return torch.nn.functional.adaptive_avg_pool2d(grids, grid).reshape(n, size, -1)
    if inputs.dim() != 4 or min(inputs.shape[2:]) < grid:
        return _pool(inputs, size, index).unsqueeze(-1)
    cells = torch.nn.functional.adaptive_avg_pool2d(inputs, grid).flatten(2)  # (n, C, cells)
    cells = _at(cells, index)
    if cells.shape[1] != size:
        cells = cells.reshape(n, size, -1, cells.shape[2]).mean(2)
    return cells


def _pool(inputs: torch.Tensor, size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """(n, C, ...) conv input or (n, F) flat input -> (n, size): the group's channels (or its
    features, `size * k` of them after a Flatten) at `index` (all of them when None)."""
    if inputs.dim() > 2:
        inputs = inputs.flatten(2).mean(-1)
    inputs = _at(inputs, index)
    if inputs.shape[1] == size:
        return inputs
    return inputs.reshape(inputs.shape[0], size, -1).mean(-1)


@torch.no_grad()
def capture_unit_activations(
    model: nn.Module, groups: Sequence[UnitGroup], x: torch.Tensor, *, batch_size: int = 256,
    device: torch.device | str = "cpu", grid: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `x` through `model` in eval mode; returns ({group name: (n, size)}, logits (n, C)).

    grid > 1: each conv channel is summarised by its means over a grid x grid of spatial cells
    instead of one spatial mean, and every group's activations are (n, size, cells) (cells = 1
    for a Linear's units, or where a consumer sees fewer than grid x grid positions).
    Results are float32 on the CPU. The model is left in the train/eval mode it had.
    """
    modules = dict(model.named_modules())
    collected: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    per_batch: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for group in groups:
        inputs = dict(group.consumer_inputs)
        for consumer in group.consumers:
            index = torch.tensor(sorted(inputs[consumer])) if consumer in inputs else None

            def hook(module, args, group=group, index=index):
                inputs = args[0].float()
                per_batch.setdefault(group.name, []).append(
                    _pool(inputs, group.size, index) if grid == 1
                    else _grid_pool(inputs, group.size, index, grid))
            hooks.append(modules[consumer].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for start in range(0, x.shape[0], batch_size):
            per_batch.clear()
            logits.append(model(x[start:start + batch_size].to(device)).float().cpu())
            for name, parts in per_batch.items():
                if len({p.shape for p in parts}) > 1:  # consumers see different grids
                    parts = [p.mean(-1, keepdim=True) for p in parts]
                collected[name].append(torch.stack(parts).mean(0).cpu())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in collected.items()}, torch.cat(logits)


@torch.no_grad()
def capture_io(model: nn.Module, name: str, x: torch.Tensor, *, batch_size: int = 256,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Full input and output of module `name` over `x` (CPU float32), in eval mode."""
    module = dict(model.named_modules())[name]
    ins, outs = [], []
    def record(m, args, out) -> None:  # a hook that returns a value would replace the output
        ins.append(args[0].float().cpu())
        outs.append(out.float().cpu())
    hook = module.register_forward_hook(record)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(ins), torch.cat(outs)
