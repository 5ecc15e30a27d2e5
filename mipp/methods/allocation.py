"""The one allocator: how many units each layer keeps, and the kept sets, for every method.

    selection = select(ctx)                      # ctx.config.method under ctx.config.allocation
    counts = layer_counts(ctx, method)           # {group: units to keep}, or None (see below)
    keep = keep_top(scores, counts)              # a scorer's top units per group

A method only scores units or chooses them (mipp.method_registry); this module owns
`target`, `counts`, `min_units` and the allocation rule, so every method is held to the same
budget (Torch-Pruning's split: `Importance` scores, `BasePruner` allocates). `ignored_layers`
are left out of the groups before any method runs (`prunable_groups`). Rules
(`PruneConfig.allocation`):

- `counts`: the per-layer counts given in `config.counts`;
- `uniform`: every layer keeps round((1 - target) x its units);
- `global`: scores divided by their layer's mean and ranked across all layers, top
  (1 - target) of all units kept (Torch-Pruning's global pruning; scorers only);
- `from:<method>`: the per-layer counts <method> arrives at (`from:mipp`: MIPP decides how
  many, this method decides which);
- `auto`: `counts` when counts are given; else MIPP decides its own counts, ThiNet prunes
  uniformly and every scorer globally (the papers' protocols).

Every layer keeps at least min(min_units, its size) units, whatever the rule says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from mipp.errors import ConfigError
from mipp.groups import UnitGroup, align_to_partitions, find_unit_groups
from mipp.method_registry import Method, get_method
from mipp.methods.context import Selection, SelectionContext
from mipp.progress import Phase

RULES = ("auto", "counts", "uniform", "global", "from:<method>")


def prunable_groups(model: nn.Module, example: torch.Tensor, config) -> list[UnitGroup]:
    """The unit groups a method may prune: all but the classifier and `config.ignored_layers`.

    Raises ConfigError naming `ignored_layers` for a name that is not a module of the model.
    """
    return find_unit_groups(model, example, ignored=config.ignored_layers)


def resolve_rule(config, method: Method) -> str:
    """The concrete rule `config.allocation` means for `method` (`auto` resolved)."""
    rule = config.allocation
    if rule != "auto":
        return rule
    if config.counts is not None:
        return "counts"
    if method.decides_counts:
        return "own"
    return "uniform" if method.kind == "chooses" else "global"


def floor(config, group: UnitGroup) -> int:
    """The fewest units `group` may keep: min_units, or all of them in a smaller layer."""
    return min(group.size, config.min_units)


def clamp(config, group: UnitGroup, count: int) -> int:
    """`count` held between the layer's floor (min_units) and its size."""
    return max(floor(config, group), min(group.size, int(count)))


def layer_counts(ctx: SelectionContext, method: Method | None = None) -> dict[str, int] | None:
    """Units to keep per group under the rule, min_units applied; None where no per-layer
    count is fixed in advance (`global` ranks across layers; MIPP under `auto` decides).

    Raises ConfigError naming the field for missing or unknown layers in `counts`, and for a
    rule that needs `target` without one.
    """
    config = ctx.config
    method = method or get_method(config.method)
    rule = resolve_rule(config, method)
    if rule in ("own", "global"):
        return None
    if rule == "counts":
        given = config.counts or {}
        names = [g.name for g in ctx.groups]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(f"counts: {unknown} are not prunable layers of the model; "
                              f"give a count for each of {names}")
        missing = [n for n in names if n not in given]
        if missing:
            raise ConfigError(f"counts: no unit count for layer(s) {missing}; give a count for "
                              f"each of {names}")
        return {g.name: clamp(config, g, given[g.name]) for g in ctx.groups}
    if rule == "uniform":
        if config.target is None:
            raise ConfigError("allocation 'uniform' needs `target` (fraction of units to remove)")
        return {g.name: clamp(config, g, round(g.size * (1 - config.target)))
                for g in ctx.groups}
    if rule.startswith("from:"):
        source = rule.removeprefix("from:")
        sub = dataclasses.replace(ctx, config=config.model_copy(
            update={"method": source, "allocation": "auto", "counts": None}), scratch={})
        chosen = select(sub)
        return {g.name: clamp(config, g, len(chosen.keep[g.name])) for g in ctx.groups}
    raise ConfigError(f"allocation {rule!r} is not one of {', '.join(RULES)}")


def keep_top(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int],
             alive: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """The `counts[g]` highest-scoring units of each group (among `alive` ones; ties: the
    lower index), as sorted index lists."""
    return {name: _top(score, None if alive is None else alive[name], counts[name])
            for name, score in scores.items()}


def keep_global(scores: Mapping[str, torch.Tensor], keep_fraction: float,
                floors: Mapping[str, int],
                alive: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Keep `keep_fraction` of all units by one ranking of scores made comparable across
    groups (each divided by its group's mean over live units); every group keeps at least its
    `floors[g]` best live units whatever the ranking says (the collapse guard)."""
    total = sum(len(s) for s in scores.values())
    guaranteed = {}
    for name, score in scores.items():
        live = _alive(score, None if alive is None else alive[name])
        guaranteed[name] = set(_top(score, live, min(floors[name], int(live.sum()))))
    n_keep = max(sum(len(g) for g in guaranteed.values()), int(round(total * keep_fraction)))
    ranked = []
    for name, score in scores.items():
        live = _alive(score, None if alive is None else alive[name])
        value = torch.full((len(score),), float("-inf"), dtype=torch.float64)
        live_scores = score.double()[live].clamp_min(0)
        mean = live_scores.mean() if len(live_scores) else torch.tensor(0.0)
        value[live] = live_scores / mean if mean > 0 else torch.ones_like(live_scores)
        for index in guaranteed[name]:
            value[index] = float("inf")
        ranked += [(-float(v), name, i) for i, v in enumerate(value.tolist())]
    ranked.sort()
    keep: dict[str, list[int]] = {name: [] for name in scores}
    for _, name, index in ranked[:n_keep]:
        keep[name].append(index)
    return {name: sorted(kept) for name, kept in keep.items()}


def _alive(score: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(len(score), dtype=torch.bool) if alive is None else alive


def _top(score: torch.Tensor, alive: torch.Tensor | None, k: int) -> list[int]:
    """Indices of the k highest scores among live units (ties: lower index first)."""
    score = score.double().clone()
    live = _alive(score, alive)
    score[~live] = float("-inf")
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    return sorted(order[:max(0, min(k, int(live.sum())))])


def _top_in_partitions(score: torch.Tensor, alive: torch.Tensor | None, k: int,
                       partitions: int) -> list[int]:
    """The k best live units taken as k / partitions from each equal block, so that a grouped
    conv stays valid without rounding up; plain `_top` where k does not split evenly or a block
    has too few live units (the allocator's partition rounding then applies)."""
    if partitions <= 1 or k % partitions or len(score) % partitions:
        return _top(score, alive, k)
    block, per = len(score) // partitions, k // partitions
    live = _alive(score, alive)
    kept: list[int] = []
    for p in range(partitions):
        part = slice(p * block, (p + 1) * block)
        if int(live[part].sum()) < per:
            return _top(score, alive, k)
        kept += [p * block + i for i in _top(score[part], live[part], per)]
    return sorted(kept)


def _scored(ctx: SelectionContext, method: Method, counts: dict[str, int] | None) -> Selection:
    """Run a scorer (its rounds, if iterative) and keep its top units under the rule."""
    config = ctx.config
    floors = {g.name: floor(config, g) for g in ctx.groups}
    if counts is None and config.target is None:
        raise ConfigError(f"method {config.method!r} needs `target` (fraction of units to "
                          "remove, 0-1), `counts` or allocation 'from:<method>'")
    alive = {g.name: torch.ones(g.size, dtype=torch.bool) for g in ctx.groups}
    run = dataclasses.replace(ctx, scratch={})
    scores: dict[str, torch.Tensor] = {}
    keep: dict[str, list[int]] = {}
    for k in range(1, method.rounds + 1):
        if method.rounds > 1:
            ctx.progress(Phase.SELECTING, (k - 1) / method.rounds,
                         f"{method.name} round {k}/{method.rounds}")
        run.alive = alive if method.rounds > 1 else None
        scores = {name: s.detach().float().cpu() for name, s in method.fn(run).items()}
        _check_scores(ctx, method, scores)
        # Iterative scorers prune to an exponentially shrinking share (the SynFlow schedule):
        # after round k of n a group keeps size * (final / size) ** (k / n) units.
        share = k / method.rounds
        if counts is not None:
            step = {g.name: max(counts[g.name], int(round(g.size * (counts[g.name] / g.size)
                                                          ** share))) for g in ctx.groups}
            keep = {g.name: _top_in_partitions(scores[g.name], alive[g.name], step[g.name],
                                               g.partitions) for g in ctx.groups}
        else:
            keep = keep_global(scores, (1 - config.target) ** share, floors, alive)
        alive = {g.name: _mask(g.size, keep[g.name]) for g in ctx.groups}
    layers = {g.name: {"size": g.size, "kept": len(keep[g.name]),
                       "scores": [float(s) for s in scores[g.name]]} for g in ctx.groups}
    return Selection(keep=keep, layers=layers)


def _mask(size: int, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[kept] = True
    return mask


def _check_scores(ctx: SelectionContext, method: Method, scores: Mapping[str, torch.Tensor]):
    for g in ctx.groups:
        if g.name not in scores or tuple(scores[g.name].shape) != (g.size,):
            got = tuple(scores[g.name].shape) if g.name in scores else "nothing"
            raise RuntimeError(f"method {method.name!r} scored layer {g.name!r} with {got}; "
                               f"a scorer returns one score per unit, shape ({g.size},)")


def select(ctx: SelectionContext) -> Selection:
    """Run `ctx.config.method` under `ctx.config.allocation`: the one entry point.

    Returns kept indices for every group in `ctx.groups`, each group keeping at least
    min(min_units, size) units and exactly its count where the rule fixes one (more where a
    grouped conv needs equal partitions: `_align_partitions`). Raises
    ConfigError for an unknown method or a rule the method cannot follow.
    """
    method = get_method(ctx.config.method)
    rule = resolve_rule(ctx.config, method)
    if method.kind == "chooses" and rule == "global":
        raise ConfigError(f"allocation 'global' ranks scores across layers, and "
                          f"{method.name!r} chooses units without comparable scores; use "
                          "allocation 'uniform', 'counts' or 'from:<method>'")
    counts = layer_counts(ctx, method)
    if method.kind == "scores":
        selection = _scored(ctx, method, counts)
    else:
        selection = method.fn(ctx, counts)
    _check_kept(ctx, method, selection, counts)
    _align_partitions(ctx, selection)
    if rule.startswith("from:"):
        for name in selection.layers:
            selection.layers[name]["counts_from"] = rule.removeprefix("from:")
    return selection


def _align_partitions(ctx: SelectionContext, selection: Selection) -> None:
    """A group tied to a grouped conv keeps the same count in each of its partitions (or the
    conv is invalid): its kept set is rounded up there, never down, and the report says so."""
    for g in (g for g in ctx.groups if g.partitions > 1):
        kept = selection.keep[g.name]
        info = selection.layers.get(g.name, {})
        aligned = align_to_partitions(kept, g.size, g.partitions, info.get("scores"))
        if len(aligned) != len(kept):
            info["partition_rounding"] = {"partitions": g.partitions, "chosen": len(kept),
                                          "kept": len(aligned)}
            info["kept"] = len(aligned)
            selection.layers[g.name] = info
        selection.keep[g.name] = aligned


def _check_kept(ctx: SelectionContext, method: Method, selection: Selection,
                counts: Mapping[str, int] | None) -> None:
    """The allocator's promise, checked for every method: a bug here is ours, not the user's."""
    for g in ctx.groups:
        kept = selection.keep.get(g.name)
        if kept is None or len(set(kept)) != len(kept) or not all(0 <= i < g.size for i in kept):
            raise RuntimeError(f"method {method.name!r} returned no valid kept set for {g.name!r}")
        want = counts[g.name] if counts is not None else None
        if (want is not None and len(kept) != want) or len(kept) < floor(ctx.config, g):
            raise RuntimeError(f"method {method.name!r} kept {len(kept)} units of {g.name!r}; "
                               f"the allocation asked for {want} (at least "
                               f"{floor(ctx.config, g)})")
