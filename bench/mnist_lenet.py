"""LeNet-5 on MNIST: MIPP's selection paths, target search and retrained accuracy, and ThiNet.

    python bench/mnist_lenet.py paths --seeds 0 1 2 3 4      # sequential vs fast, per seed
    python bench/mnist_lenet.py targets --code after         # targets 0.5/0.8/0.9/0.95 (+ ThiNet)
    PYTHONPATH=/tmp/mipp-before python bench/mnist_lenet.py targets --code before
    python bench/mnist_lenet.py target-seeds --seeds 0 1 2 3 4 --targets 0.9 0.95  # before/after
    python bench/mnist_lenet.py tol-map --seeds 0 1 2 3 4 --tols 0.05 0.1 0.2 0.4  # removed per tol
    python bench/mnist_lenet.py redundancy --seeds 0 1 2 3 4 # synthetic redundancy at small tols
    python bench/mnist_lenet.py options --seeds 0 1 2        # issue 9 item 5 options at target 0.8
    python bench/mnist_lenet.py options --seeds 0 1 2 3 4 --targets 0.8 0.9 \
        --options default conv_grid=2                          # the grid against the default
    python bench/mnist_lenet.py ablation --seeds 0 1         # the selection defaults, one at a time
    python bench/mnist_lenet.py table                        # BENCHMARKS.md section 1 tables

`paths` runs the sequential and the fast path back to back for each seed (interleaved, so both
see the same load) and records per-layer kept sets and selection seconds. `targets` runs MIPP
at each target and ThiNet at the fraction MIPP reached, one after the other. `--code` labels
the row ("before" runs the code of a `git worktree` put first on PYTHONPATH). `target-seeds` runs
the same target searches per seed without ThiNet, so that `--code before` and `--code after` pair
by seed (bench/results/mnist_lenet-targets-seeds.jsonl; a row already there is skipped, so a
stopped run resumes). Every row carries
the load average and the commit of the imported `mipp`; rows append to
bench/results/mnist_lenet-<kind>.jsonl and are never truncated. `table` renders the tables from
those files alone. The calibration set is 2,048 samples and the reference fit 50 epochs
(the `--quick` settings of the earlier version of this script), retraining 1 epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.5, 0.8, 0.9, 0.95)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def code_commit() -> str:
    import mipp
    root = Path(mipp.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _SweepCounter(logging.Handler):
    """Counts the target search's per-sweep log lines (both the old and the new code log one)."""

    def __init__(self):
        super().__init__()
        self.sweeps = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("target search sweep"):
            self.sweeps += 1


def _setup(seed: int, device: str):
    import mipp
    from mipp.config import TrainConfig
    from mipp.data import load_dataset
    from mipp.training import resolve_device
    from mipp.zoo import build_model

    data = load_dataset("mnist")
    dev = resolve_device(device)
    model = build_model("lenet5", data.input_shape, data.num_classes, seed=seed)
    mipp.train(model, data, TrainConfig(epochs=3, lr=1e-3, batch_size=128), device=dev, seed=seed)
    return data, model.cpu(), dev


def _base(seed: int, dev) -> dict:
    from mipp.config import ReconstructorConfig, TrainConfig
    return dict(seed=seed, device=str(dev), retrain=TrainConfig(epochs=1),
                calibration_samples=2048, reconstructor=ReconstructorConfig(epochs=50))


def _row(kind: str, label: str, settings: dict, result, code: str, **extra) -> dict:
    m = result.metrics
    return {"kind": kind, "label": label, "code": code, "commit": code_commit(),
            "settings": {k: v for k, v in settings.items()},
            "masks": result.masks, "removed_fraction": m["units"]["removed_fraction"],
            "accuracy": m["accuracy"], "seconds": m["seconds"],
            "phases": m.get("selection_phases"),
            "loadavg_after": os.getloadavg()[0], "machine": machine(),
            "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # appended to, never truncated: every run stays on disk
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "masks"}), flush=True)


def run_paths(args) -> None:
    import mipp
    from mipp.config import PruneConfig
    for seed in args.seeds:
        data, model, dev = _setup(seed, args.device)
        order = ["sequential", "fast"] if seed % 2 == 0 else ["fast", "sequential"]
        for path in order:  # alternate which runs first, so load drifts hit both alike
            settings = {"path": path}
            load = os.getloadavg()[0]
            result = mipp.prune(model, data, PruneConfig(**_base(seed, dev), **settings))
            _append(args.results / "mnist_lenet-paths.jsonl",
                    _row("paths", path, settings, result, args.code, seed=seed,
                         loadavg_before=load))


def run_targets(args) -> None:
    import mipp
    from mipp.config import PruneConfig
    counter = _SweepCounter()
    logging.getLogger("mipp").addHandler(counter)
    logging.getLogger("mipp").setLevel(logging.INFO)
    data, model, dev = _setup(args.seeds[0], args.device)
    base = _base(args.seeds[0], dev)
    load = os.getloadavg()[0]
    single = mipp.prune(model, data, PruneConfig(**base))  # one sweep at the default tol
    _append(args.results / "mnist_lenet-targets.jsonl",
            _row("targets", "default tol", {}, single, args.code, seed=args.seeds[0],
                 loadavg_before=load, sweeps=1))
    reached = single.metrics["units"]["removed_fraction"]
    load = os.getloadavg()[0]
    thinet = mipp.prune(model, data, PruneConfig(**base, method="thinet", target=round(reached, 4)))
    _append(args.results / "mnist_lenet-targets.jsonl",
            _row("targets", "thinet at default tol", {"method": "thinet", "target": reached},
                 thinet, args.code, seed=args.seeds[0], loadavg_before=load))
    for target in args.targets:
        counter.sweeps = 0
        load = os.getloadavg()[0]
        result = mipp.prune(model, data, PruneConfig(**base, target=target))
        _append(args.results / "mnist_lenet-targets.jsonl",
                _row("targets", f"target {target}", {"target": target}, result, args.code,
                     seed=args.seeds[0], loadavg_before=load, sweeps=counter.sweeps))
        reached = result.metrics["units"]["removed_fraction"]
        load = os.getloadavg()[0]
        thinet = mipp.prune(model, data, PruneConfig(**base, method="thinet",
                                                      target=round(reached, 4)))
        _append(args.results / "mnist_lenet-targets.jsonl",
                _row("targets", f"thinet at {target}", {"method": "thinet", "target": reached},
                     thinet, args.code, seed=args.seeds[0], loadavg_before=load))


def run_target_seeds(args) -> None:
    """Per seed: the default-tol sweep, then each target (no ThiNet), under `--code`; the table
    pairs "after" with "before" by seed. Rows already in the file (code, seed, label) are skipped."""
    import mipp
    from mipp.config import PruneConfig
    path = args.results / "mnist_lenet-targets-seeds.jsonl"
    counter = _SweepCounter()
    logging.getLogger("mipp").addHandler(counter)
    logging.getLogger("mipp").setLevel(logging.INFO)
    done = {(r["code"], r["seed"], r["label"]) for r in _read(path)}
    runs = [("default tol", {})] + [(f"target {t}", {"target": t}) for t in args.targets]
    for seed in args.seeds:
        todo = [(label, s) for label, s in runs if (args.code, seed, label) not in done]
        if not todo:
            continue
        data, model, dev = _setup(seed, args.device)
        base = _base(seed, dev)
        for label, settings in todo:
            counter.sweeps = 0
            load = os.getloadavg()[0]
            result = mipp.prune(model, data, PruneConfig(**base, **settings))
            _append(path, _row("targets", label, settings, result, args.code, seed=seed,
                               loadavg_before=load,
                               sweeps=counter.sweeps if settings else 1))


OPTIONS = {"default": {}, "logits_loss=ce": {"logits_loss": "ce"},
           "linear_below=16": {"linear_below": 16}, "conv_grid=2": {"conv_grid": 2}}


def run_options(args) -> None:
    """Each estimator option of issue 9 item 5 (or those of --options) at the same target (0.8,
    or each of --targets), so that retrained accuracies compare at equal units removed; ThiNet
    at the default's fraction in the same run gives the time ratio."""
    import mipp
    from mipp.config import PruneConfig, ReconstructorConfig
    targets = args.targets if args.targets != list(TARGETS) and args.targets else [0.8]
    options = {k: v for k, v in OPTIONS.items() if not args.options or k in args.options}
    for seed, target in ((s, t) for s in args.seeds for t in targets):
        data, model, dev = _setup(seed, args.device)
        base = _base(seed, dev)
        for label, option in options.items():
            rc = ReconstructorConfig(**{**base["reconstructor"].model_dump(), **option})
            load = os.getloadavg()[0]
            result = mipp.prune(model, data, PruneConfig(**{**base, "reconstructor": rc},
                                                         target=target))
            _append(args.results / "mnist_lenet-options.jsonl",
                    _row("options", label, {"target": target, "reconstructor": option}, result,
                         args.code, seed=seed, loadavg_before=load))
        load = os.getloadavg()[0]
        thinet = mipp.prune(model, data, PruneConfig(**base, method="thinet", target=target))
        _append(args.results / "mnist_lenet-options.jsonl",
                _row("options", "thinet", {"method": "thinet", "target": target}, thinet,
                     args.code, seed=seed, loadavg_before=load))


# The reconstructor defaults before the speed work of issue 9 item 5, and each change alone
# (the exact speed-ups, dropped masked columns and foreach Adam, are in every row).
OLD = {"min_delta": 0.0, "finetune_epochs": 25, "finetune_batch_size": None, "ordering_epochs": 30}
ABLATION = {
    "old defaults, block 8": ({"block_size": 8}, OLD),
    "new defaults, block 8": ({"block_size": 8}, {}),
    "new defaults, block 4": ({"block_size": 4}, {}),
    "new defaults, block 2 (default on CPU)": ({}, {}),
    "new defaults, block 1": ({"block_size": 1}, {}),
    "new, min_delta 0": ({}, {"min_delta": 0.0}),
    "new, finetune 25 epochs x 256 rows": ({}, {"finetune_epochs": 25,
                                                "finetune_batch_size": None}),
    "new, ordering 30 epochs": ({}, {"ordering_epochs": 30}),
}


def run_ablation(args) -> None:
    """One sweep at the default tol per setting of ABLATION: seconds by phase, fits, kept sets
    and retrained accuracy, so that each default of the selection is measured against its
    alternative on the same model in the same run."""
    import mipp
    from mipp.config import PruneConfig, ReconstructorConfig
    for seed in args.seeds:
        data, model, dev = _setup(seed, args.device)
        base = _base(seed, dev)
        for label, (settings, option) in ABLATION.items():
            rc = ReconstructorConfig(**{**base["reconstructor"].model_dump(), **option})
            load = os.getloadavg()[0]
            result = mipp.prune(model, data, PruneConfig(**{**base, "reconstructor": rc},
                                                         **settings))
            fits = {n: d.get("candidate_fits") for n, d in result.details["selection"].items()}
            _append(args.results / "mnist_lenet-ablation.jsonl",
                    _row("ablation", label, {**settings, "reconstructor": option}, result,
                         args.code, seed=seed, loadavg_before=load, fits=fits))


def run_tol_map(args) -> None:
    """One sweep per (seed, tol) with no retraining: the fraction of units each tol removes and
    its selection seconds (bench/results/mnist_lenet-tolmap.jsonl; rows there are skipped)."""
    import mipp
    from mipp.config import PruneConfig, TrainConfig
    path = args.results / "mnist_lenet-tolmap.jsonl"
    done = {(r["code"], r["seed"], r["settings"]["tol"]) for r in _read(path)}
    for seed in args.seeds:
        todo = [t for t in args.tols if (args.code, seed, t) not in done]
        if not todo:
            continue
        data, model, dev = _setup(seed, args.device)
        base = {**_base(seed, dev), "retrain": TrainConfig(epochs=0)}
        for tol in todo:
            load = os.getloadavg()[0]
            result = mipp.prune(model, data, PruneConfig(**base, tol=tol))
            _append(path, _row("tolmap", f"tol {tol}", {"tol": tol}, result, args.code,
                               seed=seed, loadavg_before=load))


def run_redundancy(args) -> None:
    """The synthetic redundant layers of tests/engine/test_redundancy.py at small tols: how
    many seeds keep a redundant unit (the smallest tol that removes exact redundancy)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "engine"))
    from test_redundancy import A, B, C, COPY, CONSTANT, DEAD, E, FAST, NOISE, SCALED, SUM, _layer

    from mipp.config import PruneConfig
    from mipp.terc import terc_select
    for tol in args.tols:
        for seed in args.seeds:
            x, y = _layer(seed)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            d = terc_select(x, y, PruneConfig(path="fast", tol=tol, reconstructor=FAST), seed=seed)
            kept = set(d.kept)
            ok = (not kept & {DEAD, CONSTANT, NOISE} and len(kept & {A, COPY}) == 1
                  and len(kept & {B, SCALED}) == 1 and len(kept & {C, E, SUM}) == 2)
            _append(args.results / "mnist_lenet-redundancy.jsonl",
                    {"kind": "redundancy", "tol": tol, "seed": seed, "kept": sorted(kept),
                     "exact": ok, "seconds": time.perf_counter() - start, "commit": code_commit(),
                     "loadavg_before": load, "machine": machine(),
                     "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def _jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _t975(df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def _x_one_sweep(last: dict, r: dict) -> float | None:
    """Selection seconds over the default-tol sweep's of the same code and seed (same process
    when the run was not resumed): the ratio survives load that slows both alike."""
    one = last.get((r["code"], r["seed"], "default tol"))
    return r["seconds"]["selection"] / one["seconds"]["selection"] if one else None


def _paired_target_rows(last: dict, code: str, targets: list[float]) -> list[tuple]:
    """Per target: (target, seeds, `code`'s rows, "before"'s rows) over the seeds both ran."""
    out = []
    for target in targets:
        label = f"target {target}"
        seeds = sorted(s for c, s, lab in last if c == code and lab == label
                       and ("before", s, label) in last)
        if seeds:
            out.append((target, seeds, [last[(code, s, label)] for s in seeds],
                        [last[("before", s, label)] for s in seeds]))
    return out


def _units_kept(row: dict) -> int:
    return sum(len(kept) for kept in row["masks"].values())


def _render_paired_options(rows: list[dict]) -> list[str]:
    """Each option against the default of the same code, seed and target, paired by seed (95%
    t-interval), where at least 2 seeds ran both; a later row of the same cell replaces an
    earlier."""
    last = {(r["code"], r["label"], r["seed"], r["settings"]["target"]): r for r in rows}
    out = []
    for code, label, target in dict.fromkeys((c, lab, t) for c, lab, _, t in last):
        if label in ("default", "thinet"):
            continue
        seeds = sorted(s for c, lab, s, t in last if (c, lab, t) == (code, label, target)
                       and (code, "default", s, target) in last)
        if len(seeds) < 2:
            continue
        opt = [last[(code, label, s, target)] for s in seeds]
        base = [last[(code, "default", s, target)] for s in seeds]
        diffs = [o["accuracy"]["retrained"] - b["accuracy"]["retrained"]
                 for o, b in zip(opt, base)]
        m, sd = _mean_sd(diffs)
        half = _t975(len(diffs) - 1) * sd / len(diffs) ** 0.5
        ratios = [o["seconds"]["selection"] / b["seconds"]["selection"] for o, b in zip(opt, base)]
        per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(seeds, diffs))
        removed = ", ".join(f"{o['removed_fraction']:.1%}/{b['removed_fraction']:.1%}"
                            for o, b in zip(opt, base))
        wins = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)
        if not out:
            out = ["Paired by seed, option - default of the same code and target (95% "
                   "t-interval; selection x: the option's seconds over the default's):", "",
                   "| code | option | target | seeds | retrained diff mean [95% CI] | wins / ties "
                   "/ losses | per seed | removed per seed (option/default) | selection x mean "
                   "(min-max) |", "|---|---|---|---|---|---|---|---|---|"]
        out.append(f"| {code} | {label} | {target} | {len(seeds)} | {m:+.4f} [{m - half:+.4f}, "
                   f"{m + half:+.4f}] | {wins[0]} / {wins[1]} / {wins[2]} | {per_seed} "
                   f"| {removed} | {sum(ratios) / len(ratios):.2f} ({min(ratios):.2f}-"
                   f"{max(ratios):.2f}) |")
    return out + [""] if out else []


def _render_target_seeds(rows: list[dict]) -> list[str]:
    """Per target and code: landed fraction, retrained accuracy, selection seconds as a ratio to
    the same seed's default-tol sweep of the same code, sweeps; then each code - "before" paired
    by seed with its 95% t-interval. A later row of the same (code, seed, label) replaces an
    earlier."""
    if not rows:
        return []
    last = {(r["code"], r["seed"], r["label"]): r for r in rows}
    codes = sorted({c for c, _, _ in last}, key=lambda c: (c != "before", c))
    targets = sorted({r["settings"]["target"] for r in last.values() if "target" in r["settings"]})
    out = ["| target | code (commit) | seeds | removed mean (min-max) | max miss | retrained "
           "mean ± sd | selection s mean | x one sweep mean (min-max) | sweeps (min-max) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for target in targets:
        for code in codes:
            cell = [r for (c, _, _), r in sorted(last.items(), key=lambda kv: kv[0][1])
                    if c == code and r["settings"].get("target") == target]
            if not cell:
                continue
            removed = [r["removed_fraction"] for r in cell]
            acc_m, acc_sd = _mean_sd([r["accuracy"]["retrained"] for r in cell])
            sel = [r["seconds"]["selection"] for r in cell]
            ratios = [x for x in (_x_one_sweep(last, r) for r in cell) if x]
            sweeps = [r["sweeps"] for r in cell]
            commits = ",".join(sorted({r["commit"] for r in cell}))
            ratio = (f"{sum(ratios) / len(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                     if ratios else "-")
            out.append(f"| {target:g} | {code} ({commits}) | {len(cell)} "
                       f"| {sum(removed) / len(removed):.1%} ({min(removed):.1%}-{max(removed):.1%}) "
                       f"| {max(abs(x - target) for x in removed):.3f} "
                       f"| {acc_m:.4f} ± {acc_sd:.4f} | {sum(sel) / len(sel):.1f} | {ratio} "
                       f"| {min(sweeps)}-{max(sweeps)} |")
    out.append("")
    for code in codes:
        pairs = _paired_target_rows(last, code, targets) if code != "before" else []
        if not pairs:
            continue
        out += [f"Paired by seed, {code} - before (95% t-interval over the seeds both codes "
                "ran; x one sweep: each code's selection s over its own default-tol sweep of "
                "that seed, niced runs on a shared machine):", "",
                f"| target | pairs | removed diff (pp) | retrained diff mean [95% CI] | {code} "
                f"wins / ties / losses | per seed ({code} - before) | units kept per seed "
                f"({code} / before) | x one sweep {code} / before |",
                "|---|---|---|---|---|---|---|---|"]
        for target, seeds, a, b in pairs:
            diff = [x["accuracy"]["retrained"] - y["accuracy"]["retrained"] for x, y in zip(a, b)]
            m, sd = _mean_sd(diff)
            half = _t975(len(diff) - 1) * sd / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            dr = [100 * (x["removed_fraction"] - y["removed_fraction"]) for x, y in zip(a, b)]
            wins = sum(d > 0 for d in diff), sum(d == 0 for d in diff), sum(d < 0 for d in diff)
            per = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(seeds, diff))
            kept = ", ".join(f"{s}: {_units_kept(x)}/{_units_kept(y)}"
                             for s, x, y in zip(seeds, a, b))
            ra = [x for x in (_x_one_sweep(last, r) for r in a) if x]
            rb = [x for x in (_x_one_sweep(last, r) for r in b) if x]
            speed = (f"{sum(ra) / len(ra):.2f} / {sum(rb) / len(rb):.2f}" if ra and rb else "-")
            out.append(f"| {target:g} | {len(seeds)} | {sum(dr) / len(dr):+.1f} "
                       + (f"| {m:+.4f} [{m - half:+.4f}, {m + half:+.4f}] " if len(diff) > 1
                          else f"| {m:+.4f} [-] ")
                       + f"| {wins[0]} / {wins[1]} / "
                       f"{wins[2]} | {per} | {kept} | {speed} |")
        out.append("")
    return out


def render(results: Path) -> str:
    out = []
    paths = _read(results / "mnist_lenet-paths.jsonl")
    by_seed: dict[tuple, dict] = {}
    for r in paths:  # a seed's two runs back to back; a later run of the same seed replaces them
        by_seed.setdefault((r["code"], r["seed"]), {})[r["label"]] = r
    pairs = [(k, v) for k, v in by_seed.items() if {"sequential", "fast"} <= set(v)]
    if pairs:
        layers = list(pairs[0][1]["fast"]["masks"])
        out += ["| code | seed | " + " | ".join(f"Jaccard {n}" for n in layers)
                + " | kept seq | kept fast | sequential s | fast s | ratio | load avg |",
                "|---|---|" + "---|" * len(layers) + "---|---|---|---|---|---|"]
        for (code, seed), v in pairs:
            s, f = v["sequential"], v["fast"]
            jac = [_jaccard(s["masks"][n], f["masks"][n]) for n in layers]
            ks = "/".join(str(len(s["masks"][n])) for n in layers)
            kf = "/".join(str(len(f["masks"][n])) for n in layers)
            ts, tf = s["seconds"]["selection"], f["seconds"]["selection"]
            loads = [s["loadavg_before"], s["loadavg_after"], f["loadavg_before"], f["loadavg_after"]]
            out.append(f"| {code} | {seed} | " + " | ".join(f"{j:.2f}" for j in jac)
                       + f" | {ks} | {kf} | {ts:.1f} | {tf:.1f} | {ts / tf:.1f}x "
                       f"| {min(loads):.1f}-{max(loads):.1f} |")
        out.append("")
    tolmap = _read(results / "mnist_lenet-tolmap.jsonl")
    if tolmap:
        tols = sorted({r["settings"]["tol"] for r in tolmap})
        cells = {(r["code"], r["seed"], r["settings"]["tol"]): r for r in tolmap}
        out += ["One sweep per tol, no retraining (`tol-map`): units removed and selection s "
                "(x the seed's tol-0.05 sweep where it ran).", "",
                "| code (commit) | seed | " + " | ".join(f"tol {t:g}" for t in tols) + " |",
                "|---|---|" + "---|" * len(tols)]
        for code, seed in dict.fromkeys((r["code"], r["seed"]) for r in tolmap):
            base = cells.get((code, seed, 0.05))
            row = []
            for t in tols:
                r = cells.get((code, seed, t))
                if r is None:
                    row.append("-")
                    continue
                ratio = (f", {r['seconds']['selection'] / base['seconds']['selection']:.2f}x"
                         if base else "")
                row.append(f"{r['removed_fraction']:.1%} ({r['seconds']['selection']:.1f} s"
                           f"{ratio})")
            commit = cells[(code, seed, next(t for t in tols if (code, seed, t) in cells))]
            out.append(f"| {code} ({commit['commit']}) | {seed} | " + " | ".join(row) + " |")
        out.append("")
    targets = _read(results / "mnist_lenet-targets.jsonl")
    if targets:
        out += ["| code (commit) | run | removed | sweeps | selection s | x one sweep "
                "| ThiNet s (same fraction) | MIPP / ThiNet | pruned+refit | retrained "
                "| ThiNet retrained | load avg |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        single: dict[str, float] = {}  # code label -> its latest one-sweep selection seconds
        phased: list[dict] = []
        for i, r in enumerate(targets):
            if r["label"] == "default tol":
                single[r["code"]] = r["seconds"]["selection"]
            if r["label"].startswith("thinet"):
                continue
            # Its ThiNet row: the next row of the same code (two codes may run at once).
            thinet = next((t for t in targets[i + 1:] if t["code"] == r["code"]), None)
            expected = "thinet at " + r["label"].removeprefix("target ")
            if thinet is not None and thinet["label"] != expected:
                thinet = None
            sel = r["seconds"]["selection"]
            one = single.get(r["code"])
            ratio = f"{sel / one:.2f}" if one and r["label"] != "default tol" else "1"
            if r.get("phases"):
                phased.append(r)
            th_s = f"{thinet['seconds']['selection']:.1f}" if thinet else "-"
            th_ratio = f"{sel / thinet['seconds']['selection']:.0f}x" if thinet else "-"
            th_acc = f"{thinet['accuracy']['retrained']:.4f}" if thinet else "-"
            out.append(f"| {r['code']} ({r['commit']}) | {r['label']} | {r['removed_fraction']:.1%} "
                       f"| {r.get('sweeps', '-')} | {sel:.1f} | {ratio} | {th_s} | {th_ratio} "
                       f"| {r['accuracy']['pruned']:.4f} | {r['accuracy']['retrained']:.4f} "
                       f"| {th_acc} | {r['loadavg_before']:.1f}-{r['loadavg_after']:.1f} |")
        out.append("")
        phased += [r for v in by_seed.values() for r in v.values() if r.get("phases")]
        if phased:
            names = ["activations", "reference_fit", "control", "ordering", "screening",
                     "finetune"]
            out += ["Where the selection's seconds go (`selection_phases`; refit is after "
                    "selection; other = selection - the phases):", "",
                    "| code (commit) | run | seed | selection s | " + " | ".join(names)
                    + " | other | refit s | load avg |",
                    "|---|---|---|---|" + "---|" * len(names) + "---|---|---|"]
            for r in phased:
                sel, ph = r["seconds"]["selection"], r["phases"]
                other = sel - sum(ph.get(n, 0.0) for n in names)
                out.append(f"| {r['code']} ({r['commit']}) | {r['label']} | {r['seed']} "
                           f"| {sel:.1f} | "
                           + " | ".join(f"{ph.get(n, 0.0):.1f}" for n in names)
                           + f" | {other:.1f} | {r['seconds'].get('refit', 0.0):.2f} "
                           f"| {r['loadavg_before']:.1f}-{r['loadavg_after']:.1f} |")
            out.append("")
    seeded = _read(results / "mnist_lenet-targets-seeds.jsonl")
    out += _render_target_seeds(seeded)
    redundancy = _read(results / "mnist_lenet-redundancy.jsonl")
    if redundancy:
        out += ["| tol | seeds | exact answer (one of each redundant set kept, nothing else) "
                "| kept sets that were not |", "|---|---|---|---|"]
        for tol in sorted({r["tol"] for r in redundancy}):
            rows = [r for r in redundancy if r["tol"] == tol]
            wrong = "; ".join(str(r["kept"]) for r in rows if not r["exact"]) or "-"
            out.append(f"| {tol:g} | {len(rows)} | {sum(r['exact'] for r in rows)} of {len(rows)} "
                       f"| {wrong} |")
        out.append("")
    options = _read(results / "mnist_lenet-options.jsonl")
    if options:
        out += ["| code (commit) | option | seed | target | removed | selection s | ThiNet s "
                "| MIPP / ThiNet | retrained | load avg |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(options):
            if r["label"] == "thinet":
                continue
            thinet = next((t for t in options[i + 1:] if t["code"] == r["code"]
                           and t["seed"] == r["seed"] and t["label"] == "thinet"
                           and t["settings"]["target"] == r["settings"]["target"]), None)
            sel = r["seconds"]["selection"]
            th = thinet["seconds"]["selection"] if thinet else None
            versus = f"| {th:.2f} | {sel / th:.1f}x " if th else "| - | - "
            out.append(f"| {r['code']} ({r['commit']}) | {r['label']} | {r['seed']} "
                       f"| {r['settings']['target']} | {r['removed_fraction']:.1%} | {sel:.1f} "
                       + versus + f"| {r['accuracy']['retrained']:.4f} "
                       f"| {r['loadavg_before']:.1f}-{r['loadavg_after']:.1f} |")
        out.append("")
        out += _render_paired_options(options)
    ablation = _read(results / "mnist_lenet-ablation.jsonl")
    if ablation:
        names = ["reference_fit", "control", "ordering", "screening", "finetune"]
        out += ["| code (commit) | setting | seed | selection s | " + " | ".join(names)
                + " | fits | kept | removed | retrained | load avg |",
                "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|"]
        for r in ablation:
            ph = r["phases"]
            out.append(f"| {r['code']} ({r['commit']}) | {r['label']} | {r['seed']} "
                       f"| {r['seconds']['selection']:.2f} | "
                       + " | ".join(f"{ph.get(n, 0.0):.2f}" for n in names)
                       + f" | {sum(r['fits'].values())} "
                       f"| {'/'.join(str(len(k)) for k in r['masks'].values())} "
                       f"| {r['removed_fraction']:.1%} | {r['accuracy']['retrained']:.4f} "
                       f"| {r['loadavg_before']:.1f}-{r['loadavg_after']:.1f} |")
        out.append("")
    machines = sorted({r["machine"] for r in paths + targets + seeded + redundancy + options
                       + ablation + tolmap})
    out.append("Machine: " + "; ".join(machines) + ".")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["paths", "targets", "target-seeds", "tol-map",
                                         "redundancy", "options", "ablation", "table"])
    parser.add_argument("--tols", type=float, nargs="+", default=[0.0, 0.001, 0.002, 0.005, 0.01])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", type=float, nargs="*", default=list(TARGETS),
                        help="none: the default-tol sweep and its ThiNet only")
    parser.add_argument("--code", default="after", help="label of the code under test")
    parser.add_argument("--options", nargs="+", choices=sorted(OPTIONS),
                        help="options: run only these (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.what == "paths":
        run_paths(args)
    elif args.what == "targets":
        run_targets(args)
    elif args.what == "target-seeds":
        run_target_seeds(args)
    elif args.what == "tol-map":
        run_tol_map(args)
    elif args.what == "redundancy":
        run_redundancy(args)
    elif args.what == "options":
        run_options(args)
    elif args.what == "ablation":
        run_ablation(args)
    table = render(args.results)
    (args.results / "mnist_lenet.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
