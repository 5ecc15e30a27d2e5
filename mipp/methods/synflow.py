"""SynFlow (Tanaka et al. 2020), iterative and structured: data-free synaptic flow.

An iterative scorer: the allocator calls `synflow_scores` SYNFLOW_ROUNDS times, pruning to an
exponentially shrinking share in between and setting `ctx.alive`; the linearised copy lives in
`ctx.scratch` between rounds, with the removed units cut out of it.
"""

from __future__ import annotations

import torch
from torch import nn

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext
from mipp.methods.scoring import WEIGHTED, Workspace, summed_abs_scores, weights

SYNFLOW_ROUNDS = 100  # the SynFlow paper's number of prune-rescore rounds


def _linearised(ws: Workspace) -> None:
    """SynFlow's network: |parameters|, float64, BatchNorm as a plain positive affine map
    (running mean 0, variance 1: choice, so that the trained statistics cannot flip signs)."""
    ws.model.double().eval()
    with torch.no_grad():
        for module in ws.model.modules():
            for p in module.parameters(recurse=False):
                p.abs_()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)


def _mask_units(ws: Workspace, name: str, removed: list[int]) -> None:
    """Cut removed units out of the linearised copy: zero their rows and their consumers'
    columns (via the Torch-Pruning group, which maps the indices), so they score 0 after."""
    if not removed:
        return
    graph = ws.graph
    with torch.no_grad():
        for dep, idxs in ws.group(name, removed):
            module = dep.target.module
            if not isinstance(module, WEIGHTED) or getattr(module, "weight", None) is None:
                continue
            if graph.is_out_channel_pruning_fn(dep.handler):
                module.weight[idxs] = 0
                if getattr(module, "bias", None) is not None:
                    module.bias[idxs] = 0
            elif graph.is_in_channel_pruning_fn(dep.handler) and module.weight.dim() > 1:
                if not getattr(module, "groups", 1) > 1:
                    module.weight[:, idxs] = 0


@register_method("synflow", kind="scores", rounds=SYNFLOW_ROUNDS)
def synflow_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """SynFlow: |w * dR/dw| of the |w| network on an all-ones input, summed per unit's group.

    R is the output sum; units not in `ctx.alive` are cut out of the network first (score 0).
    """
    ws = ctx.scratch.get("synflow")
    if ws is None:
        ws = ctx.scratch["synflow"] = Workspace(ctx)
        _linearised(ws)
        ws.removed = {g.name: set() for g in ctx.groups}
    for g in ctx.groups:
        alive = ctx.alive[g.name] if ctx.alive is not None else torch.ones(g.size, dtype=torch.bool)
        newly = [i for i in range(g.size) if not alive[i] and i not in ws.removed[g.name]]
        _mask_units(ws, g.name, newly)
        ws.removed[g.name].update(newly)
    ws.model.zero_grad(set_to_none=True)
    ones = torch.ones(1, *ctx.x.shape[1:], dtype=torch.float64, device=ws.example.device)
    ws.model(ones).sum().backward()
    by_module = weights(ws.model)
    scores = {m: (w.grad * w).detach() if w.grad is not None else None
              for m, w in by_module.items()}
    # Sum over groups without touching the linearised weights (a copy holds them meanwhile).
    with torch.no_grad():
        saved = {m: w.detach().clone() for m, w in by_module.items()}
        sums = summed_abs_scores(ws, scores)
        for m, w in by_module.items():
            w.copy_(saved[m])
    return sums
