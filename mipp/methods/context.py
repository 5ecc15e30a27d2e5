"""What every selection method sees and returns: `SelectionContext -> Selection`.

    ctx = SelectionContext(model, groups, x, y, PruneConfig(method="l1", target=0.5))
    selection = mipp.methods.allocation.select(ctx)   # Selection(keep={"fc1": [...]}, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mipp.config import PruneConfig
from mipp.groups import UnitGroup
from mipp.progress import ProgressCallback, no_progress


@dataclass
class SelectionContext:
    """What a selection method sees. `model` must not be modified.

    x, y: calibration inputs (n, ...) and labels (n,) on the CPU; groups: the prunable unit
    groups (ignored layers already left out). alive: set by the allocator for an iterative
    scorer, bool per unit still in; scratch: state such a scorer keeps between rounds.
    """

    model: nn.Module
    groups: list[UnitGroup]
    x: torch.Tensor
    y: torch.Tensor
    config: PruneConfig
    device: torch.device = torch.device("cpu")
    progress: ProgressCallback = no_progress
    alive: dict[str, torch.Tensor] | None = None
    scratch: dict = field(default_factory=dict)


@dataclass
class Selection:
    """Kept unit indices per group name, and per-layer figures for the report.

    phases: seconds the selection spent per phase, summed over layers (a method that records
    them; MIPP: activations, reference_fit, control, ordering, screening, finetune)."""

    keep: dict[str, list[int]]
    layers: dict[str, dict] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


def removed_fraction(groups: list[UnitGroup], keep: dict[str, list[int]]) -> float:
    total = sum(g.size for g in groups)
    kept = sum(len(keep.get(g.name, range(g.size))) for g in groups)
    return 1 - kept / total if total else 0.0
