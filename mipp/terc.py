"""TERC selection for one layer: which units the next layer does not need (spec steps 3-7).

Units are visited least informative first (MI ordering); unit i is pruned when the next layer
can still be reconstructed from the kept units: the R masked fine-tunes lose no more than
`tol` x the layer's estimated MI compared with an unmasked control, at confidence x.

    decision = terc_select(x, y, config, seed=0)       # x: (n, d_in), y: (n, d_out)
    decision.kept, decision.pruned

Two paths, one contract: `path="sequential"` tests one candidate at a time (the reference);
`path="fast"` trains blocks of candidates x R repeats as one batched model with exact
speculation (assume-prune: prefixes; assume-keep: candidates alone), chosen from the recent
keep rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from scipy import stats

from mipp.config import PruneConfig
from mipp.estimator import (BatchedMLP, Split, empty_loss, evaluate_split, fit, hidden_width,
                            split_rows, standardise)


@dataclass
class LayerDecision:
    """What TERC decided for one layer, with the figures behind it.

    order: units in the order tested (least informative first); units: per tested unit
    {unit, mean_d, sd_d, threshold, kept}; loss_empty / loss_ref / mi are validation MSE on
    standardised targets (mi = loss_empty - loss_ref, the layer's estimated MI).
    """

    size: int
    kept: list[int]
    pruned: list[int]
    constant: list[int]
    order: list[int]
    loss_empty: float
    loss_ref: float
    mi: float
    units: list[dict] = field(default_factory=list)
    fits: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"units_before": self.size, "units_after": len(self.kept),
                "constant_units": len(self.constant), "loss_empty": self.loss_empty,
                "loss_ref": self.loss_ref, "mi_estimate": self.mi,
                "candidate_fits": self.fits, "seconds": round(self.seconds, 3)}


class _Test:
    """The keep rule: mean(d) must exceed `threshold` with confidence x (one-sided)."""

    def __init__(self, config: PruneConfig):
        r = config.repeats
        self.critical = (float(stats.t.ppf(config.confidence, r - 1)) if config.test == "t"
                         else 2.0)  # the authors' code: mean - 2 * sd / sqrt(R)
        self.sqrt_r = r ** 0.5

    def keep(self, d: torch.Tensor, threshold: float) -> tuple[bool, float, float]:
        mean, sd = float(d.mean()), float(d.std())
        return mean - self.critical * sd / self.sqrt_r > threshold, mean, sd


def _unit_order(split: Split, units: list[int], config: PruneConfig,
                generator: torch.Generator) -> list[int]:
    """MI ordering: fit one predictor per unit from X[:, i] alone; least informative first."""
    if len(units) <= 1:
        return list(units)
    rc = config.reconstructor
    index = torch.tensor(units, device=split.x_train.device)
    per_unit = Split(split.x_train[:, index].T.unsqueeze(-1), split.y_train,
                     split.x_val[:, index].T.unsqueeze(-1), split.y_val)
    mlps = BatchedMLP.create(len(units), 1, min(32, hidden_width(split.y_train.shape[1], rc.hidden_cap)),
                             split.y_train.shape[1], generator=generator, device=split.x_train.device)
    losses = fit(mlps, per_unit, epochs=rc.ordering_epochs, patience=rc.patience, lr=rc.lr,
                 batch_size=rc.batch_size, generator=generator, x_per_model=True)
    ranked = torch.argsort(losses, descending=True, stable=True).tolist()
    return [units[i] for i in ranked]


def terc_select(x: torch.Tensor, y: torch.Tensor, config: PruneConfig, *, seed: int = 0,
                progress: Callable[[float, str], None] | None = None) -> LayerDecision:
    """Decide which columns (units) of x to prune so that y stays reconstructable.

    x: (n, d_in) activations of the layer's units; y: (n, d_out) the next layer's kept
    activations (or the logits). Constant units are pruned up front; the last remaining unit is
    never pruned. Raises ValueError if x and y have different row counts.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    started = time.perf_counter()
    progress = progress or (lambda fraction, message: None)
    rc = config.reconstructor
    generator = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    xs, constant_mask = standardise(x.float(), config.std_floor)
    ys, y_constant = standardise(y.float(), config.std_floor)
    ys = ys[:, ~y_constant] if bool((~y_constant).any()) else ys
    constant = torch.nonzero(constant_mask).flatten().tolist()
    # Layer-collapse guard: constant units go, but never below the floor (at least one unit).
    floor = min(d, config.min_units)
    pruned = constant[:max(0, d - floor)] if len(constant) > d - floor else list(constant)
    live = [i for i in range(d) if i not in set(pruned)]  # constants kept by the floor included

    split = split_rows(xs, ys, config.val_fraction, generator)
    loss_empty = empty_loss(split)
    fit_kw = dict(patience=rc.patience, lr=rc.lr, batch_size=rc.batch_size, generator=generator)
    reference = BatchedMLP.create(config.repeats, d, hidden_width(ys.shape[1], rc.hidden_cap),
                                  ys.shape[1], generator=generator, device=xs.device)
    progress(0.0, "reference fit")
    fit(reference, split, epochs=rc.epochs, **fit_kw)
    # The control: the same short fine-tune without a mask, so that d measures the mask only.
    control = reference.copy()
    if config.control:
        loss_ref_r = fit(control, split, epochs=rc.finetune_epochs, **fit_kw)
    else:
        loss_ref_r = evaluate_split(control, split)
    loss_ref = float(loss_ref_r.mean())
    mi = loss_empty - loss_ref
    scale = mi if config.tol_scale == "mi" else loss_ref
    threshold = config.tol * max(scale, 0.0)

    progress(0.05, "MI ordering")
    order = _unit_order(split, live, config, generator)
    decision = LayerDecision(size=d, kept=[], pruned=pruned, constant=constant, order=order,
                             loss_empty=loss_empty, loss_ref=loss_ref, mi=mi)
    test = _Test(config)

    def masks_for(sets: list[list[int]]) -> torch.Tensor:
        mask = torch.ones(len(sets) * config.repeats, d, device=xs.device)
        for b, removed in enumerate(sets):
            mask[b * config.repeats:(b + 1) * config.repeats, removed] = 0
        return mask

    def run(sets: list[list[int]]) -> torch.Tensor:
        """Masked fine-tunes for each removal set, all as one batched model; (len(sets), R)."""
        models = reference.tiled(len(sets))
        losses = fit(models, split, epochs=rc.finetune_epochs, mask=masks_for(sets), **fit_kw)
        decision.fits += len(sets)
        return losses.view(len(sets), config.repeats) - loss_ref_r.unsqueeze(0)

    def run_one_by_one(removed: list[int]) -> torch.Tensor:
        """The reference path: one removal set, the R repeats fitted one after another; (1, R)."""
        mask = masks_for([removed])[:1]
        losses = [fit(reference.pick(r), split, epochs=rc.finetune_epochs, mask=mask, **fit_kw)
                  for r in range(config.repeats)]
        decision.fits += 1
        return (torch.cat(losses) - loss_ref_r).unsqueeze(0)

    def record(unit: int, d_unit: torch.Tensor) -> bool:
        keep, mean, sd = test.keep(d_unit, threshold)
        decision.units.append({"unit": unit, "mean_d": mean, "sd_d": sd,
                               "threshold": threshold, "kept": keep})
        return keep

    position, recent = 0, []
    while position < len(order):
        progress(0.1 + 0.9 * position / len(order), f"unit {position + 1}/{len(order)}")
        remaining = d - len(decision.pruned)
        if remaining <= floor:  # never prune the last unit(s) of a layer
            decision.kept.extend(order[position:])
            break
        one_at_a_time = config.path == "sequential" or config.speculation == "off"
        block = order[position:position + (1 if one_at_a_time else config.block_size)]
        mode = _mode(config, recent)
        if mode == "prune":
            block = block[:remaining - floor]
            sets = [decision.pruned + block[:k + 1] for k in range(len(block))]
        else:
            sets = [decision.pruned + [c] for c in block]
        if config.path == "sequential":
            results = torch.cat([run_one_by_one(s) for s in sets])
        else:
            results = run(sets)
        for k, unit in enumerate(block):
            keep = record(unit, results[k])
            position += 1
            recent.append(keep)
            if keep:
                decision.kept.append(unit)
                if mode == "prune":  # later prefixes assumed this unit pruned: stale
                    break
            else:
                decision.pruned.append(unit)
                if mode == "keep":  # later singles assumed this unit kept: stale
                    break
    decision.kept = sorted(decision.kept)
    decision.pruned = sorted(decision.pruned)
    decision.seconds = time.perf_counter() - started
    return decision


def _mode(config: PruneConfig, recent: list[bool]) -> str:
    """Speculation mode for the next block: from config, or from the keep rate of the last 16."""
    if config.speculation in ("prune", "keep"):
        return config.speculation
    if config.path == "sequential" or config.speculation == "off":
        return "keep"  # with a block of one both modes are the same single test
    window = recent[-16:]
    keep_rate = sum(window) / len(window) if window else 0.5
    return "keep" if keep_rate >= 0.5 else "prune"
