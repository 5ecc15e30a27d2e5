"""Architectures the zoo does not have, pruned by MIPP and by L1 at MIPP's per-layer counts.

The two uploaded-style architectures of the tests (tests/custom_archs): `rescat_cnn` (a residual
block, a plain 3x3 branch concatenated with a depthwise-separable one, a grouped convolution whose
partitions keep equal counts, global pooling) and `skipmlp` (an MLP with a skip connection). Each is built
from its source with `mipp.build_code_model`, as the worker builds an uploaded one, trained on
MNIST, then pruned by MIPP (its own per-layer counts) and by L1 keeping the same number of units
in every layer (`PruneConfig(method="l1", allocation="counts", counts=MIPP's kept counts)`),
with the same refit and retraining.

    python bench/custom_archs.py                  # 3 seeds, MNIST: 12.5 min on the shared 2-core box
    python bench/custom_archs.py --seeds 0 --n-train 2000 --dense-epochs 1 \
        --results-dir /tmp/smoke                  # a smoke run, kept out of bench/results
    python bench/custom_archs.py --table          # only regenerate the table from the log

Appends one JSON line per (architecture, seed, method) to bench/results/custom_archs.jsonl
(never truncated; each run tagged with its start time) and writes the markdown table generated
from that file to bench/results/custom_archs.md. `--table` reads the latest run of the log.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import mipp
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.custom import CodeSpec, build_code_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS_DIR = ROOT / "tests" / "custom_archs"
RESULTS = Path(__file__).parent / "results"
STEM = "custom_archs"


def arch_specs(data) -> dict[str, CodeSpec]:
    """The architectures, sized for 28x28 MNIST (or whatever shape `data` has): the CNN
    max-pools 4x after its stem (7x7 maps for MNIST)."""
    shape, classes = tuple(data.input_shape), data.num_classes
    flat = int(torch.tensor(shape).prod())
    return {
        "rescat_cnn": CodeSpec(factory="rescat_cnn:build",
                               kwargs={"in_channels": shape[0], "num_classes": classes,
                                       "width": 16, "pool": 4},
                               input_shape=shape, num_classes=classes),
        "skipmlp": CodeSpec(factory="skipmlp:build",
                            kwargs={"in_features": flat, "num_classes": classes, "hidden": 64},
                            input_shape=shape, num_classes=classes),
    }


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}")


def row_of(result, arch: str, seed: int, method: str, extra: dict) -> dict:
    m = result.metrics
    return {"arch": arch, "seed": seed, "method": method,
            "layers": [[l["name"], l["units_before"], l["units_after"]] for l in result.layers],
            "units": m["units"], "params": m["params"], "macs": m["macs"],
            "accuracy": m["accuracy"], "unprunable": [r["name"] for r in m["unprunable_layers"]],
            "seconds": m["seconds"], **extra}


def run(args) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    log = args.results_dir / f"{STEM}.jsonl"  # appended to, never truncated
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    torch.set_num_threads(args.threads)
    full = mipp.load_dataset(args.dataset)
    data = full.subset(n_train=args.n_train, seed=0) if args.n_train else full
    retrain = TrainConfig(epochs=args.retrain_epochs, lr=1e-3, batch_size=128)
    quick = dict(calibration_samples=args.calibration_samples, device="cpu", retrain=retrain,
                 repeats=args.repeats,
                 reconstructor=ReconstructorConfig(epochs=args.reconstructor_epochs,
                                                   finetune_epochs=5, ordering_epochs=5))
    settings = {"dataset": args.dataset, "n_train": int(data.x_train.shape[0]),
                "n_test": int(data.x_test.shape[0]), "dense_epochs": args.dense_epochs,
                "retrain_epochs": args.retrain_epochs, "tol": args.tol,
                "calibration_samples": args.calibration_samples, "repeats": args.repeats,
                "dense_lr": args.dense_lr, "threads": args.threads,
                "reconstructor_epochs": args.reconstructor_epochs}
    for arch, spec in arch_specs(data).items():
        if args.archs and arch not in args.archs:
            continue
        for seed in args.seeds:
            start = time.perf_counter()
            model = build_code_model(spec, ARCHS_DIR, seed=seed)
            mipp.train(model, data, TrainConfig(epochs=args.dense_epochs, lr=args.dense_lr,
                                                batch_size=128), device="cpu", seed=seed)
            extra = {"run": run_id, "machine": machine(), "settings": settings,
                     "train_seconds": round(time.perf_counter() - start, 1)}
            ours = mipp.prune(model, data, PruneConfig(method="mipp", tol=args.tol, seed=seed,
                                                       **quick))
            counts = {l["name"]: l["units_after"] for l in ours.layers}
            # L1 keeps exactly MIPP's number of units in every layer (allocation "counts").
            l1 = mipp.prune(model, data, PruneConfig(method="l1", seed=seed,
                                                     allocation="counts", counts=counts,
                                                     **quick))
            rows = [row_of(ours, arch, seed, "mipp", extra), row_of(l1, arch, seed, "l1", extra)]
            assert rows[0]["layers"] == rows[1]["layers"], "L1 must keep MIPP's counts"
            with log.open("a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            for row in rows:
                a = row["accuracy"]
                print(f"{arch} seed {seed} {row['method']}: units {row['units']['before']}->"
                      f"{row['units']['after']}, acc {a['dense']:.4f} -> removal "
                      f"{a['pruned_no_refit']:.4f}, refit {a['pruned']:.4f}, retrained "
                      f"{a['retrained']:.4f} ({sum(row['seconds'].values()):.0f} s)", flush=True)
    write_table(args.results_dir)


def latest_run(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} holds no rows; run the benchmark first")
    last = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == last]


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(rows: list[dict]) -> str:
    """Two markdown tables: per architecture and method, means ± sd over seeds; then per seed
    (both methods keep the same units per layer), with MIPP − L1 after retraining."""
    s = rows[0]["settings"]
    seeds = sorted({r["seed"] for r in rows})
    archs = sorted({r["arch"] for r in rows}, key=[r["arch"] for r in rows].index)
    lines = [
        f"Run {rows[0]['run']} on {rows[0]['machine']}. {s['dataset']}: {s['n_train']:,} "
        f"training and {s['n_test']:,} test samples; dense models trained {s['dense_epochs']} "
        f"epochs (Adam {s['dense_lr']:g}); MIPP tol {s['tol']:g}, {s['calibration_samples']} "
        f"calibration samples, {s['repeats']} repeats, reconstructor "
        f"{s['reconstructor_epochs']} epochs; L1 at MIPP's per-layer "
        f"counts; both refit and retrain {s['retrain_epochs']} epoch(s). "
        f"Seeds {', '.join(map(str, seeds))} ({len(seeds)}); accuracy mean ± sd over seeds.",
        "",
        "| arch | method | units | params | MACs | acc dense | after removal | after refit "
        "| after retraining |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in archs:
        for method in ("mipp", "l1"):
            group = [r for r in rows if r["arch"] == arch and r["method"] == method]
            if not group:
                continue

            def mean_int(key: str, when: str) -> int:
                return round(statistics.mean(r[key][when] for r in group))
            acc = {k: _mean_sd([r["accuracy"][k] for r in group])
                   for k in ("dense", "pruned_no_refit", "pruned", "retrained")}
            lines.append(
                f"| {arch} | {method} "
                f"| {mean_int('units', 'before')}→{mean_int('units', 'after')} "
                f"| {mean_int('params', 'before'):,}→{mean_int('params', 'after'):,} "
                f"| {mean_int('macs', 'before'):,}→{mean_int('macs', 'after'):,} "
                f"| {acc['dense']} | {acc['pruned_no_refit']} | {acc['pruned']} "
                f"| {acc['retrained']} |")
    lines += ["", "Per seed (MIPP's per-layer counts, which L1 keeps too; accuracy after removal "
                  "/ after refit / after retraining):", "",
              "| arch | seed | units per layer | params | MACs | acc dense | MIPP | L1 "
              "| MIPP − L1 retrained |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        for seed in seeds:
            by = {r["method"]: r for r in rows if r["arch"] == arch and r["seed"] == seed}
            if {"mipp", "l1"} - set(by):
                continue
            ours, l1 = by["mipp"], by["l1"]
            per_layer = ", ".join(f"{n} {b}→{k}" for n, b, k in ours["layers"])

            def accs(r: dict) -> str:
                a = r["accuracy"]
                return f"{a['pruned_no_refit']:.4f} / {a['pruned']:.4f} / {a['retrained']:.4f}"
            lines.append(
                f"| {arch} | {seed} | {per_layer} "
                f"| {ours['params']['before']:,}→{ours['params']['after']:,} "
                f"| {ours['macs']['before']:,}→{ours['macs']['after']:,} "
                f"| {ours['accuracy']['dense']:.4f} | {accs(ours)} | {accs(l1)} "
                f"| {ours['accuracy']['retrained'] - l1['accuracy']['retrained']:+.4f} |")
    left_alone = sorted({(r["arch"], n) for r in rows for n in r["unprunable"]})
    if left_alone:
        lines += ["", "Left alone (reported by the engine as not prunable): " + ", ".join(
            f"{a}.{n}" for a, n in left_alone) + "."]
    return "\n".join(lines) + "\n"


def write_table(results_dir: Path) -> str:
    table = render(latest_run(results_dir / f"{STEM}.jsonl"))
    (results_dir / f"{STEM}.md").write_text(table)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true",
                        help="only write the table of the log's latest run")
    parser.add_argument("--dataset", default="mnist", help="a built-in (default mnist)")
    parser.add_argument("--n-train", type=int, default=10_000,
                        help="training samples drawn from the set (0: all); the test set is whole")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", choices=["rescat_cnn", "skipmlp"])
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--calibration-samples", type=int, default=2048)
    parser.add_argument("--reconstructor-epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="TERC repeats (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the box is shared)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where the log and the table go (default bench/results)")
    args = parser.parse_args()
    if args.table:
        write_table(args.results_dir)
    else:
        run(args)


if __name__ == "__main__":
    main()
