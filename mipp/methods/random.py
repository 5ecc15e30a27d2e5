"""Random: a uniform score per unit, the control every criterion must beat."""

from __future__ import annotations

import torch

from mipp.method_registry import register_method
from mipp.methods.context import SelectionContext


@register_method("random", kind="scores")
def random_scores(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    """Random: a uniform score per unit from a generator seeded by `config.seed`."""
    generator = torch.Generator().manual_seed(ctx.config.seed)
    return {g.name: torch.rand(g.size, generator=generator) for g in ctx.groups}
