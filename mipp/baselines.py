"""Baseline selection methods: structured (whole units), under the same contract as MIPP.

Each selector maps a `SelectionContext` to a `Selection` and is registered by its config name:
random, l1, taylor, thinet (after training) and snip, grasp, synflow (at initialisation; any
selector runs in either mode). Usage:

    ctx = SelectionContext(model, find_unit_groups(model, x[:1]), x, y,
                           PruneConfig(method="l1", target=0.5), counts={"fc1": 30, "fc2": 10})
    selection = SELECTORS["l1"](ctx)            # Selection(keep={"fc1": [...30 indices]}, ...)
    apply_keep_sets(model, x[:1], selection.keep)

Scores come from Torch-Pruning's importance criteria where one exists (L1, Taylor) and are
otherwise made structured the MIPP paper's way: a weight-level score is summed in absolute
value over the unit's group (the root's output rows, its BatchNorm channel and the consumers'
input columns), with Torch-Pruning's group doing the index bookkeeping (flatten, residuals).

With `ctx.counts` each group keeps exactly that many units (its top scores). With only
`config.target`, scores are divided by their group's mean and ranked across all groups (as
Torch-Pruning's global pruning does), and each group keeps at least its best unit. ThiNet is the
exception: with a target it removes that fraction of every group, the ThiNet paper's protocol.
The model in the context is never modified; every method works on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from mipp.activations import capture_io
from mipp.groups import build_graph
from mipp.progress import Phase
from mipp.methods.context import Selection, SelectionContext, register_selector

SCORE_BATCH = 256  # samples per gradient batch (SNIP uses one such batch)
TAYLOR_BATCHES = 4  # batches whose gradients Taylor accumulates
GRASP_BATCHES = 2
GRASP_TEMPERATURE = 200.0  # logits / T, as in the GraSP reference code
SYNFLOW_ROUNDS = 100  # the SynFlow paper's number of prune-rescore rounds
THINET_ROWS = 16_384  # sampled (sample, output unit, position) rows per group
THINET_SAMPLES = 512  # calibration samples whose conv patches are unfolded
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# Turning scores into keep sets


def _normalised(score: torch.Tensor) -> torch.Tensor:
    mean = score.mean()
    return score / mean if mean > 0 else torch.ones_like(score)


def keep_from_scores(
    ctx: SelectionContext, scores: Mapping[str, torch.Tensor],
    alive: Mapping[str, torch.Tensor] | None = None, keep_fraction: float | None = None,
    counts: Mapping[str, int] | None = None,
) -> dict[str, list[int]]:
    """Kept indices per group: top scores per group (counts) or a global normalised ranking.

    `alive` (bool per unit) restricts the choice to units not already removed; `counts`
    overrides `ctx.keep_count`; `keep_fraction` overrides 1 - target in the global ranking.
    Ties are broken by the lower index.
    """
    groups = ctx.groups
    alive = alive or {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
    if counts is not None or ctx.counts is not None:
        counts = counts or {g.name: ctx.keep_count(g) for g in groups}
        return {g.name: _top(scores[g.name], alive[g.name], counts[g.name]) for g in groups}

    keep_fraction = 1 - ctx.config.target if keep_fraction is None else keep_fraction
    total = sum(g.size for g in groups)
    n_keep = max(len(groups), int(round(total * keep_fraction)))
    ranked = []
    for g in groups:
        score = torch.full((g.size,), float("-inf"), dtype=torch.float64)
        live = alive[g.name]
        score[live] = _normalised(scores[g.name].double()[live].clamp_min(0))
        # The collapse guard: every group keeps its best live unit whatever the ranking says.
        score[_top(scores[g.name], live, 1)[0]] = float("inf")
        ranked += [(-float(s), g.name, i) for i, s in enumerate(score.tolist())]
    ranked.sort()
    keep: dict[str, list[int]] = {g.name: [] for g in groups}
    for _, name, index in ranked[:n_keep]:
        keep[name].append(index)
    return {name: sorted(kept) for name, kept in keep.items()}


def _top(score: torch.Tensor, alive: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores among live units (ties: lower index first)."""
    score = score.double().clone()
    score[~alive] = float("-inf")
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    return sorted(order[:max(1, min(k, int(alive.sum())))])


def _selection(ctx: SelectionContext, scores: Mapping[str, torch.Tensor],
               keep: Mapping[str, list[int]] | None = None) -> Selection:
    keep = keep if keep is not None else keep_from_scores(ctx, scores)
    layers = {g.name: {"size": g.size, "kept": len(keep[g.name]),
                       "scores": [float(s) for s in scores[g.name]]} for g in ctx.groups}
    return Selection(keep=dict(keep), layers=layers)


# ---------------------------------------------------------------------------------------------
# Torch-Pruning groups on a working copy


class _Workspace:
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


def _summed_abs_scores(ws: _Workspace, weight_scores: Mapping[nn.Module, torch.Tensor]
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


def _batches(ctx: SelectionContext, count: int):
    for start in range(0, min(len(ctx.x), count * SCORE_BATCH), SCORE_BATCH):
        yield (ctx.x[start:start + SCORE_BATCH].to(ctx.device),
               ctx.y[start:start + SCORE_BATCH].to(ctx.device))


def _weights(model: nn.Module) -> dict[nn.Module, nn.Parameter]:
    return {m: m.weight for m in model.modules()
            if isinstance(m, WEIGHTED) and getattr(m, "weight", None) is not None}


# ---------------------------------------------------------------------------------------------
# After training


@register_selector("random")
def select_random(ctx: SelectionContext) -> Selection:
    """Random: a uniform score per unit from a generator seeded by `config.seed`."""
    generator = torch.Generator().manual_seed(ctx.config.seed)
    scores = {g.name: torch.rand(g.size, generator=generator) for g in ctx.groups}
    return _selection(ctx, scores)


def l1_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """Group L1 norm per unit: Torch-Pruning's GroupMagnitudeImportance(p=1) (mean over the
    group's layers of |w| summed over the unit's output rows, BN weight and input columns)."""
    ws = _Workspace(ctx)
    return ws.importance(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None))


@register_selector("l1")
def select_l1(ctx: SelectionContext) -> Selection:
    """L1 magnitude: keeps the units with the largest group L1 norm of their weights."""
    return _selection(ctx, l1_scores(ctx))


def taylor_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """First-order Taylor (Molchanov et al. 2019): |w * dL/dw| summed over the unit's group,
    gradients accumulated over TAYLOR_BATCHES calibration batches (GroupTaylorImportance)."""
    ws = _Workspace(ctx)
    ws.model.train()
    ws.model.zero_grad(set_to_none=True)
    for xb, yb in _batches(ctx, TAYLOR_BATCHES):
        F.cross_entropy(ws.model(xb), yb).backward()
    return ws.importance(tp.importance.GroupTaylorImportance(normalizer=None))


@register_selector("taylor")
def select_taylor(ctx: SelectionContext) -> Selection:
    """First-order Taylor: keeps the units whose removal changes the loss most to first order."""
    return _selection(ctx, taylor_scores(ctx))


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


@register_selector("thinet")
def select_thinet(ctx: SelectionContext) -> Selection:
    """ThiNet (Luo et al. 2017): per group, greedily removes the units whose summed
    contribution to the consumers' sampled pre-activations is smallest in squared error, so the
    next layer's output stays reconstructable (the engine's least-squares refit then rescales).

    Score reported per unit: its position in the removal order (later removed = higher). A
    group whose consumers it cannot read (grouped conv, concatenation) falls back to L1.
    """
    generator = torch.Generator().manual_seed(ctx.config.seed)
    scores: dict[str, torch.Tensor] = {}
    keep: dict[str, list[int]] = {}
    fallback = None
    for index, group in enumerate(ctx.groups):
        ctx.progress(Phase.SELECTING, index / len(ctx.groups), f"thinet {group.name}")
        if ctx.counts is not None:
            n_keep = ctx.keep_count(group)
        else:
            n_keep = max(1, int(round(group.size * (1 - ctx.config.target))))
        parts = []
        for consumer in group.consumers:
            inputs, _ = capture_io(ctx.model, consumer, ctx.x, device=ctx.device)
            module = dict(ctx.model.named_modules())[consumer]
            per = max(1, THINET_ROWS // len(group.consumers))
            part = _thinet_contributions(module, inputs, group.size, per, generator)
            if part is None:
                parts = []
                break
            parts.append(part)
        if not parts:
            fallback = fallback or l1_scores(ctx)
            scores[group.name] = fallback[group.name]
            keep[group.name] = _top(fallback[group.name], torch.ones(group.size, dtype=torch.bool),
                                    n_keep)
            continue
        order = thinet_removal_order(torch.cat(parts), group.size - 1)
        order.append(next(i for i in range(group.size) if i not in order))
        rank = torch.empty(group.size)
        rank[torch.tensor(order)] = torch.arange(1, group.size + 1, dtype=torch.float32)
        scores[group.name] = rank / group.size
        keep[group.name] = sorted(order[group.size - n_keep:])
    return _selection(ctx, scores, keep)


# ---------------------------------------------------------------------------------------------
# At initialisation


def snip_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): connection sensitivity |g * w| on one calibration batch, summed
    over each unit's group."""
    ws = _Workspace(ctx)
    ws.model.train()
    ws.model.zero_grad(set_to_none=True)
    xb, yb = next(_batches(ctx, 1))
    F.cross_entropy(ws.model(xb), yb).backward()
    weights = _weights(ws.model)
    return _summed_abs_scores(ws, {m: (w.grad * w).detach() if w.grad is not None else None
                                   for m, w in weights.items()})


@register_selector("snip")
def select_snip(ctx: SelectionContext) -> Selection:
    """SNIP, structured: keeps the units with the largest summed |g * w|."""
    return _selection(ctx, snip_scores(ctx))


def grasp_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): -w * (H g), the Hessian-gradient product of the loss
    (logits / 200) on GRASP_BATCHES calibration batches, |.| summed over each unit's group
    (the MIPP paper's way of making it structured; the sign is dropped)."""
    ws = _Workspace(ctx)
    ws.model.train()
    weights = _weights(ws.model)
    params = list(weights.values())
    batches = list(_batches(ctx, GRASP_BATCHES))
    grads = [torch.zeros_like(p) for p in params]
    for xb, yb in batches:
        loss = F.cross_entropy(ws.model(xb) / GRASP_TEMPERATURE, yb)
        for total, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                total += g
    ws.model.zero_grad(set_to_none=True)
    for xb, yb in batches:
        loss = F.cross_entropy(ws.model(xb) / GRASP_TEMPERATURE, yb)
        g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        z = sum((gi * fixed).sum() for gi, fixed in zip(g, grads) if gi is not None)
        z.backward()
    return _summed_abs_scores(ws, {m: (-w.detach() * w.grad) if w.grad is not None else None
                                   for m, w in weights.items()})


@register_selector("grasp")
def select_grasp(ctx: SelectionContext) -> Selection:
    """GraSP, structured: keeps the units with the largest summed |w * Hg|."""
    return _selection(ctx, grasp_scores(ctx))


def _linearised(ws: _Workspace) -> None:
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


def _synflow_round(ws: _Workspace, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    ws.model.zero_grad(set_to_none=True)
    ones = torch.ones(1, *input_shape, dtype=torch.float64, device=ws.example.device)
    ws.model(ones).sum().backward()
    weights = _weights(ws.model)
    scores = {m: (w.grad * w).detach() if w.grad is not None else None for m, w in weights.items()}
    # Sum over groups without touching the linearised weights (a copy holds the scores).
    sums = {}
    with torch.no_grad():
        saved = {m: w.detach().clone() for m, w in weights.items()}
        sums = _summed_abs_scores(ws, scores)
        for m, w in weights.items():
            w.copy_(saved[m])
    return sums


def _mask_units(ws: _Workspace, name: str, removed: list[int]) -> None:
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


def synflow_scores(ctx: SelectionContext, rounds: int = SYNFLOW_ROUNDS
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """SynFlow (Tanaka et al. 2020), iterative and structured: data-free scores
    |w * dR/dw| with R the output sum of the |w| network on an all-ones input, summed over each
    unit's group; `rounds` times prune to an exponentially shrinking share and rescore.

    Returns (last round's scores of all units, with removed units at 0; keep sets).
    """
    ws = _Workspace(ctx)
    _linearised(ws)
    input_shape = tuple(ctx.x.shape[1:])
    alive = {g.name: torch.ones(g.size, dtype=torch.bool) for g in ctx.groups}
    final = {g.name: ctx.keep_count(g) for g in ctx.groups} if ctx.counts is not None else None
    keep_fraction = None if final is not None else 1 - ctx.config.target
    scores: dict[str, torch.Tensor] = {}
    keep: dict[str, list[int]] = {}
    for k in range(1, rounds + 1):
        ctx.progress(Phase.SELECTING, (k - 1) / rounds, f"synflow round {k}/{rounds}")
        scores = _synflow_round(ws, input_shape)
        share = k / rounds
        if final is not None:
            counts = {g.name: max(final[g.name], int(round(g.size * (final[g.name] / g.size) ** share)))
                      for g in ctx.groups}
            keep = keep_from_scores(ctx, scores, alive, counts=counts)
        else:
            keep = keep_from_scores(ctx, scores, alive, keep_fraction=keep_fraction ** share)
        for g in ctx.groups:
            kept = torch.zeros(g.size, dtype=torch.bool)
            kept[keep[g.name]] = True
            _mask_units(ws, g.name, [i for i in range(g.size) if alive[g.name][i] and not kept[i]])
            alive[g.name] = kept
    return scores, keep


@register_selector("synflow")
def select_synflow(ctx: SelectionContext) -> Selection:
    """SynFlow, iterative and structured: keeps the units with the largest summed synaptic
    flow |w * dR/dw| after SYNFLOW_ROUNDS prune-rescore rounds."""
    scores, keep = synflow_scores(ctx)
    return _selection(ctx, scores, keep)
