"""L1 magnitude: units whose weights are large matter (Li et al. 2017, structured)."""

from __future__ import annotations

import torch
import torch_pruning as tp

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext
from mipp.methods.scoring import Workspace


@register_method("l1", kind="scores")
def l1_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """L1 magnitude: the group L1 norm of each unit's weights (Torch-Pruning's).

    GroupMagnitudeImportance(p=1): mean over the group's layers of |w| summed over the unit's
    output rows, BatchNorm weight and input columns.
    """
    ws = Workspace(ctx)
    return ws.importance(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None))
