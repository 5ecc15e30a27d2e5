"""Compatibility: the baselines are now one file each in mipp/methods/ (random, l1, taylor,
thinet, snip, grasp, synflow) and turned into kept sets by mipp.methods.allocation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mipp.methods.allocation import floor, keep_global, keep_top
from mipp.methods.context import SelectionContext
from mipp.methods.grasp import grasp_scores  # noqa: F401
from mipp.methods.l1 import l1_scores  # noqa: F401
from mipp.methods.random import random_scores  # noqa: F401
from mipp.methods.snip import snip_scores  # noqa: F401
from mipp.methods.synflow import synflow_scores  # noqa: F401
from mipp.methods.taylor import taylor_scores  # noqa: F401
from mipp.methods.thinet import choose_thinet, thinet_removal_order  # noqa: F401


def keep_from_scores(ctx: SelectionContext, scores: Mapping[str, torch.Tensor],
                     alive: Mapping[str, torch.Tensor] | None = None,
                     keep_fraction: float | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """The former helper: `keep_top` at `counts` (or `ctx.config.counts`), else `keep_global`
    at `keep_fraction` (default 1 - target) with the min_units floors."""
    counts = counts if counts is not None else ctx.config.counts
    if counts is not None:
        return keep_top(scores, counts, alive)
    fraction = 1 - ctx.config.target if keep_fraction is None else keep_fraction
    return keep_global(scores, fraction, {g.name: floor(ctx.config, g) for g in ctx.groups},
                       alive)
