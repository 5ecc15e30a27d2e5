"""Units and their coupling: which output channels/neurons can be removed together.

A *unit group* is a Torch-Pruning dependency group rooted at a Conv/Linear output dimension:
the root's output channels plus every coupled op (BatchNorm, the next layer's input channels,
residual adds). Its units are indexed 0..size-1 in the root's output order.

    groups = find_unit_groups(model, example_input)
    history = apply_keep_sets(model, example_input, {"conv1": [0, 2, 5]})
    skipped = unprunable_layers(model, example_input)   # what is left alone, and why

Any nn.Module the DependencyGraph traces works, not only the zoo: residual adds, concatenation
(a consumer reads a group's units at an offset, kept in `consumer_inputs`), depthwise
convolutions (coupled to their input), global pooling. A group coupled to something mipp does
not prune (a grouped, non-depthwise convolution; a LayerNorm, an embedding, a bare
nn.Parameter, any other layer with parameters) is left alone and reported, never half-pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

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
    """

    name: str
    size: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    consumer_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()


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
    size = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
    return UnitGroup(names[root], size, tuple(dict.fromkeys(members)),
                     tuple(dict.fromkeys(consumers)), tuple(inputs.items()))


def _is_grouped_conv(module: nn.Module) -> bool:
    """A grouped convolution other than depthwise (groups == in == out channels)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)


def _blocker(group, names: dict) -> str | None:
    """Why a dependency group must be left alone, or None when mipp can prune it."""
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):
            return "it is coupled to a bare nn.Parameter, which mipp does not prune"
        if _is_grouped_conv(module):
            return (f"it is coupled to grouped convolution {names.get(module, '?')!r} "
                    f"(groups={module.groups}), which mipp does not prune")
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
        if (why := _blocker(group, names)) is not None:
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
            prune_fn = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, prune_fn, removed).prune()
            history.append({"group": name, "removed": removed})
    return history


def replay_history(model: nn.Module, example_input: torch.Tensor, history: Sequence[Mapping]) -> None:
    """Apply a history from `apply_keep_sets` to a fresh copy of the original model."""
    graph = build_graph(model, example_input)
    modules = dict(model.named_modules())
    for step in history:
        if step["group"] not in modules:
            raise ModelError(f"pruning history names {step['group']!r}, not a module of this model")
        root = modules[step["group"]]
        prune_fn = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, prune_fn, list(step["removed"])).prune()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
