"""The paper's protocol on converged models: which part of MIPP earns its cost? (issue 10)

A factorial design on the converged checkpoints of bench/dense_models.py, paired by seed (seed k
prunes dense model seed k with calibration draw k: 2,048 training samples, the same for every
method):

    choice of units  {mipp, thinet, l1, taylor, random}
  x allocation       {mipp (MIPP's per-layer counts), uniform, global, sensitivity}
  x refit            {on, off}  (the engine's least-squares refit of the next layers)
  x retraining       {1 epoch, 70% of the dense model's epochs}  (+ "0": right after pruning)
  at 50/70/80/90/95% of units removed, and an at-initialisation arm (mipp vs random, snip,
  grasp, synflow at MIPP's counts, each trained from the pruned init with the dense recipe).

MIPP reaches each fraction by its own target search (the `tol` whose sweep removes that
fraction, within 0.02); every other allocation then removes exactly as many units as MIPP did,
so a row's fraction is MIPP's. The allocations (units kept per layer):
  mipp         the counts MIPP's TERC pass chose at that tol;
  uniform      the same fraction of every layer (round(size x (1 - f)), at least 1);
  global       Torch-Pruning's global pruning: L1 group norms divided by their layer's mean and
               ranked across layers (each layer keeps its best unit);
  sensitivity  a per-layer scan: each layer alone loses 25/50/75/90/95% of its units (lowest
               L1 first, no refit) and the calibration loss increase is measured; then units
               are removed greedily from the layer whose next scan step costs the least loss
               per unit removed (linear within a step) until the fraction is reached.
The choice of units then picks which units of each layer go, at those counts (the engine's
allocator, `PruneConfig(allocation="counts", counts=...)`, mipp/methods/allocation.py). MIPP's
choice at counts other than its own is the engine's: one TERC pass at the tol of MIPP's own
selection, each layer brought to its count before the layer below is decided (mipp/methods/
mipp.py `_at_count`: TERC's kept units first, most informative first, then its pruned ones);
that pass is its selection cost. Rows written before this script used the engine's allocator
(field `code` missing) ranked MIPP's units the same way but from MIPP's own pass, without a new
pass (`mipp_at_counts: "own-pass"`).

    python bench/paper_protocol.py --quick            # MNIST LeNet-5; sized for < 15 min on 2 quiet
                                                      # cores (47 min on the shared box, 2 processes)
    python bench/paper_protocol.py --full             # resumable; hours on CPU
    python bench/paper_protocol.py --table [--jsonl F ...]   # markdown tables from raw files
    python bench/paper_protocol.py --quick ... --retrain-lr-scale 0.1   # retrain at 0.1x the
                                                      # dense recipe's lr (its own cells)
    python bench/paper_protocol.py --table --retrain-lr-scale 0.1     # the tables of those cells
    python bench/paper_protocol.py --plots [--jsonl F ...]   # docs/img/paper_protocol*.png

Raw files (appended, never emptied; a cell already there is skipped on a rerun):
    bench/results/paper_protocol[-quick].jsonl              one line per cell
    bench/results/paper_protocol[-quick]-selections.jsonl   MIPP's selections (reused)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dense_models  # noqa: E402
import mipp  # noqa: E402
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig  # noqa: E402
from mipp.data import load_dataset  # noqa: E402
from mipp.groups import apply_keep_sets  # noqa: E402
from mipp.methods.allocation import keep_global, prunable_groups, select  # noqa: E402
from mipp.methods.context import SelectionContext  # noqa: E402
from mipp.methods.l1 import l1_scores  # noqa: E402
from mipp.pipeline import _refit  # noqa: E402
from mipp.training import evaluate, resolve_device  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMG = Path(__file__).parents[1] / "docs" / "img"
CHOICES = ["mipp", "thinet", "l1", "taylor", "random"]
ALLOCATIONS = ["mipp", "uniform", "global", "sensitivity"]
AT_INIT = ["mipp", "random", "snip", "grasp", "synflow"]
SCAN_RATIOS = (0.25, 0.5, 0.75, 0.9, 0.95)
PRESETS = {
    "quick": dict(models=[("mnist", "lenet5")], seeds=[0, 1], fractions=[0.9],
                  choices=CHOICES, allocations=ALLOCATIONS, refits=[True, False],
                  budgets=["1"], at_init=False, repeats=3,
                  recon=dict(epochs=40, finetune_epochs=10, ordering_epochs=15)),
    "full": dict(models=[("mnist", "lenet5"), ("mnist", "mlp"), ("fashion-mnist", "lenet5"),
                         ("fashion-mnist", "vgg11"), ("fashion-mnist", "resnet20")],
                 seeds=[0, 1, 2, 3, 4], fractions=[0.5, 0.7, 0.8, 0.9, 0.95],
                 choices=CHOICES, allocations=ALLOCATIONS, refits=[True, False],
                 budgets=["1", "0.7"], at_init=True, repeats=5, recon={}),
}
CALIBRATION = 2048


# ---------------------------------------------------------------------------------------------
# Raw files


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def cell_key(r: dict) -> tuple:
    """A cell's identity; the last element is the retraining lr's scale (1: the dense recipe's
    lr, the only scale the main tables read; rows before the option have none)."""
    return (r["arm"], r["dataset"], r["arch"], int(r["seed"]), float(r["fraction_target"]),
            r["choice"], r["allocation"], bool(r["refit"]), str(r["budget"]),
            float(r.get("retrain_lr_scale", 1.0)))


def budget_epochs(budget: str, dense_epochs: int) -> int:
    """'1' -> 1 epoch; '0.7' -> 70% of the dense model's epochs (at least 1)."""
    return 1 if budget == "1" else max(1, round(float(budget) * dense_epochs))


# ---------------------------------------------------------------------------------------------
# Allocations: units kept per layer


def uniform_counts(groups, n_remove: int) -> dict[str, int]:
    """The same fraction of every layer, adjusted by single units so exactly n_remove go."""
    total = sum(g.size for g in groups)
    f = n_remove / total
    counts = {g.name: max(1, round(g.size * (1 - f))) for g in groups}
    _fix_total(groups, counts, total - n_remove)
    return counts


def _fix_total(groups, counts: dict[str, int], n_keep: int) -> None:
    """Move single units (largest layers first) until sum(counts) == n_keep."""
    by_size = sorted(groups, key=lambda g: -g.size)
    while sum(counts.values()) > n_keep:
        g = max(by_size, key=lambda g: counts[g.name] / g.size)
        if counts[g.name] <= 1:
            break
        counts[g.name] -= 1
    while sum(counts.values()) < n_keep:
        g = min(by_size, key=lambda g: counts[g.name] / g.size)
        if counts[g.name] >= g.size:
            break
        counts[g.name] += 1


def global_counts(ctx: SelectionContext, n_remove: int) -> dict[str, int]:
    """Torch-Pruning's global rule with L1 scores (the engine's keep_global, floor 1 unit)."""
    total = sum(g.size for g in ctx.groups)
    keep = keep_global(l1_scores(ctx), 1 - n_remove / total, {g.name: 1 for g in ctx.groups})
    counts = {name: len(k) for name, k in keep.items()}
    _fix_total(ctx.groups, counts, total - n_remove)
    return counts


def sensitivity_scan(dense, groups, x, y, example, device) -> dict[str, list[tuple[int, float]]]:
    """Per layer: [(units removed, calibration loss increase)] for SCAN_RATIOS, that layer alone
    pruned by L1 (no refit); the increases are made monotone (running max)."""
    ctx = SelectionContext(model=dense, groups=groups, x=x, y=y,
                           config=PruneConfig(method="l1", target=0.5), device=device)
    scores = l1_scores(ctx)
    base = evaluate(dense, x, y, device=device)["loss"]
    scan: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        order = sorted(range(g.size), key=lambda i: (-float(scores[g.name][i]), i))
        steps, worst = [(0, 0.0)], 0.0
        for r in SCAN_RATIOS:
            n_keep = max(1, round(g.size * (1 - r)))
            if g.size - n_keep <= steps[-1][0]:
                continue
            model = copy.deepcopy(dense)
            apply_keep_sets(model, example, {g.name: sorted(order[:n_keep])})
            worst = max(worst, evaluate(model, x, y, device=device)["loss"] - base)
            steps.append((g.size - n_keep, worst))
        scan[g.name] = steps
    return scan


def sensitivity_counts(groups, scan: dict[str, list[tuple[int, float]]], n_remove: int
                       ) -> dict[str, int]:
    """Greedy: take the scan step with the smallest loss increase per unit removed; the last
    step is taken partly so that exactly n_remove units go."""
    removed = {g.name: 0 for g in groups}
    position = {g.name: 0 for g in groups}
    size = {g.name: g.size for g in groups}
    left = n_remove
    while left > 0:
        best = None
        for name, steps in scan.items():
            i = position[name]
            if i + 1 >= len(steps):
                continue
            (u0, l0), (u1, l1) = steps[i], steps[i + 1]
            cost = (l1 - l0) / (u1 - u0)
            if best is None or cost < best[0]:
                best = (cost, name, u1 - u0)
        if best is None:  # every layer at its deepest scan step: take units where any remain
            name = max(removed, key=lambda n: size[n] - 1 - removed[n])
            take = min(left, size[name] - 1 - removed[name])
            if take <= 0:
                break
            removed[name] += take
            left -= take
            continue
        _, name, units = best
        take = min(units, left)
        removed[name] += take
        position[name] += 1
        left -= take
    return {g.name: g.size - removed[g.name] for g in groups}


# ---------------------------------------------------------------------------------------------
# Running


class Model:
    """One dense checkpoint with its seed's calibration draw and unit groups."""

    def __init__(self, dataset: str, arch: str, seed: int, data, device):
        self.dataset, self.arch, self.seed, self.data, self.device = dataset, arch, seed, data, device
        self.dense = dense_models.load_dense(dataset, arch, seed).to(device).eval()
        info = json.loads((dense_models.run_dir(dataset, arch, seed) / "metrics.json").read_text())
        self.dense_epochs = info["epochs"]
        self.recipe = TrainConfig(**info["recipe"])
        self.example = data.x_train[:2].to(device)
        self.groups = prunable_groups(self.dense, self.example, PruneConfig())
        self.total = sum(g.size for g in self.groups)
        # The pipeline's own draw (mipp.pipeline.prune): randperm seeded by the run's seed.
        generator = torch.Generator().manual_seed(seed)
        calib = torch.randperm(data.x_train.shape[0], generator=generator)[:CALIBRATION]
        self.x, self.y = data.x_train[calib], data.y_train[calib]
        self.acc_dense = evaluate(self.dense, data.x_test, data.y_test, device=device)["accuracy"]
        self.scan = None
        self.scan_s = 0.0

    def ctx(self, config: PruneConfig, counts=None) -> SelectionContext:
        if counts is not None:
            config = config.model_copy(update={"allocation": "counts", "counts": dict(counts)})
        return SelectionContext(model=self.dense, groups=self.groups, x=self.x, y=self.y,
                                config=config, device=self.device)


def mipp_selection(m: Model, fraction: float, sel_log: Path, done: dict, args,
                   tol_start: float) -> dict:
    """MIPP's target search at `fraction` (cached in the selections file)."""
    key = (m.dataset, m.arch, m.seed, fraction, "after-training")
    if key in done:
        return done[key]
    config = PruneConfig(method="mipp", target=fraction, tol=tol_start, repeats=args.repeats,
                         calibration_samples=CALIBRATION, seed=m.seed, device=str(m.device),
                         reconstructor=ReconstructorConfig(**args.recon))
    torch.manual_seed(m.seed)  # as mipp.pipeline.prune does before selecting
    began = time.perf_counter()
    sel = select(m.ctx(config))
    seconds = time.perf_counter() - began
    tol = next(iter(sel.layers.values()))["tol"]
    record = {"dataset": m.dataset, "arch": m.arch, "seed": m.seed, "fraction_target": fraction,
              "mode": "after-training", "tol": tol, "selection_s": round(seconds, 2),
              "keep": sel.keep, "order": {n: v.get("order", []) for n, v in sel.layers.items()},
              "counts": {n: len(k) for n, k in sel.keep.items()},
              "removed_fraction": 1 - sum(len(k) for k in sel.keep.values()) / m.total,
              "repeats": args.repeats, "recon": args.recon, "calibration": CALIBRATION,
              "host": platform.node(), "time": _now(), "code": CODE}
    _append(sel_log, record)
    done[key] = record
    print(f"[{m.dataset} {m.arch} s{m.seed}] mipp target {fraction:.2f}: tol={tol:.4g} removes "
          f"{record['removed_fraction']:.3f} ({seconds:.0f}s)", flush=True)
    return record


def allocation_counts(m: Model, allocation: str, mipp_sel: dict) -> tuple[dict[str, int], float]:
    """Units kept per layer under `allocation`, removing as many units as MIPP did; seconds."""
    n_remove = m.total - sum(mipp_sel["counts"].values())
    began = time.perf_counter()
    if allocation == "mipp":
        return dict(mipp_sel["counts"]), 0.0
    if allocation == "uniform":
        counts = uniform_counts(m.groups, n_remove)
    elif allocation == "global":
        counts = global_counts(m.ctx(PruneConfig(method="l1", target=0.5)), n_remove)
    elif allocation == "sensitivity":
        if m.scan is None:
            m.scan = sensitivity_scan(m.dense, m.groups, m.x, m.y, m.example, m.device)
            m.scan_s = time.perf_counter() - began
        counts = sensitivity_counts(m.groups, m.scan, n_remove)
        return counts, m.scan_s
    else:
        raise ValueError(f"unknown allocation {allocation!r}")
    return counts, time.perf_counter() - began


def choose(m: Model, choice: str, counts: dict[str, int], mipp_sel: dict, fraction: float,
           args) -> tuple[dict[str, list[int]], float]:
    """Kept units per layer for `choice` at `counts`, and the selection seconds."""
    if choice == "mipp" and counts == mipp_sel["counts"]:
        return mipp_sel["keep"], float(mipp_sel["selection_s"])
    if choice == "mipp":  # one engine pass at MIPP's tol, each layer at its count
        config = PruneConfig(method="mipp", tol=mipp_sel["tol"], repeats=args.repeats,
                             calibration_samples=CALIBRATION, seed=m.seed, device=str(m.device),
                             reconstructor=ReconstructorConfig(**args.recon))
    else:
        config = PruneConfig(method=choice, target=fraction, calibration_samples=CALIBRATION,
                             seed=m.seed, device=str(m.device))
    torch.manual_seed(m.seed)
    began = time.perf_counter()
    sel = select(m.ctx(config, counts=counts))
    return sel.keep, time.perf_counter() - began


def run_cells(m: Model, fraction: float, args, log: Path, done: set, mipp_sel: dict) -> None:
    data = m.data
    for allocation in args.allocations:
        counts, allocation_s = allocation_counts(m, allocation, mipp_sel)
        for choice in args.choices:
            wanted = [(refit, budget) for refit in args.refits for budget in args.budgets
                      if ("after-training", m.dataset, m.arch, m.seed, fraction, choice,
                          allocation, refit, budget, args.retrain_lr_scale) not in done]
            if not wanted:
                continue
            keep, selection_s = choose(m, choice, counts, mipp_sel, fraction, args)
            pruned0 = copy.deepcopy(m.dense)
            history = apply_keep_sets(pruned0, m.example, keep)
            acc_no_refit = evaluate(pruned0, data.x_test, data.y_test, device=m.device)["accuracy"]
            for refit in sorted({r for r, _ in wanted}, reverse=True):
                pruned = copy.deepcopy(pruned0)
                refit_s = 0.0
                if refit:
                    began = time.perf_counter()
                    _refit(pruned, m.dense, m.groups, keep, history, m.x, m.device, m.seed)
                    refit_s = time.perf_counter() - began
                acc_pruned = evaluate(pruned, data.x_test, data.y_test, device=m.device)["accuracy"]
                for budget in [b for r, b in wanted if r == refit]:
                    epochs = budget_epochs(budget, m.dense_epochs)
                    model = copy.deepcopy(pruned)
                    recipe = m.recipe.model_copy(update={
                        "epochs": epochs, "lr": m.recipe.lr * args.retrain_lr_scale})
                    began = time.perf_counter()
                    mipp.train(model, data, recipe, device=m.device, seed=m.seed)
                    retrain_s = time.perf_counter() - began
                    acc = evaluate(model, data.x_test, data.y_test, device=m.device)["accuracy"]
                    row = {"arm": "after-training", "dataset": m.dataset, "arch": m.arch,
                           "seed": m.seed, "fraction_target": fraction,
                           "removed_fraction": round(1 - sum(counts.values()) / m.total, 5),
                           "choice": choice, "allocation": allocation, "refit": refit,
                           "budget": budget, "retrain_epochs": epochs,
                           "retrain_lr": recipe.lr,
                           "retrain_lr_scale": args.retrain_lr_scale,
                           "dense_epochs": m.dense_epochs, "tol": mipp_sel["tol"],
                           "counts": counts, "acc_dense": m.acc_dense,
                           "acc_pruned_no_refit": acc_no_refit, "acc_pruned": acc_pruned,
                           "acc_retrained": acc, "selection_s": round(selection_s, 3),
                           "allocation_s": round(allocation_s, 3), "refit_s": round(refit_s, 3),
                           "retrain_s": round(retrain_s, 2), "calibration": CALIBRATION,
                           "device": str(m.device), "host": platform.node(), "time": _now(),
                           "code": CODE, "mipp_at_counts": "engine-pass"}
                    _append(log, row)
                    done.add(cell_key(row))
                    print(f"[{m.dataset} {m.arch} s{m.seed} f={fraction}] {choice:7s} "
                          f"alloc={allocation:11s} refit={'on ' if refit else 'off'} "
                          f"budget={epochs}ep: pruned {acc_pruned:.4f} retrained {acc:.4f}",
                          flush=True)


def run_at_init(dataset, arch, seed, data, fraction, args, log: Path, done: set,
                sel_done: dict, sel_log: Path, device) -> None:
    """At initialisation: MIPP (target search on the init) and the PaI baselines at its
    counts, each trained from its pruned init with the dense model's recipe and epochs."""
    target, recipe = dense_models.RECIPES[(dataset, arch)]
    init = mipp.build_model(arch, data.input_shape, data.num_classes, seed=seed,
                            **dense_models.ARCH_CONFIG.get(arch, {}))
    counts = None
    for choice in args.at_init_methods:
        key = ("at-init", dataset, arch, seed, fraction, choice, "mipp", False, "dense")
        if key in done:
            counts = counts or done_counts(log, key[:5])
            continue
        config = PruneConfig(method=choice, mode="at-init", target=fraction, tol=0.05,
                             repeats=args.repeats, calibration_samples=CALIBRATION, seed=seed,
                             device=str(device), reconstructor=ReconstructorConfig(**args.recon),
                             retrain=recipe, refit=False)
        if choice != "mipp" and counts is None:
            counts = done_counts(log, key[:5])
        began = time.perf_counter()
        result = mipp.prune(init, data, config, counts=None if choice == "mipp" else counts)
        total_s = time.perf_counter() - began
        if choice == "mipp":
            counts = {k: len(v) for k, v in result.masks.items()}
        acc = result.metrics["accuracy"]
        row = {"arm": "at-init", "dataset": dataset, "arch": arch, "seed": seed,
               "fraction_target": fraction,
               "removed_fraction": round(result.metrics["units"]["removed_fraction"], 5),
               "choice": choice, "allocation": "mipp", "refit": False, "budget": "dense",
               "retrain_epochs": recipe.epochs, "counts": {k: len(v) for k, v in result.masks.items()},
               "acc_retrained": acc["retrained"],
               "selection_s": result.metrics["seconds"].get("selection", 0.0),
               "total_s": round(total_s, 2), "calibration": CALIBRATION, "device": str(device),
               "host": platform.node(), "time": _now()}
        _append(log, row)
        done.add(cell_key(row))
        print(f"[{dataset} {arch} s{seed} f={fraction}] at-init {choice:7s} trained "
              f"{acc['retrained']:.4f}", flush=True)


def done_counts(log: Path, prefix: tuple) -> dict | None:
    for r in _read_jsonl(log):
        if cell_key(r)[:5] == prefix and r["choice"] == "mipp":
            return r["counts"]
    return None


def _code_version() -> str:
    """HEAD, and '+dirty' when the engine (mipp/) differs from it: the code behind each row."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mipp"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


CODE = _code_version()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run(args) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    done = {cell_key(r) for r in _read_jsonl(args.jsonl)}
    sel_done = {(r["dataset"], r["arch"], r["seed"], float(r["fraction_target"]), r["mode"]): r
                for r in _read_jsonl(args.selections)}
    deadline = time.monotonic() + args.deadline if args.deadline else math.inf
    for dataset, arch in args.models:
        data = load_dataset(dataset)
        for seed in args.seeds:
            if not dense_models.is_done(dataset, arch, seed):
                print(f"[{dataset} {arch} s{seed}] no converged checkpoint yet; skipped "
                      f"(python bench/dense_models.py --dataset {dataset} --arch {arch} "
                      f"--seeds {seed})", flush=True)
                continue
            m = Model(dataset, arch, seed, data, device)
            tol = 0.05
            for fraction in sorted(args.fractions):
                if time.monotonic() > deadline:
                    print("deadline reached; stopping (rerun to resume)", flush=True)
                    return
                sel = mipp_selection(m, fraction, args.selections, sel_done, args, tol)
                tol = max(sel["tol"], 1e-4)  # the next, larger fraction starts from here
                run_cells(m, fraction, args, args.jsonl, done, sel)
        if args.at_init:
            for seed in args.seeds:
                for fraction in sorted(args.fractions):
                    if time.monotonic() > deadline:
                        print("deadline reached; stopping (rerun to resume)", flush=True)
                        return
                    run_at_init(dataset, arch, seed, data, fraction, args, args.jsonl, done,
                                sel_done, args.selections, device)


# ---------------------------------------------------------------------------------------------
# Tables


def _t975(df: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, df))


def paired(diffs: list[float]) -> dict:
    """Mean paired difference, its 95% t interval and the paired t-test's p (n >= 2)."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan, "p": math.nan}
    sd = statistics.stdev(diffs)
    half = _t975(n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        from scipy import stats
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "p": p}


def _paired_cell(base: dict, other: dict, value, label: str = "MIPP") -> str:
    """One table cell: other − base, paired by seed (`value(row)` per row), with its verdict;
    "–" where the two share no seed."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return "–"
    s = paired([value(other[k]) - value(base[k]) for k in seeds])
    return f"{_fmt_diff(s)} {verdict(s, label)}"


def verdict(s: dict, label: str = "MIPP") -> str:
    """From the other method's point of view: a positive difference means MIPP loses."""
    if s["n"] < 2:
        return f"n={s['n']}: no test"
    if s["p"] >= 0.05:  # not shown to differ: with few seeds that is not evidence of a tie
        return f"n.s. (p={s['p']:.2f})"
    return (f"{label} wins (p={s['p']:.3f})" if s["mean"] < 0
            else f"**{label} loses** (p={s['p']:.3f})")


def refit_verdict(s: dict) -> str:
    """On − off: a positive difference means the refit helps."""
    if s["n"] < 2:
        return f"n={s['n']}: no test"
    if s["p"] >= 0.05:
        return f"n.s. (p={s['p']:.2f})"
    return (f"refit helps (p={s['p']:.3f})" if s["mean"] > 0
            else f"**refit hurts** (p={s['p']:.3f})")


def _fmt_diff(s: dict) -> str:
    if s["n"] < 2:
        return f"{s['mean']:+.2f}"
    return f"{s['mean']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]"


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _index(rows: list[dict], lr_scale: float = 1.0) -> dict:
    """cell (without seed and lr scale) -> {seed: row}, for the rows retrained at `lr_scale`
    times the dense recipe's lr; a cell run twice keeps its last row."""
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        k = cell_key(r)
        if k[9] == lr_scale:
            cells[k[:3] + k[4:9]][k[3]] = r
    return cells


def _acc(r: dict, budget_stage: str) -> float:
    return 100 * r["acc_pruned" if budget_stage == "0" else "acc_retrained"]


def _allocation_table(cells, dataset, arch, fractions, choices, refits, budgets, others_a
                      ) -> list[str]:
    """(b): MIPP's counts against the other allocation rules, for each choice of units."""
    out = [f"#### {dataset} / {arch}: allocation (rule − MIPP's counts, same choice of "
           "units, accuracy points, paired by seed, 95% interval)\n"]
    out.append("| removed | choice | refit | retrain | at MIPP's counts (%) | "
               + " | ".join(others_a) + " |")
    out.append("|---|---|---|---|---:|" + "---|" * len(others_a))
    for f in fractions:
        for choice in choices:
            for refit in refits:
                for stage in ["0", *budgets]:
                    budget = budgets[0] if stage == "0" else stage
                    base = cells.get(("after-training", dataset, arch, f, choice, "mipp",
                                      refit, budget), {})
                    if not base:
                        continue
                    parts = []
                    for a in others_a:
                        other = cells.get(("after-training", dataset, arch, f, choice, a,
                                           refit, budget), {})
                        parts.append(_paired_cell(base, other, lambda r: _acc(r, stage),
                                                  "MIPP counts"))
                    removed = statistics.mean(r["removed_fraction"] for r in base.values())
                    epochs = "0" if stage == "0" else f"{next(iter(base.values()))['retrain_epochs']} ep"
                    out.append(f"| {100 * removed:.1f}% | {choice} | {'on' if refit else 'off'} "
                               f"| {epochs} | {_mean_sd([_acc(r, stage) for r in base.values()])} | "
                               + " | ".join(parts) + " |")
    out.append("")
    return out


def _lr_scale(r: dict) -> float:  # rows before --retrain-lr-scale have none: 1
    return float(r.get("retrain_lr_scale", 1.0))


def lr_table(rows: list[dict]) -> list[str]:
    """Cells retrained at another multiple of the dense recipe's lr, against the same cells at
    the recipe's lr (scale 1), paired by seed."""
    scales = sorted({_lr_scale(r) for r in rows} - {1.0})
    if not scales:
        return []
    base = _index(rows)
    out = ["#### Retraining lr: the same cells retrained at a multiple of the dense recipe's lr "
           "(scaled − recipe, accuracy points after retraining, paired by seed)\n",
           "| model | removed | choice | allocation | refit | retrain | lr | seeds "
           "| after the refit (%) | at the recipe's lr (%) | at the scaled lr (%) "
           "| scaled − recipe |",
           "|---|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for scale in scales:
        for key, scaled in sorted(_index(rows, scale).items()):
            ref = base.get(key, {})
            seeds = sorted(set(ref) & set(scaled))
            if not seeds:
                continue
            _, dataset, arch, f, choice, allocation, refit, budget = key
            s = paired([_acc(scaled[k], "1") - _acc(ref[k], "1") for k in seeds])
            lr = next(iter(scaled.values()))["retrain_lr"]
            out.append(
                f"| {dataset} / {arch} | {100 * f:.0f}% (target) | {choice} | {allocation} "
                f"| {'on' if refit else 'off'} | {budget_label(budget)} | {lr:g} ({scale:g}x) "
                f"| {len(seeds)} | {_mean_sd([_acc(ref[k], '0') for k in seeds])} "
                f"| {_mean_sd([_acc(ref[k], '1') for k in seeds])} "
                f"| {_mean_sd([_acc(scaled[k], '1') for k in seeds])} | {_fmt_diff(s)}"
                + (f" {verdict({**s, 'mean': -s['mean']}, 'scaled lr')} |" if s["n"] >= 2
                   else " |"))
    return [*out, ""]


def tables(rows: list[dict], selections: list[dict], lr_scale: float = 1.0) -> str:
    """The main tables read the cells retrained at `lr_scale` x the recipe's lr (default 1,
    the recipe's own); with 1, the lr table then compares every other scale."""
    lr_rows = lr_table(rows) if lr_scale == 1.0 else []
    rows = [r for r in rows if _lr_scale(r) == lr_scale]
    cells = _index(rows, lr_scale)
    out = []
    pat = [r for r in rows if r["arm"] == "after-training"]
    models = sorted({(r["dataset"], r["arch"]) for r in pat})
    # "1" first: stage "0" (right after pruning and refit, the same for every budget) is read
    # from the 1-epoch cells, which every part of the design has.
    budgets = sorted({r["budget"] for r in pat}, key=lambda b: (b != "1", float(b)))
    fractions = sorted({float(r["fraction_target"]) for r in pat})
    refits = sorted({bool(r["refit"]) for r in pat}, reverse=True)
    allocations = [a for a in ALLOCATIONS if any(r["allocation"] == a for r in pat)]
    choices = [c for c in CHOICES if any(r["choice"] == c for r in pat)]
    seconds = {}
    for dataset, arch in models:
        # (a) choice of units at MIPP's counts; stage "0" is right after pruning (+ refit).
        out.append(f"#### {dataset} / {arch}: choice of units at MIPP's counts "
                   "(other − MIPP, accuracy points, paired by seed, 95% interval)\n")
        others = [c for c in choices if c != "mipp"]
        out.append("| removed | refit | retrain | seeds | MIPP (%) | "
                   + " | ".join(others) + " |")
        out.append("|---|---|---|---:|---:|" + "---|" * len(others))
        for f in fractions:
            for refit in refits:
                for stage in ["0", *budgets]:
                    budget = budgets[0] if stage == "0" else stage
                    base = cells.get(("after-training", dataset, arch, f, "mipp", "mipp", refit,
                                      budget), {})
                    if not base:
                        continue
                    parts = []
                    for c in others:
                        other = cells.get(("after-training", dataset, arch, f, c, "mipp", refit,
                                           budget), {})
                        parts.append(_paired_cell(base, other, lambda r: _acc(r, stage)))
                    removed = statistics.mean(r["removed_fraction"] for r in base.values())
                    epochs = "0" if stage == "0" else f"{next(iter(base.values()))['retrain_epochs']} ep"
                    out.append(f"| {100 * removed:.1f}% | {'on' if refit else 'off'} | {epochs} "
                               f"| {len(base)} | {_mean_sd([_acc(r, stage) for r in base.values()])} | "
                               + " | ".join(parts) + " |")
        out.append("")
        # (b) allocation: MIPP's counts against the other rules, for each choice of units.
        others_a = [a for a in allocations if a != "mipp"]
        if others_a:
            out += _allocation_table(cells, dataset, arch, fractions, choices, refits, budgets,
                                     others_a)
        # Refit on - off, per choice at MIPP's counts.
        if len(refits) == 2:
            header = [f"#### {dataset} / {arch}: refit (on − off, at MIPP's counts, paired by "
                      "seed)\n", "| removed | retrain | " + " | ".join(choices) + " |",
                      "|---|---|" + "---|" * len(choices)]
            out += header
            for f in fractions:
                for stage in ["0", *budgets]:
                    budget = budgets[0] if stage == "0" else stage
                    parts = []
                    for c in choices:
                        on = cells.get(("after-training", dataset, arch, f, c, "mipp", True, budget), {})
                        off = cells.get(("after-training", dataset, arch, f, c, "mipp", False, budget), {})
                        seeds = sorted(set(on) & set(off))
                        if not seeds:
                            parts.append("–")
                            continue
                        s = paired([_acc(on[k], stage) - _acc(off[k], stage) for k in seeds])
                        parts.append(f"{_fmt_diff(s)} {refit_verdict(s)}")
                    if all(part == "–" for part in parts):
                        continue  # no cell of this model at that fraction and budget
                    epochs = "0" if stage == "0" else f"{budget_label(budget)}"
                    out.append(f"| {100 * f:.0f}% (target) | {epochs} | " + " | ".join(parts) + " |")
            if out[-1] == header[-1]:
                del out[-len(header):]  # no model cell with the refit off: no table
            else:
                out.append("")
        for r in pat:
            if (r["dataset"], r["arch"]) == (dataset, arch) and r["allocation"] == "mipp":
                seconds.setdefault((dataset, arch, r["choice"]), {})[(r["seed"], r["fraction_target"])] = r["selection_s"]
            if (r["dataset"], r["arch"]) == (dataset, arch) and r["allocation"] != "mipp" \
                    and r["choice"] == "l1":
                seconds.setdefault((dataset, arch, f"alloc:{r['allocation']}"), {})[
                    (r["seed"], r["fraction_target"])] = r["allocation_s"]
    # At initialisation.
    pai = [r for r in rows if r["arm"] == "at-init"]
    if pai:
        out.append("#### At initialisation (other − MIPP at MIPP's counts, trained from the "
                   "pruned init with the dense recipe, paired by seed)\n")
        names = [c for c in AT_INIT if c != "mipp"]
        out.append("| dataset / arch | removed | seeds | MIPP (%) | " + " | ".join(names) + " |")
        out.append("|---|---|---:|---:|" + "---|" * len(names))
        for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in pai}):
            for f in sorted({float(r["fraction_target"]) for r in pai}):
                base = cells.get(("at-init", dataset, arch, f, "mipp", "mipp", False, "dense"), {})
                if not base:
                    continue
                parts = []
                for c in names:
                    other = cells.get(("at-init", dataset, arch, f, c, "mipp", False, "dense"), {})
                    parts.append(_paired_cell(base, other, lambda r: 100 * r["acc_retrained"]))
                removed = statistics.mean(r["removed_fraction"] for r in base.values())
                out.append(f"| {dataset} / {arch} | {100 * removed:.1f}% | {len(base)} | "
                           f"{_mean_sd([100 * r['acc_retrained'] for r in base.values()])} | "
                           + " | ".join(parts) + " |")
        out.append("")
    # Cost.
    out.append("#### Selection cost (seconds per selection, mean ± sd over seeds × fractions; "
               "MIPP: its whole target search; alloc: computing the counts, L1 choice rows)\n")
    out.append("| dataset / arch | method | selections | seconds |")
    out.append("|---|---|---:|---:|")
    for (dataset, arch, name), per in sorted(seconds.items()):
        values = list(per.values())
        out.append(f"| {dataset} / {arch} | {name} | {len(values)} | {_mean_sd(values)} |")
    tols: dict[tuple, dict] = defaultdict(dict)
    for s in selections:  # one per seed: the last recorded, the one a run reuses
        tols[(s["dataset"], s["arch"], s["fraction_target"])][(s["seed"], s["mode"])] = s
    tols = {key: list(per_seed.values()) for key, per_seed in tols.items()}
    if tols:
        out.append("")
        out.append("#### MIPP's target search: the tol that reaches each fraction\n")
        out.append("| dataset / arch | target | seeds | tol (per seed) | removed (mean) "
                   "| search s (mean) | code |")
        out.append("|---|---:|---:|---|---:|---:|---|")
        for (dataset, arch, f), recs in sorted(tols.items()):
            out.append(f"| {dataset} / {arch} | {100 * f:.0f}% | {len(recs)} | "
                       + ", ".join(f"{r['tol']:.3g}" for r in sorted(recs, key=lambda r: r['seed']))
                       + f" | {100 * statistics.mean(r['removed_fraction'] for r in recs):.1f}% | "
                       f"{statistics.mean(r['selection_s'] for r in recs):.0f} | "
                       + ", ".join(sorted({r.get("code", "before 9dfde53") for r in recs})) + " |")
    out += ["", *lr_rows] if lr_rows else []
    return "\n".join(out) + "\n"


def budget_label(budget: str) -> str:
    return "1 ep" if budget == "1" else f"{float(budget):.0%} of dense epochs"


# ---------------------------------------------------------------------------------------------
# Plots


def plots(rows: list[dict], prefix: str, lr_scale: float = 1.0) -> list[Path]:
    """One accuracy plot per model and the cost chart, of the cells retrained at `lr_scale` x
    the recipe's lr (files named `_lr<scale>` when it is not 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    rows = [r for r in rows if _lr_scale(r) == lr_scale]  # as the main tables read them
    suffix, lr_note = ("", "") if lr_scale == 1.0 else (f"_lr{lr_scale:g}",
                                                       f", lr {lr_scale:g}x the recipe's")
    pat = [r for r in rows if r["arm"] == "after-training" and r["allocation"] == "mipp"
           and r["refit"]]
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in pat}):
        mine = [r for r in pat if (r["dataset"], r["arch"]) == (dataset, arch)]
        budget = max({r["budget"] for r in mine}, key=float)
        fig, ax = plt.subplots(figsize=(6, 4))
        for dodge, choice in enumerate(CHOICES):
            points = defaultdict(list)
            for r in mine:
                if r["choice"] == choice and r["budget"] == budget:
                    points[float(r["fraction_target"])].append(r)
            if not points:
                continue
            xs = sorted(points)
            # Shifted by 0.2 points per method so that intervals at one fraction do not overlap.
            removed = [100 * statistics.mean(r["removed_fraction"] for r in points[f])
                       + 0.2 * (dodge - 2) for f in xs]
            accs = [[100 * r["acc_retrained"] for r in points[f]] for f in xs]
            mean = [statistics.mean(a) for a in accs]
            half = [(_t975(len(a) - 1) * statistics.stdev(a) / math.sqrt(len(a))) if len(a) > 1
                    else 0.0 for a in accs]
            line, = ax.plot(removed, mean, marker="o", label=choice)
            # The band is the seeds' 95% interval; with one fraction only a bar shows it.
            ax.fill_between(removed, [m - h for m, h in zip(mean, half)],
                            [m + h for m, h in zip(mean, half)], alpha=0.2, color=line.get_color())
            if len(xs) == 1:
                ax.errorbar(removed, mean, yerr=half, capsize=4, color=line.get_color())
        ax.set_ylim(max(0, ax.get_ylim()[0]), 100)  # a 2-seed interval can reach past 100%
        ax.set_xlabel("units removed (%; methods shifted ±0.4 apart for legibility)")
        ax.set_ylabel("test accuracy after retraining (%)")
        seeds = len({r["seed"] for r in mine})
        ax.set_title(f"{dataset} {arch}: MIPP's counts, refit on, retrain "
                     f"{budget_label(budget)}{lr_note}\n(up to {seeds} seeds, 95% CI)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = IMG / f"{prefix}_{dataset}_{arch}{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    cost = defaultdict(list)
    for r in rows:
        if r["arm"] == "after-training" and r["allocation"] == "mipp" and r["refit"] \
                and r["budget"] == min({x["budget"] for x in rows if x["arm"] == "after-training"}, key=float):
            cost[r["choice"]].append(r["selection_s"])
    for r in rows:  # the allocation rules' own cost (one row per seed x fraction)
        if r["arm"] == "after-training" and r["choice"] == "l1" and r["refit"] \
                and r["allocation"] in ("global", "sensitivity"):
            cost[f"{r['allocation']} alloc."].append(r["allocation_s"])
    if cost:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [c for c in [*CHOICES, "global alloc.", "sensitivity alloc."] if c in cost]
        means = [statistics.mean(cost[c]) for c in names]
        sds = [statistics.stdev(cost[c]) if len(cost[c]) > 1 else 0 for c in names]
        ax.bar(names, means, yerr=sds, capsize=4)
        ax.set_yscale("log")
        ax.set_ylabel("seconds per selection (log)")
        ax.set_title("selection cost, same machine, same run", fontsize=9)
        fig.tight_layout()
        path = IMG / f"{prefix}_cost{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the tables from --jsonl")
    parser.add_argument("--plots", action="store_true", help="write docs/img/paper_protocol*.png")
    parser.add_argument("--jsonl", type=Path, nargs="*", help="raw cell files (default by preset)")
    parser.add_argument("--models", nargs="+", help="dataset/arch, e.g. mnist/lenet5 (to run, "
                        "or to tabulate)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (or to tabulate)")
    parser.add_argument("--fractions", type=float, nargs="+")
    parser.add_argument("--choices", nargs="+", choices=CHOICES)
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS)
    parser.add_argument("--budgets", nargs="+", help="'1' (epoch) and/or fractions of the "
                        "dense epochs such as 0.7")
    parser.add_argument("--no-refit-off", action="store_true", help="refit on only")
    parser.add_argument("--at-init", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--deadline", type=float, help="stop starting new fractions after N s")
    parser.add_argument("--retrain-lr-scale", type=float, default=1.0,
                        help="retrain at this multiple of the dense recipe's lr (a row field); "
                        "with --table or --plots, the scale they read (--table at 1: also a table "
                        "comparing the other scales' cells with the recipe's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    preset = "quick" if args.quick or not args.full else "full"
    suffix = "-quick" if preset == "quick" else ""
    jsonls = args.jsonl or [RESULTS / f"paper_protocol{suffix}.jsonl"]
    if args.table or args.plots:
        def wanted(r: dict) -> bool:
            return ((args.seeds is None or int(r["seed"]) in args.seeds)
                    and (not args.models or f"{r['dataset']}/{r['arch']}" in args.models))

        rows = [r for p in jsonls for r in _read_jsonl(p) if wanted(r)]
        selections = [r for p in jsonls
                      for r in _read_jsonl(p.with_name(p.stem + "-selections.jsonl"))
                      if wanted(r)]
        if args.table:
            print(tables(rows, selections, args.retrain_lr_scale))
        if args.plots:
            for path in plots(rows, f"paper_protocol{suffix}", args.retrain_lr_scale):
                print(f"wrote {path}")
        return 0
    if not (args.quick or args.full):
        parser.error("give --quick or --full (or --table / --plots)")
    p = PRESETS[preset]
    args.jsonl = jsonls[0]
    args.selections = args.jsonl.with_name(args.jsonl.stem + "-selections.jsonl")
    args.models = [tuple(m.split("/")) for m in args.models] if args.models else p["models"]
    args.seeds = args.seeds if args.seeds is not None else p["seeds"]
    args.fractions = args.fractions or p["fractions"]
    args.choices = args.choices or p["choices"]
    args.allocations = args.allocations or p["allocations"]
    args.budgets = args.budgets or p["budgets"]
    args.refits = [True] if args.no_refit_off else p["refits"]
    args.at_init = p["at_init"] if args.at_init is None else args.at_init
    args.at_init_methods = AT_INIT
    args.repeats, args.recon = p["repeats"], p["recon"]
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
