"""Shared machinery of the scoring methods: a working copy of the model with Torch-Pruning
groups, so importances can score it, and weight-level scores summed over each unit's group.

    ws = Workspace(ctx)                                      # a deep copy on ctx.device
    scores = ws.importance(tp.importance.GroupMagnitudeImportance(p=1))  # {group: (size,)}

A weight-level score is made structured the MIPP paper's way: summed in absolute value over the
unit's group (the root's output rows, its BatchNorm channel and the consumers' input columns),
with Torch-Pruning's group doing the index bookkeeping (flatten, residuals).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from mipp.groups import build_graph
from mipp.methods.context import SelectionContext

SCORE_BATCH = 256  # samples per gradient batch (SNIP uses one such batch)
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


class Workspace:
    """A deep copy of the model on ctx.device with its dependency graph and one group per unit
    group (all indices), so Torch-Pruning importances can score it."""

    def __init__(self, ctx: SelectionContext):
        self.model = copy.deepcopy(ctx.model).to(ctx.device)
        self.example = ctx.x[:1].to(ctx.device)
        self.graph = build_graph(self.model, self.example)
        self.modules = dict(self.model.named_modules())
        self.groups = {g.name: self.group(g.name, list(range(g.size))) for g in ctx.groups}

    def group(self, name: str, idxs: list[int]):
        root = self.modules[name]
        prune_fn = self.graph.get_pruner_of_module(root).prune_out_channels
        return self.graph.get_pruning_group(root, prune_fn, idxs)

    def importance(self, scorer: Callable) -> dict[str, torch.Tensor]:
        return {name: scorer(group).detach().float().cpu() for name, group in self.groups.items()}


def summed_abs_scores(ws: Workspace, weight_scores: Mapping[nn.Module, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Sum |score| over each unit's group, given a score tensor per module weight.

    The copy's weights are overwritten by their |score| (0 where none is given) and
    Torch-Pruning's group L1 norm sums them, so the index bookkeeping is Torch-Pruning's.
    """
    with torch.no_grad():
        for module in ws.model.modules():
            if isinstance(module, WEIGHTED) and getattr(module, "weight", None) is not None:
                score = weight_scores.get(module)
                module.weight.copy_(score.abs() if score is not None else torch.zeros_like(module.weight))
    scorer = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    return ws.importance(scorer)


def batches(ctx: SelectionContext, count: int):
    """Up to `count` calibration batches of SCORE_BATCH samples, on ctx.device."""
    for start in range(0, min(len(ctx.x), count * SCORE_BATCH), SCORE_BATCH):
        yield (ctx.x[start:start + SCORE_BATCH].to(ctx.device),
               ctx.y[start:start + SCORE_BATCH].to(ctx.device))


def weights(model: nn.Module) -> dict[nn.Module, nn.Parameter]:
    """The weight of every weighted module (conv, linear, norms), by module."""
    return {m: m.weight for m in model.modules()
            if isinstance(m, WEIGHTED) and getattr(m, "weight", None) is not None}
