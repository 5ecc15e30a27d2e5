"""Ablation: how much of MIPP's lead over L1/random comes from the least-squares refit?

Baselines prune LeNet-5 / MNIST (after training) to per-layer counts that MIPP chose in an
earlier accuracy_vs_sparsity run (read from its CSV), each with and without the engine's
least-squares refit, then retrain with the same budget.

    python bench/refit_ablation.py --counts-from bench/results/gpu/avs-gpu.csv --tols 0.03 0.1 0.3

Appends one CSV row per run to bench/results/refit-ablation.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

import mipp
from mipp.config import PruneConfig, TrainConfig
from mipp.data import load_dataset
from mipp.zoo import build_model

RESULTS = Path(__file__).parent / "results"
FIELDS = ["dataset", "arch", "seed", "tol", "method", "refit", "removed_fraction",
          "acc_pruned_no_refit", "acc_pruned", "acc_retrained"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts-from", type=Path, required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--arch", default="lenet5")
    parser.add_argument("--table", action="store_true", help="only print the table of --csv")
    parser.add_argument("--tols", nargs="+", type=float, default=[0.03, 0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["l1", "random", "thinet"])
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None, help="folder with <dataset>/ IDX files")
    parser.add_argument("--csv", type=Path, default=RESULTS / "refit-ablation.csv")
    args = parser.parse_args()
    if args.table:
        print(table(args.csv))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    counts = {}
    with args.counts_from.open() as f:
        for r in csv.DictReader(f):
            if (r["method"], r["mode"], r["dataset"], r["arch"]) == ("mipp", "after-training",
                                                                     args.dataset, args.arch):
                counts[(int(r["seed"]), float(r["tol"]))] = json.loads(r["counts"])
    data_dir = Path(args.data_root) / args.dataset if args.data_root else None
    data = load_dataset(args.dataset, data_dir).subset(args.n_train, args.n_test, seed=0)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.is_file()
    with args.csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for seed in args.seeds:
            model = build_model(args.arch, data.input_shape, data.num_classes, seed=seed)
            mipp.train(model, data, TrainConfig(epochs=args.dense_epochs), device=args.device,
                       seed=seed)
            for tol in args.tols:
                if (seed, tol) not in counts:
                    continue
                for method in args.methods:
                    for refit in (False, True):
                        start = time.perf_counter()
                        config = PruneConfig(method=method, target=0.5, seed=seed, refit=refit,
                                             retrain=TrainConfig(epochs=1), device=args.device)
                        result = mipp.prune(model, data, config, counts=counts[(seed, tol)])
                        acc = result.metrics["accuracy"]
                        row = {"dataset": args.dataset, "arch": args.arch, "seed": seed,
                               "tol": tol, "method": method, "refit": refit,
                               "removed_fraction": round(result.metrics["units"]["removed_fraction"], 4),
                               "acc_pruned_no_refit": acc["pruned_no_refit"],
                               "acc_pruned": acc["pruned"], "acc_retrained": acc["retrained"]}
                        writer.writerow(row)
                        f.flush()
                        print(row, f"{time.perf_counter() - start:.0f}s", flush=True)
    print(table(args.csv))


def table(path: Path) -> str:
    cells = defaultdict(list)
    with path.open() as f:
        for r in csv.DictReader(f):
            cells[(r["dataset"], r["arch"], float(r["tol"]), r["method"], r["refit"])].append(r)

    def pct(values):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    lines = ["| data | model | tol | removed % | method | refit | n | pruned | retrained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, arch, tol, method, refit), rows in sorted(cells.items()):
        lines.append(f"| {dataset} | {arch} | {tol:g} | {pct([float(r['removed_fraction']) for r in rows])} | {method} "
                     f"| {refit} | {len(rows)} | {pct([float(r['acc_pruned']) for r in rows])} "
                     f"| {pct([float(r['acc_retrained']) for r in rows])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
