"""Units and their coupling: which output channels/neurons can be removed together.

A *unit group* is a Torch-Pruning dependency group rooted at a Conv/Linear output dimension:
the root's output channels plus every coupled op (BatchNorm, the next layer's input channels,
residual adds). Its units are indexed 0..size-1 in the root's output order.

    groups = find_unit_groups(model, example_input)
    history = apply_keep_sets(model, example_input, {"conv1": [0, 2, 5]})
    skipped = unprunable_layers(model, example_input)   # what is left alone, and why

Any nn.Module the DependencyGraph traces works, not only the zoo: residual adds, concatenation
(a consumer reads a group's units at an offset, kept in `consumer_inputs`), depthwise
convolutions (coupled to their input), grouped convolutions, global pooling. A grouped conv
with g groups stays valid only if each of its g input and g output partitions keeps the same
number of channels: a group that feeds one or is one's output records g in `partitions`, and
`align_to_partitions` makes a kept set obey it (the allocator calls it after every method).
A group coupled to something mipp does not prune (a LayerNorm, an embedding, a bare
nn.Parameter, any other layer with parameters; a grouped conv that reads a concatenation) is
left alone and reported, never half-pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import math

import torch
import torch_pruning as tp
from torch import nn

from mipp.errors import ConfigError, ModelError

PRUNABLE = (nn.Conv2d, nn.Linear)
# Layers with parameters that a group may contain and Torch-Pruning shrinks correctly.
COUPLABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class UnitGroup:
    """One prunable group.

    name: the root module's qualified name; size: units (output channels) it has now;
    members: modules whose outputs are these units (coupled by residual adds);
    consumers: Conv/Linear modules whose *inputs* are these units.
    consumer_inputs: per consumer, the input channels/features that carry the units, in unit
    order (a concatenation offsets them; a Flatten spreads a channel over several features).
    partitions: the units fall into this many equal contiguous blocks, and a kept set must keep
    the same count in each (the lcm of the `groups` of the grouped convs they feed or come
    from; 1 when none does). See `align_to_partitions`.
    """

    name: str
    size: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    consumer_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    partitions: int = 1


def classifier_name(model: nn.Module) -> str:
    """The module that produces the logits: the last nn.Linear, which is never pruned."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("the model has no nn.Linear classifier; mipp needs one to find the logits")
    return linears[-1]


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace `model` once with `example_input` (a batch of one or more samples)."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules()}


def _unit_group(graph: tp.DependencyGraph, group, names: dict[nn.Module, str]) -> UnitGroup:
    root = group[0].dep.target.module
    members, consumers, inputs = [], [], {}
    partitions = 1
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, PRUNABLE):
            continue
        name = names[module]
        if graph.is_out_channel_pruning_fn(dep.handler):
            members.append(name)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            consumers.append(name)
            inputs[name] = tuple(int(i) for i in idxs)
        else:
            continue
        if _is_grouped_conv(module):
            partitions = math.lcm(partitions, module.groups)
    size = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
    return UnitGroup(names[root], size, tuple(dict.fromkeys(members)),
                     tuple(dict.fromkeys(consumers)), tuple(inputs.items()), partitions)


def _is_grouped_conv(module: nn.Module) -> bool:
    """A grouped convolution other than depthwise (groups == in == out channels)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _blocker(graph: tp.DependencyGraph, group, names: dict) -> str | None:
    """Why a dependency group must be left alone, or None when mipp can prune it."""
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):
            return "it is coupled to a bare nn.Parameter, which mipp does not prune"
        if _is_grouped_conv(module):
            where = f"grouped convolution {names.get(module, '?')!r} (groups={module.groups})"
            if module.groups == module.out_channels:
                # Torch-Pruning takes groups == out_channels for depthwise and would prune its
                # inputs one for one with its outputs, which is wrong when in != out.
                return (f"it is coupled to {where}, whose groups equal its output channels "
                        "but not its input channels, which mipp does not prune")
            if graph.is_in_channel_pruning_fn(dep.handler) and \
                    [int(i) for i in idxs] != list(range(module.in_channels)):
                # Its partitions would span several groups (a concatenation), and keeping
                # them equal would couple those groups' counts.
                return (f"it feeds {where} together with other layers (a concatenation), "
                        "which mipp does not prune")
        if isinstance(module, nn.Module) and not isinstance(module, COUPLABLE) and \
                any(True for _ in module.parameters(recurse=False)):
            return (f"it is coupled to {names.get(module, '?')!r} ({type(module).__name__}), "
                    "a layer with parameters that mipp does not prune")
    return None


def _dependency_groups(model: nn.Module, example_input: torch.Tensor,
                       ignored: set[str]) -> tuple[list[UnitGroup], dict[str, str]]:
    """(prunable groups, {root name: why it is left alone}) of the traced graph."""
    names = _module_names(model)
    modules = dict(model.named_modules())
    graph = build_graph(model, example_input)
    groups, blocked = [], {}
    for group in graph.get_all_groups(ignored_layers=[modules[n] for n in ignored],
                                      root_module_types=PRUNABLE):
        unit_group = _unit_group(graph, group, names)
        if set(unit_group.members) & ignored:
            continue
        if (why := _blocker(graph, group, names)) is not None:
            for member in unit_group.members:
                blocked[member] = why
            continue
        groups.append(unit_group)
    return groups, blocked


def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear modules in the order a forward pass first calls them."""
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order


def find_unit_groups(
    model: nn.Module, example_input: torch.Tensor, ignored: Iterable[str] = ()
) -> list[UnitGroup]:
    """Every prunable group of `model`, in forward execution order of the root.

    The classifier and every group that contains an `ignored` module (by name) are left out.
    Raises ConfigError for an ignored name that is not a module of the model.
    """
    names = _module_names(model)
    modules = dict(model.named_modules())
    ignored = set(ignored)
    unknown = ignored - set(modules)
    if unknown:
        raise ConfigError(f"ignored_layers: {sorted(unknown)} are not modules of the model; "
                          f"valid names include {sorted(n for n, m in modules.items() if isinstance(m, PRUNABLE))}")
    ignored.add(classifier_name(model))
    groups, _ = _dependency_groups(model, example_input, ignored)
    rank = {name: i for i, name in enumerate(execution_order(model, example_input))}
    first = lambda names: sorted(names, key=lambda n: rank.get(n, len(rank)))  # noqa: E731
    # Name a group by the member a forward pass reaches first (the stem, not a later block).
    groups = [replace(g, name=first(g.members)[0], members=tuple(first(g.members)),
                      consumers=tuple(first(g.consumers))) for g in groups]
    return sorted(groups, key=lambda g: rank.get(g.name, len(rank)))


def unprunable_layers(model: nn.Module, example_input: torch.Tensor,
                      ignored: Iterable[str] = ()) -> list[dict[str, str]]:
    """Layers with parameters whose units mipp leaves alone, each with the reason:
    [{"name", "type", "reason"}], in module order. The classifier and `ignored` layers are
    not listed (they are left alone by request)."""
    ignored = set(ignored) | {classifier_name(model)}
    groups, blocked = _dependency_groups(model, example_input, ignored)
    pruned = {m for g in groups for m in g.members} | {c for g in groups for c in g.consumers}
    rows = []
    for name, module in model.named_modules():
        if name in ignored or not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, PRUNABLE) and name in blocked:
            reason = blocked[name]
        elif isinstance(module, PRUNABLE) and name not in pruned:
            reason = "no prunable group reaches it (its outputs feed the classifier directly " \
                     "or the graph could not trace it)"
        elif not isinstance(module, COUPLABLE):
            reason = f"{type(module).__name__} layers are not pruned (only Conv2d/Linear units)"
        else:
            continue
        rows.append({"name": name, "type": type(module).__name__, "reason": reason})
    return rows


def apply_keep_sets(
    model: nn.Module, example_input: torch.Tensor, keep: Mapping[str, Sequence[int]]
) -> list[dict]:
    """Physically remove every unit not in `keep[group]` (in place); groups not named keep all.

    Returns the replayable history: `[{"group": name, "removed": [indices in the original
    numbering]}]`. Raises ConfigError for an unknown group, an index out of range, or a keep set
    that would leave a group empty.
    """
    graph = build_graph(model, example_input)
    modules = dict(model.named_modules())
    history = []
    for name, kept in keep.items():
        if name not in modules:
            raise ConfigError(f"keep set names {name!r}, which is not a module of the model")
        root = modules[name]
        size = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        kept = sorted(set(int(i) for i in kept))
        if not kept:
            raise ConfigError(f"keep set for {name!r} is empty; at least one unit must stay")
        if kept[0] < 0 or kept[-1] >= size:
            raise ConfigError(f"keep set for {name!r} has indices outside 0..{size - 1}")
        removed = sorted(set(range(size)) - set(kept))
        if removed:
            _prune(graph, root, removed, name)
            history.append({"group": name, "removed": removed})
    return history


def replay_history(model: nn.Module, example_input: torch.Tensor, history: Sequence[Mapping]) -> None:
    """Apply a history from `apply_keep_sets` to a fresh copy of the original model."""
    graph = build_graph(model, example_input)
    modules = dict(model.named_modules())
    for step in history:
        if step["group"] not in modules:
            raise ModelError(f"pruning history names {step['group']!r}, not a module of this model")
        _prune(graph, modules[step["group"]], list(step["removed"]), step["group"])


def align_to_partitions(keep: Sequence[int], size: int, partitions: int,
                        scores: Sequence[float] | None = None) -> list[int]:
    """`keep` grown until each of the `partitions` equal contiguous blocks of 0..size-1 keeps
    the same number of units: the count of its fullest block (at least one), so that no unit
    the method chose is dropped. Each block is filled with its best extra units: the highest
    `scores` (ties: lower index), or the lowest indices without scores. Sorted."""
    if partitions <= 1:
        return sorted(set(int(i) for i in keep))
    if size % partitions:
        raise ValueError(f"{size} units do not split into {partitions} equal partitions")
    block = size // partitions
    chosen: list[set[int]] = [set() for _ in range(partitions)]
    for i in keep:
        chosen[int(i) // block].add(int(i))
    per_block = max(1, max(len(c) for c in chosen))

    def rank(i: int) -> tuple[float, int]:
        return (-float(scores[i]) if scores is not None else 0.0, i)

    for p, kept in enumerate(chosen):
        extra = sorted(set(range(p * block, (p + 1) * block)) - kept, key=rank)
        kept.update(extra[:per_block - len(kept)])
    return sorted(i for kept in chosen for i in kept)


def _check_partitions(channels: Sequence[int], total: int, groups: int, what: str) -> None:
    """Removing `channels` of `total` must leave each of `groups` partitions the same, non-zero
    count, or the grouped convolution is no longer valid."""
    block = total // groups
    left = [block - sum(1 for c in channels if c // block == p) for p in range(groups)]
    if len(set(left)) != 1 or left[0] == 0:
        raise ConfigError(f"{what}: the kept units leave {left} channels in the {groups} "
                          "partitions of a grouped convolution; each must keep the same "
                          "non-zero count (see mipp.groups.align_to_partitions)")


def _prune(graph: tp.DependencyGraph, root: nn.Module, removed: list[int], name: str) -> None:
    """Remove `removed` output units of `root` and everything coupled to them.

    Torch-Pruning shrinks a grouped conv's input channels by keeping the same weight columns
    for every partition (the first partition's), which is right only when every partition
    loses the same positions; so each such conv's weight is rebuilt here from the original,
    each output channel keeping the columns of its own partition's kept inputs.
    """
    group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                    removed)
    grouped: dict[nn.Module, dict] = {}
    for dep, idxs in group:
        module = dep.target.module
        if not (_is_grouped_conv(module) and module.groups != module.out_channels):
            continue
        entry = grouped.setdefault(module, {"weight": module.weight.detach().clone(),
                                            "out": (), "in": None})
        if graph.is_out_channel_pruning_fn(dep.handler):
            entry["out"] = tuple(int(i) for i in idxs)
            _check_partitions(entry["out"], module.out_channels, module.groups,
                              f"keep set for {name!r}")
        elif graph.is_in_channel_pruning_fn(dep.handler):
            entry["in"] = tuple(int(i) for i in idxs)
            _check_partitions(entry["in"], module.in_channels, module.groups,
                              f"keep set for {name!r}")
    group.prune()
    for module, entry in grouped.items():
        if entry["in"] is None:
            continue
        weight, groups = entry["weight"], module.groups
        out_block, in_block = weight.shape[0] // groups, weight.shape[1]
        gone_out, gone_in = set(entry["out"]), set(entry["in"])
        rows = []
        for o in range(weight.shape[0]):
            if o in gone_out:
                continue
            p = o // out_block
            columns = [c - p * in_block for c in range(p * in_block, (p + 1) * in_block)
                       if c not in gone_in]
            rows.append(weight[o, columns])
        module.weight = nn.Parameter(torch.stack(rows).contiguous())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
