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
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from scipy import stats

from mipp.config import PruneConfig
from mipp.estimator import (BatchedMLP, Compensator, Split, empty_loss, epoch_orders,
                            evaluate_split, fit, hidden_width, split_rows, standardise)


PHASES = ("reference_fit", "control", "ordering", "screening", "finetune")


class PhaseClock:
    """Seconds spent per phase of a layer's selection (perf_counter sums; cheap).

        clock = PhaseClock()
        with clock("screening"):
            ...
        clock.seconds == {"screening": 0.12}
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class LayerDecision:
    """What TERC decided for one layer, with the figures behind it.

    order: units in the order tested (least informative first); units: per tested unit
    {unit, mean_d, sd_d, threshold, kept}; loss_empty / loss_ref / mi are validation MSE on
    standardised targets (mi = loss_empty - loss_ref, the layer's estimated MI). replay: set
    when the kept set is not the walk's own but its tests replayed at another tol by a target
    search ({"sweep_tol", "tol", "cost_factor", "verification"}; mipp/methods/mipp.py).
    sweeps: set by a target search, the sweeps it ran (fits, seconds and phases are then
    summed over them).
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
    screened: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    replay: dict | None = None
    sweeps: int | None = None

    def summary(self) -> dict:
        """phases: seconds spent per phase (PHASES; for a replayed decision, the walk's and
        its verification's). replayed: whether the kept set comes from a target search's replay
        (then `replay` says at which tol and how it was verified)."""
        return {"units_before": self.size, "units_after": len(self.kept),
                "constant_units": len(self.constant), "loss_empty": self.loss_empty,
                "loss_ref": self.loss_ref, "mi_estimate": self.mi,
                "candidate_fits": self.fits, "screened_tests": self.screened,
                "seconds": round(self.seconds, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()},
                "replayed": self.replay is not None,
                **({"replay": self.replay} if self.replay is not None else {}),
                **({"sweeps": self.sweeps} if self.sweeps is not None else {})}


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
                generator: torch.Generator, features: int = 1) -> list[int]:
    """MI ordering: fit one predictor per unit from its own column(s) alone; least informative
    first."""
    if len(units) <= 1:
        return list(units)
    rc = config.reconstructor
    index = torch.tensor(units, device=split.x_train.device)

    def per_unit_x(x: torch.Tensor) -> torch.Tensor:  # (n, d * f) -> (units, n, f)
        return x.reshape(x.shape[0], -1, features)[:, index].permute(1, 0, 2)
    per_unit = Split(per_unit_x(split.x_train), split.y_train,
                     per_unit_x(split.x_val), split.y_val, split.loss)
    mlps = BatchedMLP.create(len(units), features,
                             min(32, hidden_width(split.y_train.shape[1], rc.hidden_cap)),
                             split.y_train.shape[1], generator=generator, device=split.x_train.device)
    losses = fit(mlps, per_unit, epochs=rc.ordering_epochs, patience=rc.patience, lr=rc.lr,
                 batch_size=rc.batch_size, generator=generator, x_per_model=True,
                 min_delta=rc.min_delta)
    ranked = torch.argsort(losses, descending=True, stable=True).tolist()
    return [units[i] for i in ranked]


def terc_select(x: torch.Tensor, y: torch.Tensor, config: PruneConfig, *, seed: int = 0,
                progress: Callable[[float, str], None] | None = None,
                memo: dict | None = None, y_is_logits: bool = False,
                features: int = 1) -> LayerDecision:
    """Decide which columns (units) of x to prune so that y stays reconstructable.

    x: (n, d_in) activations of the layer's units; y: (n, d_out) the next layer's kept
    activations (or the logits). Constant units are pruned up front; the last remaining unit is
    never pruned. memo: an empty dict, or one filled by an earlier call with the same x, y,
    seed and config except `tol`: the reference fit, the ordering and every masked fine-tune
    are then reused (a walk at another tol pays only for the tests that differ; a target
    search's verification, `measure_removal`, tests its replayed set against that reference). y_is_logits: y is the network's logits (reconstructed with cross-entropy when
    `reconstructor.logits_loss` is "ce"). features: columns of x per unit (a conv channel on a
    spatial grid, `reconstructor.conv_grid`): unit u is columns u*features .. (u+1)*features - 1,
    masked, compensated and ordered together. Raises ValueError if x and y have different row
    counts.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    started = time.perf_counter()
    progress = progress or (lambda fraction, message: None)
    memo = {} if memo is None else memo
    clock = PhaseClock()
    if "layer" not in memo:
        progress(0.0, "reference fit")
        memo["layer"] = _prepare_layer(x, y, config, seed, clock, y_is_logits, features)
        memo["results"] = {}
    layer: _Layer = memo["layer"]
    results_memo: dict[tuple[int, ...], tuple[torch.Tensor, bool]] = memo["results"]
    d, floor = layer.d, layer.floor
    scale = layer.mi if config.tol_scale == "mi" else layer.loss_ref
    scale = max(scale, 0.0)
    threshold = config.tol * scale
    decision = LayerDecision(size=d, kept=[], pruned=list(layer.pruned), constant=layer.constant,
                             order=layer.order, loss_empty=layer.loss_empty,
                             loss_ref=layer.loss_ref, mi=layer.mi)
    test = _Test(config)
    device = layer.split.x_train.device
    tester = _SetTester(layer, config, threshold, clock, results_memo)

    def record(unit: int, d_unit: torch.Tensor, tuned: bool) -> bool:
        keep, mean, sd = test.keep(d_unit, threshold)
        statistic = mean - test.critical * sd / test.sqrt_r
        # flip_tol: the tol at which this test alone would change its answer; nan when the
        # layer has no MI to scale by.
        decision.units.append({"unit": unit, "mean_d": mean, "sd_d": sd,
                               "threshold": threshold, "kept": keep, "finetuned": tuned,
                               "flip_tol": statistic / scale if scale > 0 else float("nan")})
        return keep

    block_size = config.block_size or (2 if device.type == "cpu" else 8)
    order = layer.order
    position, recent = 0, []
    while position < len(order):
        progress(0.1 + 0.9 * position / len(order), f"unit {position + 1}/{len(order)}")
        remaining = d - len(decision.pruned)
        if remaining <= floor:  # never prune the last unit(s) of a layer
            decision.kept.extend(order[position:])
            break
        one_at_a_time = config.path == "sequential" or config.speculation == "off"
        block = order[position:position + (1 if one_at_a_time else block_size)]
        mode = _mode(config, recent)
        if mode == "prune":
            block = block[:remaining - floor]
            sets = [decision.pruned + block[:k + 1] for k in range(len(block))]
        else:
            sets = [decision.pruned + [c] for c in block]
        results = tester.run(sets)
        for k, unit in enumerate(block):
            keep = record(unit, *results[k])
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
    decision.fits, decision.screened = tester.fits, tester.screened
    decision.seconds = time.perf_counter() - started
    decision.phases = dict(clock.seconds)
    return decision


class _SetTester:
    """Loss increases d (R,) of removal sets against a layer's reference: each set's R starts
    (the reference, compensated for the set), screening, then the masked fine-tune; memoised by
    set in `results` (shared by every walk of the layer). fits / screened count this tester's
    new fine-tunes and screened sets."""

    def __init__(self, layer: "_Layer", config: PruneConfig, threshold: float,
                 clock: PhaseClock, results: dict[tuple[int, ...], tuple[torch.Tensor, bool]]):
        self.layer, self.config, self.threshold, self.clock = layer, config, threshold, clock
        self.results = results
        self.test = _Test(config)
        self.device = layer.split.x_train.device
        rc = config.reconstructor
        self.fit_kw = dict(patience=rc.patience, lr=rc.lr, orders=layer.orders,
                           min_delta=rc.min_delta,
                           batch_size=rc.finetune_batch_size or rc.batch_size)
        self.narrowed: dict[tuple[int, ...], Split] = {}
        self.fits = 0
        self.screened = 0

    def masks_for(self, sets: list[list[int]]) -> torch.Tensor:
        """The (len(sets) x R, columns) 0/1 masks of the removal sets (sets of units)."""
        r = self.config.repeats
        mask = torch.ones(len(sets) * r, self.layer.d * self.layer.features, device=self.device)
        for b, removed in enumerate(sets):
            mask[b * r:(b + 1) * r, self.layer.columns(removed)] = 0
        return mask

    def starts(self, sets: list[list[int]]) -> BatchedMLP:
        """Each set's R starting models: the reference, compensated for the set (or as is)."""
        models = self.layer.reference.tiled(len(sets))
        if not self.config.reconstructor.compensate:
            return models
        return self.layer.compensator.apply(models, [self.layer.columns(s) for s in sets])

    def screen(self, start: BatchedMLP, mask: torch.Tensor, heuristic: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compensated loss increases (len(sets), R) and which sets need no fine-tune.

        A fine-tune keeps its best weights, the start included, so it can only lower d: a set
        whose every d is already at or under the threshold prunes whatever the fine-tune does
        (exact). A set whose increase over the reference's own loss (before any fine-tune: the
        control's gain is what a fine-tune recovers anyway) is above `screen_keep` x the
        threshold with confidence x is kept without one (a heuristic, docs/engine.md; off when
        `heuristic` is False)."""
        layer, config, test, threshold = self.layer, self.config, self.test, self.threshold
        start_loss = evaluate_split(start, layer.split, mask).view(-1, config.repeats)
        d_start = start_loss - layer.loss_ref_r.unsqueeze(0)
        done = d_start.max(1).values <= threshold
        if heuristic and config.reconstructor.screen_keep > 0 and threshold > 0:
            gap = start_loss - layer.loss_start_r.unsqueeze(0)
            lower = gap.mean(1) - test.critical * gap.std(1) / test.sqrt_r
            done |= lower > config.reconstructor.screen_keep * threshold
        return d_start, done

    def narrow(self, models: BatchedMLP, mask: torch.Tensor
               ) -> tuple[BatchedMLP, Split, torch.Tensor]:
        """`models`, the split and `mask` without the columns that every model has masked.

        A masked column's weights get no gradient and Adam moves them by 0, so dropping it
        changes nothing but the cost (up to float rounding): late in a walk most columns are
        pruned in every set, and the first layer's product is most of a fine-tune's work."""
        split = self.layer.split
        seen = mask.amax(0) > 0
        if bool(seen.all()):
            return models, split, mask
        columns = torch.nonzero(seen).flatten()
        key = tuple(columns.tolist())
        if key not in self.narrowed:
            self.narrowed[key] = Split(split.x_train[:, columns], split.y_train,
                                       split.x_val[:, columns], split.y_val, split.loss)
        w1, b1, w2, b2 = (p.detach() for p in models.parameters())
        return BatchedMLP(w1[:, columns].clone(), b1.clone(), w2.clone(), b2.clone(),
                          linear=models.linear), \
            self.narrowed[key], mask[:, columns]

    def finetune(self, tune: list[int], start: BatchedMLP, mask: torch.Tensor
                 ) -> dict[int, torch.Tensor]:
        """d (R,) after the masked fine-tune, for each set index in `tune`."""
        config, rc, loss_ref_r = self.config, self.config.reconstructor, self.layer.loss_ref_r
        tuned: dict[int, torch.Tensor] = {}
        if config.path == "sequential":
            # The reference path: each of the R repeats of each set fitted alone.
            for j in tune:
                losses = []
                for r in range(config.repeats):
                    row = j * config.repeats + r
                    model, rows_split, model_mask = self.narrow(start.pick(row),
                                                                mask[row:row + 1])
                    losses.append(fit(model, rows_split, epochs=rc.finetune_epochs,
                                      mask=model_mask, **self.fit_kw))
                tuned[j] = torch.cat(losses) - loss_ref_r
            return tuned
        rows = torch.cat([torch.arange(j * config.repeats, (j + 1) * config.repeats)
                          for j in tune]).to(self.device)
        models = BatchedMLP(*(p.detach()[rows] for p in start.parameters()), linear=start.linear)
        models, rows_split, rows_mask = self.narrow(models, mask[rows])
        losses = fit(models, rows_split, epochs=rc.finetune_epochs, mask=rows_mask, **self.fit_kw)
        for k, j in enumerate(tune):
            tuned[j] = losses[k * config.repeats:(k + 1) * config.repeats] - loss_ref_r
        return tuned

    def run(self, sets: list[list[int]], heuristic: bool = True
            ) -> list[tuple[torch.Tensor, bool]]:
        """d (R,) and whether it was fine-tuned, per removal set; memoised by set. With
        `heuristic` False a set is fine-tuned unless that is exactly unnecessary (its start is
        already under the threshold), and a memoised heuristic result is not reused."""
        keys = [tuple(sorted(s)) for s in sets]

        def usable(key: tuple[int, ...]) -> bool:
            if key not in self.results:
                return False
            d, tuned = self.results[key]
            return heuristic or tuned or float(d.max()) <= self.threshold

        todo = [i for i, k in enumerate(keys) if not usable(k)]
        if todo:
            new_sets = [sets[i] for i in todo]
            mask = self.masks_for(new_sets)
            with self.clock("screening"):
                start = self.starts(new_sets)
                d_start, done = self.screen(start, mask, heuristic)
            tune = [j for j in range(len(new_sets)) if not bool(done[j])]
            tuned: dict[int, torch.Tensor] = {}
            if tune:
                with self.clock("finetune"):
                    tuned = self.finetune(tune, start, mask)
            for j, i in enumerate(todo):
                self.results[keys[i]] = (tuned.get(j, d_start[j]), j in tuned)
                self.fits += int(j in tuned)
                self.screened += int(j not in tuned)
        return [self.results[k] for k in keys]


def measure_removal(memo: dict, removed: list[int], config: PruneConfig, tol: float,
                    clock: PhaseClock | None = None) -> dict:
    """The test of one removal set against the reference a walk of this layer fitted.

    memo: a memo `terc_select` filled (same x, y, seed and config except `tol`); removed: unit
    indices (constant units included). The set's R masked fine-tunes (or, exactly, none when
    the compensated start is already under the threshold) give d; the set passes when the
    sweep's rule would prune it: mean(d) - t x sd(d) / sqrt(R) <= tol x the layer's MI. Returns
    {"mean_d", "sd_d", "threshold", "passed", "finetuned", "fits"} (fits: new fine-tunes, 0 or
    1). Raises KeyError if `memo` was never filled.
    """
    layer: _Layer = memo["layer"]
    scale = max(layer.mi if config.tol_scale == "mi" else layer.loss_ref, 0.0)
    threshold = tol * scale
    tester = _SetTester(layer, config, threshold, clock or PhaseClock(), memo["results"])
    d, tuned = tester.run([sorted(removed)], heuristic=False)[0]
    keep, mean, sd = tester.test.keep(d, threshold)
    return {"mean_d": mean, "sd_d": sd, "threshold": threshold, "passed": not keep,
            "finetuned": tuned, "fits": tester.fits}


@dataclass
class _Layer:
    """What a layer's walk needs, whatever the tol: fits that a target search reuses."""

    d: int
    split: Split
    reference: BatchedMLP
    loss_ref_r: torch.Tensor
    loss_start_r: torch.Tensor
    loss_empty: float
    loss_ref: float
    mi: float
    order: list[int]
    pruned: list[int]
    constant: list[int]
    floor: int
    orders: list[torch.Tensor]
    compensator: Compensator
    features: int = 1  # columns of x per unit

    def columns(self, units: list[int]) -> list[int]:
        """The columns of x that hold `units`."""
        f = self.features
        return list(units) if f == 1 else [u * f + k for u in units for k in range(f)]


def _prepare_layer(x: torch.Tensor, y: torch.Tensor, config: PruneConfig, seed: int,
                   clock: PhaseClock | None = None, y_is_logits: bool = False,
                   features: int = 1) -> _Layer:
    """Standardise, split, fit the reference and the control, order the units (steps 3-6);
    `clock` collects the seconds of the reference fit, the control and the ordering.
    features: columns of x per unit (`terc_select`)."""
    clock = clock or PhaseClock()
    rc = config.reconstructor
    generator = torch.Generator().manual_seed(seed)
    if x.shape[1] % features:
        raise ValueError(f"x has {x.shape[1]} columns, not a multiple of {features} per unit")
    d = x.shape[1] // features
    xs, constant_mask = standardise(x.float(), config.std_floor)
    if features > 1:  # a unit is constant when all its cells are
        constant_mask = constant_mask.view(d, features).all(1)
    loss = "ce" if y_is_logits and rc.logits_loss == "ce" else "mse"
    if loss == "ce":  # the network's class probabilities, fitted by cross-entropy
        ys = torch.softmax(y.float(), dim=1)
    else:
        ys, y_constant = standardise(y.float(), config.std_floor)
        ys = ys[:, ~y_constant] if bool((~y_constant).any()) else ys
    constant = torch.nonzero(constant_mask).flatten().tolist()
    # Layer-collapse guard: constant units go, but never below the floor (at least one unit).
    floor = min(d, config.min_units)
    pruned = constant[:max(0, d - floor)] if len(constant) > d - floor else list(constant)
    live = [i for i in range(d) if i not in set(pruned)]  # constants kept by the floor included

    split = split_rows(xs, ys, config.val_fraction, generator, loss)
    loss_empty = empty_loss(split)
    reference = BatchedMLP.create(config.repeats, d * features,
                                  hidden_width(ys.shape[1], rc.hidden_cap),
                                  ys.shape[1], generator=generator, device=xs.device,
                                  linear=d <= rc.linear_below)
    with clock("reference_fit"):
        fit(reference, split, epochs=rc.epochs, patience=rc.patience, lr=rc.lr,
            batch_size=rc.batch_size, generator=generator, min_delta=rc.min_delta)
    # Every fine-tune of this layer (the control and each masked copy) sees the same
    # minibatches, drawn once from the seed: then d measures the mask alone, and a fit gets the
    # same budget and the same batches whichever path runs it and whichever block it sits in.
    orders = epoch_orders(split.x_train.shape[0], rc.finetune_epochs, seed + 7919, xs.device)
    # The control: the same short fine-tune without a mask, so that d measures the mask only.
    control = reference.copy()
    loss_start_r = evaluate_split(reference, split)
    with clock("control"):
        if config.control:
            loss_ref_r = fit(control, split, epochs=rc.finetune_epochs, patience=rc.patience,
                             lr=rc.lr, batch_size=rc.finetune_batch_size or rc.batch_size,
                             orders=orders, min_delta=rc.min_delta)
        else:
            loss_ref_r = evaluate_split(control, split)
    loss_ref = float(loss_ref_r.mean())
    with clock("ordering"):
        order = _unit_order(split, live, config, generator, features)
    return _Layer(d=d, split=split, reference=reference, loss_ref_r=loss_ref_r,
                  loss_start_r=loss_start_r,
                  loss_empty=loss_empty, loss_ref=loss_ref, mi=loss_empty - loss_ref,
                  order=order, pruned=pruned, constant=constant, floor=floor, orders=orders,
                  compensator=Compensator(split.x_train), features=features)


def _mode(config: PruneConfig, recent: list[bool]) -> str:
    """Speculation mode for the next block: from config, or from the keep rate of the last 16."""
    if config.speculation in ("prune", "keep"):
        return config.speculation
    if config.path == "sequential" or config.speculation == "off":
        return "keep"  # with a block of one both modes are the same single test
    window = recent[-16:]
    keep_rate = sum(window) / len(window) if window else 0.5
    return "keep" if keep_rate >= 0.5 else "prune"
