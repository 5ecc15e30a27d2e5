"""Converged dense models on full training sets, one per (dataset, arch, seed) (issue 10).

Every pruning method of bench/paper_protocol.py prunes the same checkpoint, so the dense models
are trained once here and kept:

    bench/results/dense/<dataset>_<arch>_seed<k>/   a model directory (mipp.load_model_dir):
        model.json, weights.safetensors             written after every epoch
        resume.pt                                    optimizer state while a run is unfinished
        metrics.json                                 written once the last epoch is done
    bench/results/dense/train-log.jsonl             one line per epoch (appended, never emptied)

    python bench/dense_models.py --plan cpu                      # MNIST LeNet-5/MLP, F-MNIST LeNet-5
    python bench/dense_models.py --dataset fashion-mnist --arch vgg11 --seeds 0 1 2 3 4
    python bench/dense_models.py --dataset fashion-mnist --arch resnet20 --seeds 0 --stop-after 1
    python bench/dense_models.py --table                         # markdown table from the JSONL

A stopped run picks up at the epoch after the last one on disk (weights, optimizer state, step
of the learning-rate schedule); the shuffling of epoch e is drawn from (seed, e), so a resumed run
sees the same batches as an uninterrupted one. A finished model (metrics.json) is skipped.

The recipes are augmentation-free and cheap; the targets are issue 10's (MNIST LeNet-5 >= 99.0%,
MLP 784-300-100 >= 98.0%, Fashion-MNIST LeNet-5 >= 89%, VGG-11 and ResNet-20 >= 92%).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mipp.artifacts import load_model_dir, save_dense_dir  # noqa: E402
from mipp.config import TrainConfig  # noqa: E402
from mipp.data import load_dataset  # noqa: E402
from mipp.training import _lr_factor, _optimizer, evaluate, resolve_device  # noqa: E402
from mipp.zoo import build_model, load_weights  # noqa: E402

DENSE = Path(__file__).parent / "results" / "dense"
LOG = DENSE / "train-log.jsonl"
# (dataset, arch) -> (target accuracy, recipe). Adam with a cosine decay converges the small
# nets in 10-15 epochs; the BN networks take SGD + momentum + weight decay, the usual recipe.
RECIPES: dict[tuple[str, str], tuple[float, TrainConfig]] = {
    ("mnist", "lenet5"): (0.990, TrainConfig(epochs=10, optimizer="adam", lr=1e-3)),
    ("mnist", "mlp"): (0.980, TrainConfig(epochs=10, optimizer="adam", lr=1e-3)),
    ("fashion-mnist", "lenet5"): (0.89, TrainConfig(epochs=15, optimizer="adam", lr=1e-3)),
    ("fashion-mnist", "vgg11"): (0.92, TrainConfig(epochs=30, optimizer="sgd", lr=0.05,
                                                   momentum=0.9, weight_decay=5e-4)),
    ("fashion-mnist", "resnet20"): (0.92, TrainConfig(epochs=30, optimizer="sgd", lr=0.1,
                                                      momentum=0.9, weight_decay=5e-4)),
}
ARCH_CONFIG = {"mlp": {"widths": (300, 100)}}  # 784-300-100-10
PLANS = {
    # What the 2-core CPU can do: the small nets, five seeds each.
    "cpu": [("mnist", "lenet5", range(5)), ("mnist", "mlp", range(5)),
            ("fashion-mnist", "lenet5", range(5))],
    # The long ones, for a GPU or a long background run.
    "cnn": [("fashion-mnist", "vgg11", range(5)), ("fashion-mnist", "resnet20", range(5))],
}


def run_dir(dataset: str, arch: str, seed: int) -> Path:
    return DENSE / f"{dataset}_{arch}_seed{seed}"


def is_done(dataset: str, arch: str, seed: int) -> bool:
    return (run_dir(dataset, arch, seed) / "metrics.json").is_file()


def load_dense(dataset: str, arch: str, seed: int) -> torch.nn.Module:
    """The finished dense model; raises FileNotFoundError naming the command that makes it."""
    if not is_done(dataset, arch, seed):
        raise FileNotFoundError(
            f"no converged {dataset} {arch} seed {seed} in {run_dir(dataset, arch, seed)}; run "
            f"python bench/dense_models.py --dataset {dataset} --arch {arch} --seeds {seed}")
    return load_model_dir(run_dir(dataset, arch, seed))


def _log(record: dict) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_one(dataset: str, arch: str, seed: int, data, device: torch.device,
              stop_after: int | None = None) -> dict | None:
    """Train (or resume) one dense model; returns its metrics once finished, else None."""
    target, config = RECIPES[(dataset, arch)]
    out = run_dir(dataset, arch, seed)
    if is_done(dataset, arch, seed):
        print(f"[{dataset} {arch} seed {seed}] already done", flush=True)
        return json.loads((out / "metrics.json").read_text())
    model = build_model(arch, data.input_shape, data.num_classes, seed=seed,
                        **ARCH_CONFIG.get(arch, {}))
    optimizer = _optimizer(model, config)  # built on the CPU params; moved with the model
    start_epoch, seconds = 0, 0.0
    state_path = out / "resume.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        load_weights(model, out / "weights.safetensors", "safetensors")
        optimizer = _optimizer(model, config)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        print(f"[{dataset} {arch} seed {seed}] resuming after epoch {start_epoch}", flush=True)
    model.to(device)
    for group_state in optimizer.state.values():  # Adam/SGD buffers follow the parameters
        for k, v in group_state.items():
            if torch.is_tensor(v) and k != "step":
                group_state[k] = v.to(device)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    done_now = 0
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        running = 0.0
        step = epoch * steps_per_epoch
        for start in range(0, n, config.batch_size):
            for group in optimizer.param_groups:  # the engine's schedule, by global step
                group["lr"] = config.lr * _lr_factor(config, step, total)
            idx = order[start:start + config.batch_size].to(data.x_train.device)
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(idx)
            step += 1
        scores = evaluate(model, data.x_test, data.y_test, device=device)
        epoch_s = time.perf_counter() - began
        seconds += epoch_s
        record = {"dataset": dataset, "arch": arch, "seed": seed, "epoch": epoch + 1,
                  "epochs": config.epochs, "train_loss": round(running / n, 5),
                  "test_accuracy": scores["accuracy"], "test_loss": round(scores["loss"], 5),
                  "epoch_s": round(epoch_s, 2), "device": str(device),
                  "threads": torch.get_num_threads(), "host": platform.node(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _log(record)
        print(f"[{dataset} {arch} seed {seed}] epoch {epoch + 1}/{config.epochs} "
              f"loss {running / n:.4f} test {scores['accuracy']:.4f} ({epoch_s:.0f}s)", flush=True)
        # Weights then optimizer state: a kill between the two re-runs this epoch at worst.
        save_dense_dir(model.cpu(), out, None, data=data)
        torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch + 1, "seconds": seconds},
                   state_path)
        model.to(device)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and epoch + 1 < config.epochs:
            print(f"[{dataset} {arch} seed {seed}] stopping after {done_now} epoch(s) as asked; "
                  "rerun to resume", flush=True)
            return None
    metrics = {"dataset": dataset, "arch": arch, "seed": seed, "accuracy": scores["accuracy"],
               "loss": scores["loss"], "target": target, "reached": scores["accuracy"] >= target,
               "epochs": config.epochs, "train_seconds": round(seconds, 1),
               "recipe": config.model_dump(), "device": str(device)}
    save_dense_dir(model.cpu(), out, metrics, data=data)
    state_path.unlink(missing_ok=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# Table


def read_log(path: Path = LOG) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(path: Path = LOG) -> str:
    """Markdown: per (dataset, arch), the finished seeds' final test accuracy (mean ± sd over
    seeds), epochs and training seconds (sum of the epochs' wall clock), from the JSONL only."""
    final: dict[tuple, dict] = {}
    seconds: dict[tuple, float] = {}
    for r in read_log(path):
        key = (r["dataset"], r["arch"], r["seed"])
        # A re-run epoch (killed between the weights and the state) overwrites its first run.
        seconds.setdefault(key, {})[r["epoch"]] = r["epoch_s"]  # type: ignore[index]
        if r["epoch"] == r["epochs"]:
            final[key] = r
    groups: dict[tuple, list[dict]] = {}
    for (dataset, arch, _), r in sorted(final.items()):
        groups.setdefault((dataset, arch), []).append(r)
    lines = ["| dataset | arch | target | seeds | test accuracy (mean ± sd) | min | epochs "
             "| train s per model (mean) | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (dataset, arch), rows in groups.items():
        accs = [100 * r["test_accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = [sum(seconds[(dataset, arch, r["seed"])].values()) for r in rows]  # type: ignore[union-attr]
        target = RECIPES.get((dataset, arch), (float("nan"),))[0]
        lines.append(f"| {dataset} | {arch} | {100 * target:.0f}% | {len(rows)} "
                     f"| {statistics.mean(accs):.2f}{f' ± {sd:.2f}' if len(accs) > 1 else ''} "
                     f"| {min(accs):.2f} "
                     f"| {rows[0]['epochs']} | {statistics.mean(secs):.0f} "
                     f"| {', '.join(sorted({r['device'] for r in rows}))} |")
    unfinished = sorted({(r["dataset"], r["arch"], r["seed"]) for r in read_log(path)} - set(final))
    if unfinished:
        lines.append("")
        lines.append("Unfinished (resumable): " + ", ".join(
            f"{d} {a} seed {s} ({max(seconds[(d, a, s)])} epochs)" for d, a, s in unfinished))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), help="a list of (dataset, arch, seeds)")
    parser.add_argument("--dataset", choices=sorted({d for d, _ in RECIPES}))
    parser.add_argument("--arch", choices=sorted({a for _, a in RECIPES}))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--stop-after", type=int,
                        help="stop each model after this many epochs in this run (resumable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: the CPU is shared)")
    parser.add_argument("--table", action="store_true", help="print the markdown table and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.plan:
        jobs = PLANS[args.plan]
    elif args.dataset and args.arch:
        if (args.dataset, args.arch) not in RECIPES:
            parser.error(f"no recipe for {args.dataset} {args.arch}; have {sorted(RECIPES)}")
        jobs = [(args.dataset, args.arch, args.seeds)]
    else:
        parser.error("give --plan, or --dataset and --arch (or --table)")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded: dict[str, object] = {}
    for dataset, arch, seeds in jobs:
        if dataset not in loaded:
            loaded[dataset] = load_dataset(dataset).to(device)
        for seed in seeds:
            metrics = train_one(dataset, arch, seed, loaded[dataset], device, args.stop_after)
            if metrics is not None:
                flag = "" if metrics["reached"] else f"  BELOW TARGET {metrics['target']:.3f}"
                print(f"[{dataset} {arch} seed {seed}] done: {metrics['accuracy']:.4f}{flag}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
