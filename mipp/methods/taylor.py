"""First-order Taylor (Molchanov et al. 2019): the loss change of removing a unit, to first
order."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch.nn import functional as F

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext
from mipp.methods.scoring import Workspace, batches

TAYLOR_BATCHES = 4  # batches whose gradients Taylor accumulates


@register_method("taylor", kind="scores")
def taylor_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """First-order Taylor: |w * dL/dw| summed over each unit's group.

    Gradients accumulated over TAYLOR_BATCHES calibration batches (GroupTaylorImportance).
    """
    ws = Workspace(ctx)
    ws.model.train()
    ws.model.zero_grad(set_to_none=True)
    for xb, yb in batches(ctx, TAYLOR_BATCHES):
        F.cross_entropy(ws.model(xb), yb).backward()
    return ws.importance(tp.importance.GroupTaylorImportance(normalizer=None))
