"""ThiNet (Luo et al. 2017): keep the units the next layer's output can be rebuilt from.

A chooser: per group it is given the count to keep by the allocator and greedily removes the
units whose summed contribution to the consumers' sampled pre-activations is smallest in
squared error (the engine's least-squares refit then rescales what is kept).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from mipp.activations import capture_io
from mipp.method_registry import register_method
from mipp.methods.context import Selection, SelectionContext
from mipp.methods.l1 import l1_scores
from mipp.progress import Phase

THINET_ROWS = 16_384  # sampled (sample, output unit, position) rows per group
THINET_SAMPLES = 512  # calibration samples whose conv patches are unfolded


def _thinet_contributions(module: nn.Module, inputs: torch.Tensor, size: int,
                          rows: int, generator: torch.Generator) -> torch.Tensor | None:
    """(rows, size): each unit's additive contribution to sampled outputs of `module`.

    A sampled row is one (sample, output unit, position); the output's pre-activation is the
    bias plus the row's sum (the ThiNet paper's x_hat). None for a layout it cannot read
    (grouped convolutions, inputs that are not the group's units).
    """
    n = inputs.shape[0]
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or inputs.shape[1] != size:
            return None
        # Unfold a subsample of the samples only: patches of all of them can take gigabytes.
        inputs = inputs[torch.randperm(n, generator=generator)[:THINET_SAMPLES]]
        n = inputs.shape[0]
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)  # (n, C*kk, L)
        positions = patches.shape[2]
        sample = torch.randint(n, (rows,), generator=generator)
        position = torch.randint(positions, (rows,), generator=generator)
        out = torch.randint(module.out_channels, (rows,), generator=generator)
        picked = patches[sample, :, position].reshape(rows, size, -1)  # (rows, C, kk)
        weight = module.weight.detach().cpu().reshape(module.out_channels, size, -1)[out]
        return (picked * weight).sum(-1)
    if isinstance(module, nn.Linear):
        inputs = inputs.reshape(n, -1)
        if inputs.shape[1] % size:
            return None
        sample = torch.randint(n, (rows,), generator=generator)
        out = torch.randint(module.out_features, (rows,), generator=generator)
        # A Flatten lays each unit's k values out contiguously: column c*k + j.
        picked = inputs[sample].reshape(rows, size, -1)
        weight = module.weight.detach().cpu()[out].reshape(rows, size, -1)
        return (picked * weight).sum(-1)
    return None


def thinet_removal_order(contributions: torch.Tensor, n_remove: int) -> list[int]:
    """ThiNet's greedy step: grow the removed set T by the unit that least increases
    sum over rows of (sum_{j in T} contribution_j)^2. Returns T in the order it was grown."""
    z = contributions.double()
    energy = (z * z).sum(0)
    residual = torch.zeros(z.shape[0], dtype=torch.float64)
    removed: list[int] = []
    available = torch.ones(z.shape[1], dtype=torch.bool)
    for _ in range(n_remove):
        cost = 2 * (residual @ z) + energy  # ||residual + z_i||^2 - ||residual||^2
        cost[~available] = float("inf")
        best = int(torch.argmin(cost))
        removed.append(best)
        available[best] = False
        residual += z[:, best]
    return removed


@register_method("thinet", kind="chooses")
def choose_thinet(ctx: SelectionContext, counts: Mapping[str, int]) -> Selection:
    """ThiNet: greedily removes the units the consumers' outputs need least (squared error).

    Score reported per unit: its position in the removal order (later removed = higher). A
    group whose consumers it cannot read (grouped conv, concatenation) falls back to L1.
    """
    generator = torch.Generator().manual_seed(ctx.config.seed)
    scores: dict[str, torch.Tensor] = {}
    keep: dict[str, list[int]] = {}
    fallback = None
    modules = dict(ctx.model.named_modules())
    for index, group in enumerate(ctx.groups):
        ctx.progress(Phase.SELECTING, index / len(ctx.groups), f"thinet {group.name}")
        n_keep = counts[group.name]
        parts = []
        for consumer in group.consumers:
            inputs, _ = capture_io(ctx.model, consumer, ctx.x, device=ctx.device)
            per = max(1, THINET_ROWS // len(group.consumers))
            part = _thinet_contributions(modules[consumer], inputs, group.size, per, generator)
            if part is None:
                parts = []
                break
            parts.append(part)
        if not parts:
            fallback = fallback or l1_scores(ctx)
            scores[group.name] = fallback[group.name]
            order = sorted(range(group.size), key=lambda i: (float(fallback[group.name][i]), -i))
        else:
            order = thinet_removal_order(torch.cat(parts), group.size - 1)
            order.append(next(i for i in range(group.size) if i not in order))
            rank = torch.empty(group.size)
            rank[torch.tensor(order)] = torch.arange(1, group.size + 1, dtype=torch.float32)
            scores[group.name] = rank / group.size
        keep[group.name] = sorted(order[group.size - n_keep:])
    layers = {g.name: {"size": g.size, "kept": len(keep[g.name]),
                       "scores": [float(s) for s in scores[g.name]]} for g in ctx.groups}
    return Selection(keep=keep, layers=layers)
