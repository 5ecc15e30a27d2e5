"""LeNet-5 on MNIST: MIPP at the default settings and at targets of 50/80/95% units removed,
and the selection time of the sequential reference path against the fast path, in one run.

    python bench/mnist_lenet.py                       # CPU or CUDA (auto), about 30 min on 2 cores
    python bench/mnist_lenet.py --quick               # smaller calibration set, a few minutes

Appends one JSON line per run (tagged with its start time) to bench/results/mnist_lenet[-quick].jsonl
as it goes, never truncating it, and prints a
markdown table at the end (also written next to the JSONL).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import mipp
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.data import load_dataset
from mipp.training import resolve_device
from mipp.zoo import build_model

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-targets", action="store_true",
                        help="only the default settings (fast and sequential paths)")
    args = parser.parse_args()

    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    stem = "mnist_lenet-quick" if args.quick else "mnist_lenet"
    stem += "-paths" if args.no_targets else ""
    if torch.cuda.is_available() and args.device != "cpu":
        stem += "-gpu"
    log = results / f"{stem}.jsonl"  # appended to, never truncated: every run stays on disk
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    data = load_dataset("mnist")
    device = resolve_device(args.device)
    model = build_model("lenet5", data.input_shape, data.num_classes, seed=args.seed)
    start = time.perf_counter()
    mipp.train(model, data, TrainConfig(epochs=3, lr=1e-3, batch_size=128), device=device,
               seed=args.seed)
    train_seconds = time.perf_counter() - start
    model = model.cpu()
    base = dict(seed=args.seed, device=str(device), retrain=TrainConfig(epochs=1))
    if args.quick:
        base.update(calibration_samples=2048, reconstructor=ReconstructorConfig(epochs=50))

    runs = [("default", {}), ("target 0.5", {"target": 0.5}), ("target 0.8", {"target": 0.8}),
            ("target 0.95", {"target": 0.95})]
    if args.no_targets:
        runs = runs[:1]
    if not args.skip_sequential:
        runs.insert(1, ("default, sequential path", {"path": "sequential"}))
    rows = []
    for label, settings in runs:
        config = PruneConfig(**{**base, **settings})
        result = mipp.prune(model, data, config)
        m = result.metrics
        tol = next(iter(result.details["selection"].values()), {}).get("tol")
        row = {"label": label, "settings": settings, "tol": tol,
               "layers": [(l["name"], l["units_before"], l["units_after"]) for l in result.layers],
               "removed_fraction": m["units"]["removed_fraction"], "accuracy": m["accuracy"],
               "params": m["params"], "macs": m["macs"], "seconds": m["seconds"],
               "train_seconds": train_seconds, "machine": machine(), "run": run_id}
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(label, json.dumps(row), flush=True)

    table = render(rows)
    (results / f"{stem}.md").write_text(table)
    print(table)


def render(rows: list[dict]) -> str:
    lines = [f"Machine: {rows[0]['machine']}; LeNet-5 trained 3 epochs "
             f"({rows[0]['train_seconds']:.0f} s), retrain 1 epoch.", "",
             "| run | tol | conv1 | conv2 | fc1 | fc2 | removed | acc dense | pruned (no refit) "
             "| pruned (refit) | retrained | params | MACs | selection s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        widths = " | ".join(f"{b}→{k}" for _, b, k in r["layers"])
        lines.append(
            f"| {r['label']} | {r['tol']:.3g} | {widths} | {r['removed_fraction']:.1%} "
            f"| {a['dense']:.4f} | {a['pruned_no_refit']:.4f} | {a['pruned']:.4f} "
            f"| {a['retrained']:.4f} | {r['params']['before']:,}→{r['params']['after']:,} "
            f"| {r['macs']['before']:,}→{r['macs']['after']:,} | {r['seconds']['selection']:.1f} |")
    by_label = {r["label"]: r for r in rows}
    if "default, sequential path" in by_label:
        seq = by_label["default, sequential path"]["seconds"]["selection"]
        fast = by_label["default"]["seconds"]["selection"]
        lines += ["", f"Selection time at the default settings: sequential {seq:.1f} s, "
                      f"fast {fast:.1f} s, speed-up {seq / fast:.1f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
