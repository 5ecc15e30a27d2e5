"""SNIP (Lee et al. 2019), structured: connection sensitivity at initialisation."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext
from mipp.methods.scoring import Workspace, batches, summed_abs_scores, weights


@register_method("snip", kind="scores")
def snip_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """SNIP: |g * w| on one calibration batch, summed over each unit's group."""
    ws = Workspace(ctx)
    ws.model.train()
    ws.model.zero_grad(set_to_none=True)
    xb, yb = next(batches(ctx, 1))
    F.cross_entropy(ws.model(xb), yb).backward()
    return summed_abs_scores(ws, {m: (w.grad * w).detach() if w.grad is not None else None
                                  for m, w in weights(ws.model).items()})
