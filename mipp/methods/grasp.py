"""GraSP (Wang et al. 2020), structured: gradient signal preservation at initialisation."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext
from mipp.methods.scoring import Workspace, batches, summed_abs_scores, weights

GRASP_BATCHES = 2
GRASP_TEMPERATURE = 200.0  # logits / T, as in the GraSP reference code


@register_method("grasp", kind="scores")
def grasp_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """GraSP: |w * Hg|, the loss's Hessian-gradient product, summed over each unit's group.

    Loss on logits / 200 over GRASP_BATCHES calibration batches; the sign of the paper's
    -w * Hg is dropped (the MIPP paper's way of making it structured).
    """
    ws = Workspace(ctx)
    ws.model.train()
    by_module = weights(ws.model)
    params = list(by_module.values())
    data = list(batches(ctx, GRASP_BATCHES))
    grads = [torch.zeros_like(p) for p in params]
    for xb, yb in data:
        loss = F.cross_entropy(ws.model(xb) / GRASP_TEMPERATURE, yb)
        for total, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                total += g
    ws.model.zero_grad(set_to_none=True)
    for xb, yb in data:
        loss = F.cross_entropy(ws.model(xb) / GRASP_TEMPERATURE, yb)
        g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        z = sum((gi * fixed).sum() for gi, fixed in zip(g, grads) if gi is not None)
        z.backward()
    return summed_abs_scores(ws, {m: (-w.detach() * w.grad) if w.grad is not None else None
                                  for m, w in by_module.items()})
