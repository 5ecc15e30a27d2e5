"""Accuracy vs fraction of units removed: MIPP against the structured baselines (issue 4).

For every dataset x architecture x mode (PaT: after training, PaI: at initialisation) x seed,
MIPP runs at each `tol`; every baseline then prunes to the per-layer unit counts MIPP chose in
that run (the paper's protocol, table "counts") and, with --global-table, to the same global
fraction with its own per-layer choice (table "global"). Each run records accuracy right after
pruning (MIPP and ThiNet with and without their least-squares refit), after the same retraining
budget, the selection seconds and the sizes.

    python bench/accuracy_vs_sparsity.py --quick                 # < 15 min on a 2-core CPU
    python bench/accuracy_vs_sparsity.py --full                  # hours on CPU; resumable
    python bench/accuracy_vs_sparsity.py --report a.csv b.csv    # tables and plots only

Every run appends one CSV row as soon as it ends (a killed run keeps what it finished, and a
rerun with the same --csv skips finished runs). At the end it writes PNG plots and a markdown
report next to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

import mipp
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.data import load_dataset
from mipp.zoo import build_model

RESULTS = Path(__file__).parent / "results"
ARCHS = {"lenet5": {}, "mlp": {"widths": (300, 100)}}
BASELINES = {"after-training": ["random", "l1", "taylor", "thinet"],
             "at-init": ["random", "snip", "grasp", "synflow"]}
REFIT = {"mipp", "thinet"}  # methods whose own recipe ends with a least-squares rescale
PRESETS = {
    "quick": dict(datasets=["mnist"], archs=["lenet5", "mlp"], modes=["after-training"],
                  seeds=[0], tols=[0.02, 0.3], n_train=10_000, n_test=5_000, dense_epochs=2,
                  retrain_epochs=1, global_table=False, calibration=1024, repeats=3,
                  recon_epochs=40, finetune_epochs=10, ordering_epochs=15),
    "full": dict(datasets=["mnist", "fashion-mnist"], archs=["lenet5", "mlp"],
                 modes=["after-training", "at-init"], seeds=[0, 1, 2],
                 tols=[0.0, 0.01, 0.03, 0.1, 0.3], n_train=20_000, n_test=10_000, dense_epochs=3,
                 retrain_epochs=1, global_table=True, calibration=2048, repeats=5,
                 recon_epochs=100, finetune_epochs=25, ordering_epochs=30),
}
FIELDS = ["dataset", "arch", "mode", "seed", "tol", "protocol", "method", "units_before",
          "units_after", "removed_fraction", "counts", "acc_dense", "acc_pruned_no_refit",
          "acc_pruned", "acc_retrained", "refit", "chance", "collapsed", "selection_s",
          "total_s", "params_before", "params_after", "macs_before", "macs_after", "device",
          "n_train", "calibration", "retrain_epochs"]


# ---------------------------------------------------------------------------------------------
# Running


def _key(row: dict) -> tuple:
    return (row["dataset"], row["arch"], row["mode"], int(row["seed"]), float(row["tol"]),
            row["protocol"], row["method"])


def _read(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if path.is_file():
            with path.open() as f:
                rows += list(csv.DictReader(f))
    return rows


class Log:
    """Appends rows to the CSV (header once) and remembers which runs are done."""

    def __init__(self, path: Path, resume: list[Path] = ()):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {_key(r): r for r in _read([*resume, path])}

    def write(self, row: dict) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.done[_key(row)] = {k: str(v) for k, v in row.items()}


def _row(base: dict, result, method: str, protocol: str, refit: bool, chance: float,
         seconds: float) -> dict:
    m = result.metrics
    acc = m["accuracy"]
    return {**base, "protocol": protocol, "method": method,
            "units_before": m["units"]["before"], "units_after": m["units"]["after"],
            "removed_fraction": round(m["units"]["removed_fraction"], 5),
            "counts": json.dumps({k: len(v) for k, v in result.masks.items()}),
            "acc_dense": acc["dense"], "acc_pruned_no_refit": acc["pruned_no_refit"],
            "acc_pruned": acc["pruned"], "acc_retrained": acc["retrained"], "refit": refit,
            "chance": round(chance, 4), "collapsed": acc["retrained"] <= chance + 0.02,
            "selection_s": m["seconds"].get("selection", 0.0), "total_s": round(seconds, 2),
            "params_before": m["params"]["before"], "params_after": m["params"]["after"],
            "macs_before": m["macs"]["before"], "macs_after": m["macs"]["after"],
            "device": m["device"]}


def run(args: argparse.Namespace) -> None:
    log = Log(args.csv, args.resume or [])
    deadline = time.monotonic() + args.deadline if args.deadline else math.inf
    recon = ReconstructorConfig(epochs=args.recon_epochs, finetune_epochs=args.finetune_epochs,
                                ordering_epochs=args.ordering_epochs)
    for dataset in args.datasets:
        data_dir = Path(args.data_root) / dataset if args.data_root else None
        data = load_dataset(dataset, data_dir).subset(args.n_train, args.n_test, seed=0)
        chance = float(torch.bincount(data.y_test).max()) / len(data.y_test)
        for arch in args.archs:
            trained: dict[int, torch.nn.Module] = {}
            # Mode, then seed, then tol: a run cut short by --deadline has whole seeds of PaT.
            for mode in args.modes:
                for seed in args.seeds:
                    init = build_model(arch, data.input_shape, data.num_classes, seed=seed,
                                       **ARCHS[arch])
                    if mode == "after-training" and seed not in trained:
                        trained[seed] = build_model(arch, data.input_shape, data.num_classes,
                                                    seed=seed, **ARCHS[arch])
                        start = time.perf_counter()
                        mipp.train(trained[seed], data, TrainConfig(epochs=args.dense_epochs),
                                   device=args.device, seed=seed)
                        print(f"[{dataset} {arch} seed {seed}] dense trained in "
                              f"{time.perf_counter() - start:.0f}s", flush=True)
                    model = trained[seed].cpu() if mode == "after-training" else init
                    retrain = TrainConfig(epochs=args.retrain_epochs if mode == "after-training"
                                          else args.dense_epochs)
                    common = dict(mode=mode, seed=seed, retrain=retrain, device=args.device,
                                  calibration_samples=args.calibration)
                    for tol in args.tols:
                        if time.monotonic() > deadline:
                            print("deadline reached; stopping", flush=True)
                            return
                        base = {"dataset": dataset, "arch": arch, "mode": mode, "seed": seed,
                                "tol": tol, "n_train": args.n_train,
                                "calibration": args.calibration, "retrain_epochs": retrain.epochs}
                        key = (dataset, arch, mode, seed, float(tol), "mipp", "mipp")
                        if key in log.done:
                            done = log.done[key]
                            counts, fraction = json.loads(done["counts"]), float(done["removed_fraction"])
                        else:
                            start = time.perf_counter()
                            config = PruneConfig(method="mipp", tol=tol, repeats=args.repeats,
                                                 reconstructor=recon, refit=True, **common)
                            result = mipp.prune(model, data, config)
                            row = _row(base, result, "mipp", "mipp", True, chance,
                                       time.perf_counter() - start)
                            log.write(row)
                            counts = json.loads(row["counts"])
                            fraction = row["removed_fraction"]
                            _say(row)
                        target = min(max(fraction, 0.001), 0.999)
                        protocols = ["counts"] + (["global"] if args.global_table else [])
                        for protocol in protocols:
                            for method in BASELINES[mode]:
                                if (dataset, arch, mode, seed, float(tol), protocol, method) in log.done:
                                    continue
                                start = time.perf_counter()
                                config = PruneConfig(method=method, target=target,
                                                     refit=method in REFIT, **common)
                                result = mipp.prune(model, data, config,
                                                    counts=counts if protocol == "counts" else None)
                                row = _row(base, result, method, protocol, method in REFIT,
                                           chance, time.perf_counter() - start)
                                log.write(row)
                                _say(row)


def _say(row: dict) -> None:
    print(f"[{row['dataset']} {row['arch']} {row['mode']} s{row['seed']} tol={row['tol']}] "
          f"{row['protocol']:6s} {row['method']:8s} removed {row['removed_fraction']:.3f} "
          f"acc pruned {row['acc_pruned_no_refit']:.3f}/{row['acc_pruned']:.3f} "
          f"retrained {row['acc_retrained']:.3f} sel {row['selection_s']:.1f}s "
          f"total {row['total_s']:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _pct(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def _cells(rows: list[dict]):
    """{(dataset, arch, mode): {tol: {method_or_variant: [rows]}}} per protocol."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        out[(r["dataset"], r["arch"], r["mode"])][float(r["tol"])][(r["protocol"], r["method"])].append(r)
    return out


def _methods(mode: str) -> list[str]:
    return ["mipp"] + BASELINES[mode]


def report(rows: list[dict], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = _cells(rows)
    lines = ["# Accuracy vs units removed: results", "",
             f"{len(rows)} runs. Accuracy in % on the test subset, mean ± std over seeds "
             "(n = seeds per cell). 'retrained' after the same retraining budget; "
             "'pruned' right after pruning (MIPP/ThiNet: after their least-squares refit; "
             "'no refit' before it).", ""]
    for (dataset, arch, mode), by_tol in sorted(cells.items()):
        methods = _methods(mode)
        for protocol, title in (("counts", "baselines at MIPP's per-layer counts"),
                                ("global", "baselines at MIPP's global fraction, own per-layer choice")):
            if not any((protocol, m) in c for c in by_tol.values() for m in methods[1:]):
                continue
            lines += [f"## {dataset} / {arch} / {mode}: {title}", "",
                      "| tol | removed % | n | " + " | ".join(
                          f"{m} retrained" for m in methods) + " | " + " | ".join(
                          f"{m} pruned" for m in methods) + " | mipp pruned, no refit |",
                      "|" + "---|" * (3 + 2 * len(methods) + 1)]
            for tol, cell in sorted(by_tol.items()):
                mipp_rows = cell.get(("mipp", "mipp"), [])
                if not mipp_rows:
                    continue
                get = lambda m: mipp_rows if m == "mipp" else cell.get((protocol, m), [])  # noqa: E731
                retrained = [(_pct([float(r["acc_retrained"]) for r in get(m)]) if get(m) else "–")
                             for m in methods]
                pruned = [(_pct([float(r["acc_pruned"]) for r in get(m)]) if get(m) else "–")
                          for m in methods]
                lines.append(f"| {tol:g} | {_pct([float(r['removed_fraction']) for r in mipp_rows])} "
                             f"| {len(mipp_rows)} | " + " | ".join(retrained) + " | "
                             + " | ".join(pruned) + " | "
                             + _pct([float(r["acc_pruned_no_refit"]) for r in mipp_rows]) + " |")
            lines.append("")
            _plot(dataset, arch, mode, protocol, by_tol, methods, out_dir)
    lines += _verdicts(cells) + _collapse_table(rows) + _seconds_table(rows)
    text = "\n".join(lines) + "\n"
    (out_dir / "accuracy_vs_sparsity.md").write_text(text)
    return text


def _verdicts(cells) -> list[str]:
    """MIPP minus the best baseline (retrained), counts protocol; win/lose if the gap exceeds
    the combined seed std, else tie."""
    lines = ["## MIPP vs the best baseline at the same per-layer counts (retrained)", "",
             "| dataset | arch | mode | tol | removed % | MIPP | best baseline | gap (points) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, arch, mode), by_tol in sorted(cells.items()):
        for tol, cell in sorted(by_tol.items()):
            mipp_rows = cell.get(("mipp", "mipp"), [])
            base = {m: cell[("counts", m)] for m in BASELINES[mode] if ("counts", m) in cell}
            if not mipp_rows or not base:
                continue
            m_mean, m_std = _stats([float(r["acc_retrained"]) for r in mipp_rows])
            best = max(base, key=lambda m: _stats([float(r["acc_retrained"]) for r in base[m]])[0])
            b_mean, b_std = _stats([float(r["acc_retrained"]) for r in base[best]])
            gap = 100 * (m_mean - b_mean)
            spread = 100 * math.sqrt(m_std ** 2 + b_std ** 2)
            if min(len(mipp_rows), len(base[best])) < 2:
                verdict = "1 seed: no verdict"
            else:
                verdict = "tie" if abs(gap) <= spread else ("win" if gap > 0 else "lose")
            fraction = _pct([float(r["removed_fraction"]) for r in mipp_rows])
            lines.append(f"| {dataset} | {arch} | {mode} | {tol:g} | {fraction} | "
                         f"{100 * m_mean:.1f} | {best} {100 * b_mean:.1f} | {gap:+.1f} ± {spread:.1f} "
                         f"| {verdict} |")
    return lines + [""]


def _collapse_table(rows: list[dict]) -> list[str]:
    counts: dict = defaultdict(lambda: [0, 0])
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "mipp", m))
    for r in rows:
        b = min(19, int(float(r["removed_fraction"]) * 20))
        counts[(b, r["method"])][0] += r["collapsed"] == "True"
        counts[(b, r["method"])][1] += 1
    bins = sorted({b for b, _ in counts})
    lines = ["## Collapse rate per 5% bin of units removed (collapsed / runs, all tables)", "",
             "Collapsed: retrained accuracy within 2 points of chance.", "",
             "| removed % | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in bins:
        lines.append(f"| {5 * b}-{5 * b + 5} | " + " | ".join(
            f"{counts[(b, m)][0]}/{counts[(b, m)][1]}" if counts[(b, m)][1] else "–"
            for m in methods) + " |")
    return lines + [""]


def _seconds_table(rows: list[dict]) -> list[str]:
    by: dict = defaultdict(list)
    for r in rows:
        by[(r["dataset"], r["arch"], r["mode"], r["method"], r["device"])].append(float(r["selection_s"]))
    lines = ["## Selection seconds per run (mean ± std)", "",
             "| dataset | arch | mode | method | device | seconds | runs |", "|---|---|---|---|---|---|---|"]
    for (dataset, arch, mode, method, device), values in sorted(by.items()):
        mean, std = _stats(values)
        lines.append(f"| {dataset} | {arch} | {mode} | {method} | {device} | {mean:.1f} ± {std:.1f} | {len(values)} |")
    return lines + [""]


def _plot(dataset, arch, mode, protocol, by_tol, methods, out_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the tables are the record
        print("matplotlib is not installed; skipping plots", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    variants = [(m, "acc_pruned", m) for m in methods]
    if mode == "after-training":
        variants.append(("mipp", "acc_pruned_no_refit", "mipp (no refit)"))
    for ax, (field, title) in zip(axes, (("acc_pruned", "right after pruning"),
                                         ("acc_retrained", "after retraining"))):
        for method, _, label in (variants if field == "acc_pruned" else [(m, None, m) for m in methods]):
            use = field if label != "mipp (no refit)" else "acc_pruned_no_refit"
            xs, ys, es, xe = [], [], [], []
            for tol, cell in sorted(by_tol.items()):
                rows = cell.get(("mipp", "mipp")) if method == "mipp" else cell.get((protocol, method))
                if not rows:
                    continue
                x_mean, x_std = _stats([float(r["removed_fraction"]) for r in rows])
                y_mean, y_std = _stats([float(r[use]) for r in rows])
                xs.append(100 * x_mean); xe.append(100 * x_std)
                ys.append(100 * y_mean); es.append(100 * y_std)
            if xs:
                style = dict(lw=2.5, color="black") if method == "mipp" and "no refit" not in label else {}
                if "no refit" in label:
                    style = dict(ls="--", color="gray")
                ax.errorbar(xs, ys, yerr=es, xerr=xe, marker="o", capsize=3, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("units removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.legend(fontsize=8)
    how = "at MIPP's per-layer counts" if protocol == "counts" else "at MIPP's global fraction"
    fig.suptitle(f"{arch} / {dataset} / {mode}: baselines {how}")
    fig.tight_layout()
    fig.savefig(out_dir / f"avs_{dataset}_{arch}_{mode}_{protocol}.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the quick preset (default)")
    preset.add_argument("--full", action="store_true", help="the full preset")
    preset.add_argument("--report", nargs="+", type=Path, metavar="CSV",
                        help="only write tables and plots from these CSVs")
    parser.add_argument("--csv", type=Path, help="results file (default bench/results/avs-<preset>.csv)")
    parser.add_argument("--resume", nargs="+", type=Path,
                        help="earlier CSVs whose runs count as done (not copied into --csv)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report and plots")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None,
                        help="folder with <dataset>/ IDX files (default: the built-in locations)")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which no new run starts (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    for name, kind in (("datasets", str), ("archs", str), ("modes", str), ("seeds", int),
                       ("tols", float)):
        parser.add_argument(f"--{name}", nargs="+", type=kind, help=f"override the preset's {name}")
    for name in ("n_train", "n_test", "dense_epochs", "retrain_epochs", "calibration", "repeats",
                 "recon_epochs", "finetune_epochs", "ordering_epochs"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    parser.add_argument("--global-table", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.report:
        print(report(_read(args.report), args.out or args.report[0].parent))
        return
    name = "full" if args.full else "quick"
    for key, value in PRESETS[name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.csv = args.csv or RESULTS / f"avs-{name}.csv"
    print(f"preset {name}; machine: {platform.machine()} {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}; csv {args.csv}", flush=True)
    start = time.perf_counter()
    run(args)
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    print(report(_read([args.csv]), args.out or args.csv.parent))


if __name__ == "__main__":
    main()
