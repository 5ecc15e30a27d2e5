"""The `mipp` command: train, prune and evaluate zoo models; service commands come as plugins.

    mipp train --arch lenet5 --dataset mnist --epochs 3 --out runs/lenet5
    mipp prune runs/lenet5 --dataset mnist --tol 0.1 --retrain-epochs 1 --out runs/lenet5-mipp
    mipp evaluate runs/lenet5-mipp --dataset mnist      # a directory or a model.tar.gz
    mipp pack --code mynet.py --factory mynet:build --weights w.safetensors \
        --dataset data.npz --out runs/mynet             # your own architecture
    mipp prune runs/mynet --trust-code --dataset data.npz --tol 0.1 --out runs/mynet-mipp

The service's client commands (`login`, `models`, `datasets`, `jobs`, `sweeps`; mipp.client)
are torch-free. Subcommands outside the engine (`serve`, `admin`) register through the
entry-point group `mipp.commands`: each entry is a function `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from tqdm import tqdm

from mipp.errors import MippError


class ProgressBar:
    """A `ProgressCallback` that draws one tqdm bar per phase on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.phase: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, phase: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=1000, desc=f"{phase:>10}", unit="‰", leave=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar:30}| {elapsed} {postfix}")
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"widths\": [300, 100]}'")
    return value


def _preprocessing(text: str):
    from mipp.data import parse_preprocessing
    from mipp.errors import DataError
    try:
        return parse_preprocessing(json.loads(text) if text.strip().startswith("{") else text,
                                   "--preprocessing")
    except (json.JSONDecodeError, DataError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _train_config(args, epochs_attr: str = "epochs"):
    from mipp.config import TrainConfig
    return TrainConfig(epochs=getattr(args, epochs_attr), batch_size=args.batch_size,
                       optimizer=args.optimizer, lr=args.lr)


def _add_train_options(parser: argparse.ArgumentParser, epochs: int, flag: str = "--epochs") -> None:
    parser.add_argument(flag, type=int, default=epochs, dest=flag.lstrip("-").replace("-", "_"),
                        help=f"epochs of training (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)


def _load_data(args, model=None):
    """The --dataset, prepared as --preprocessing says; for a .npz without it, as the model
    was trained (its recorded preprocessing), else `none`."""
    from mipp.data import as_dataset
    from mipp.errors import DataError
    preprocessing = getattr(args, "preprocessing", None)
    if str(args.dataset).lower().endswith(".npz"):
        if preprocessing is None and model is not None:
            preprocessing = getattr(model, "preprocessing", None)
        data = as_dataset(args.dataset, preprocessing=preprocessing or "none")
    elif preprocessing is not None:
        raise DataError("--preprocessing applies to .npz datasets; built-in datasets are "
                        "always standardised with their training statistics")
    else:
        data = as_dataset(args.dataset)
    if getattr(args, "limit_train", None) or getattr(args, "limit_test", None):
        data = data.subset(n_train=args.limit_train, n_test=args.limit_test, seed=0)
    return data


def cmd_train(args) -> int:
    from mipp.artifacts import save_dense_dir
    from mipp.training import evaluate, train
    from mipp.zoo import build_model

    data = _load_data(args)
    model = build_model(args.arch, data.input_shape, data.num_classes, seed=args.seed,
                        **args.config)
    bar = ProgressBar(not args.quiet)
    history = train(model, data, _train_config(args), device=args.device, seed=args.seed,
                    progress=bar)
    bar.close()
    scores = evaluate(model, data.x_test, data.y_test, device=args.device)
    save_dense_dir(model.cpu(), args.out, {"accuracy": scores["accuracy"], "loss": scores["loss"],
                                           "history": history}, data=data)
    print(f"{args.arch} on {args.dataset}: test accuracy {scores['accuracy']:.4f} -> {args.out}")
    return 0


def cmd_prune(args) -> int:
    from mipp.artifacts import load_model_dir
    from mipp.config import PruneConfig
    from mipp.pipeline import prune

    overrides = dict(args.set)
    fields = {"method": args.method, "allocation": args.allocation, "mode": args.mode,
              "confidence": args.confidence,
              "tol": args.tol, "target": args.target, "path": args.path, "refit": not args.no_refit,
              "repeats": args.repeats, "calibration_samples": args.calibration_samples,
              "seed": args.seed, "device": args.device,
              "retrain": _train_config(args, "retrain_epochs")}
    config = PruneConfig(**{k: v for k, v in fields.items() if v is not None}, **overrides)
    model = load_model_dir(args.model_dir, trust_code=args.trust_code)
    data = _load_data(args, model)
    bar = ProgressBar(not args.quiet)
    result = prune(model, data, config, spec=model.zoo_spec, progress=bar)
    bar.close()
    result.save(args.out)
    print(format_report(result.layers, result.metrics))
    print(f"saved to {args.out}")
    return 0


def format_report(layers: list[dict], metrics: dict) -> str:
    """The per-layer table and the headline figures that `mipp prune` ends with."""
    rows = [f"{'layer':<24} {'units':>14} {'kept':>7}"]
    for layer in layers:
        before, after = layer["units_before"], layer["units_after"]
        rounding = layer.get("partition_rounding")
        rows.append(f"{layer['name']:<24} {before:>6} -> {after:<5} {after / before:>7.1%}" + (
            f"  (method chose {rounding['chosen']}; rounded up for {rounding['partitions']} "
            "grouped-conv partitions)" if rounding else ""))
    acc, units = metrics["accuracy"], metrics["units"]

    def pct(value):
        return "   n/a" if value is None else f"{value:.4f}"
    rows += [
        "",
        f"units removed   {units['before'] - units['after']}/{units['before']} "
        f"({units['removed_fraction']:.1%})",
        f"params          {metrics['params']['before']:,} -> {metrics['params']['after']:,}",
        f"MACs            {metrics['macs']['before']:,} -> {metrics['macs']['after']:,}",
        f"accuracy        dense {pct(acc['dense'])} | pruned {pct(acc['pruned_no_refit'])} "
        f"| refit {pct(acc['pruned'])} | retrained {pct(acc['retrained'])}",
        "seconds         " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["seconds"].items()),
    ]
    rows += [f"left alone      {row['name']} ({row['type']}): {row['reason']}"
             for row in metrics.get("unprunable_layers", [])]
    return "\n".join(rows)


def cmd_evaluate(args) -> int:
    from mipp.artifacts import load_model_dir
    from mipp.groups import count_params
    from mipp.training import evaluate

    model = load_model_dir(args.model_dir, trust_code=args.trust_code)
    data = _load_data(args, model)
    scores = evaluate(model, data.x_test, data.y_test, device=args.device)
    print(json.dumps({"accuracy": scores["accuracy"], "loss": scores["loss"],
                      "params": count_params(model), "test_samples": len(data.x_test)}, indent=2))
    return 0


def cmd_pack(args) -> int:
    from mipp.artifacts import save_dense_dir
    from mipp.custom import CodeSpec, build_code_model, copy_code
    from mipp.training import evaluate
    from mipp.zoo import load_weights

    data = _load_data(args)
    spec = CodeSpec(factory=args.factory, kwargs=args.kwargs, input_shape=data.input_shape,
                    num_classes=data.num_classes)
    from pathlib import Path
    out = Path(args.out)
    code_dir = copy_code(args.code, out / "code")
    model = build_code_model(spec, code_dir)
    load_weights(model, args.weights, args.format)
    scores = evaluate(model, data.x_test, data.y_test, device=args.device)
    save_dense_dir(model, out, {"accuracy": scores["accuracy"], "loss": scores["loss"]},
                   data=data)
    print(f"{spec.factory} on {args.dataset}: test accuracy {scores['accuracy']:.4f} -> {out}")
    return 0


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("use KEY=VALUE, e.g. repeats=3 or reconstructor={\"epochs\": 50}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", required=True,
                        help="built-in name (digits, mnist, fashion-mnist, cifar10, cifar100), "
                             "NAME:DATA_DIR, or a .npz file with x, y[, x_test, y_test]")
    common.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--limit-train", type=int, help="use a random subset of training samples")
    common.add_argument("--limit-test", type=int, help="use a random subset of test samples")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--preprocessing", type=_preprocessing, default=None,
                        help="for a .npz: none (values as stored), standardize, or JSON "
                             "'{\"mean\": [...], \"std\": [...], \"scale\": 255}'; default: "
                             "what the model was trained with, else none")
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-code", action="store_true",
                       help="allow loading a model directory that holds Python source (a code "
                            "model): its code runs in this process")

    p = sub.add_parser("train", parents=[common], help="train a zoo model, write a model directory")
    p.add_argument("--arch", required=True, help="zoo architecture, e.g. mlp, lenet5, resnet20")
    p.add_argument("--config", type=_json_object, default={},
                   help="architecture options as JSON, e.g. '{\"widths\": [300, 100]}'")
    _add_train_options(p, epochs=3)
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pack", parents=[common],
                       help="your own architecture (Python source + weights) as a model directory")
    p.add_argument("--code", required=True, help="a .py file, a .zip of a package, or a folder")
    p.add_argument("--factory", required=True, help="module:function returning the nn.Module")
    p.add_argument("--kwargs", type=_json_object, default={},
                   help="keyword arguments of the factory as JSON, e.g. '{\"width\": 16}'")
    p.add_argument("--weights", required=True, help="safetensors or a state_dict .pt")
    p.add_argument("--format", choices=["safetensors", "pt"], default=None,
                   help="weights format (default: from the suffix)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("prune", parents=[common, trust], help="prune a model directory")
    p.add_argument("model_dir")
    from mipp.method_registry import method_names
    p.add_argument("--method", default="mipp",
                   help="mipp, or a baseline: " + ", ".join(method_names()[1:]))
    p.add_argument("--allocation", help="how many units each layer keeps: auto (default), "
                   "counts (with --set counts=JSON), uniform, global, or from:METHOD (e.g. "
                   "from:mipp: MIPP decides how many, --method decides which)")
    p.add_argument("--mode", choices=["after-training", "at-init"], default="after-training",
                   help="at-init: the model is re-initialised from --seed, pruned, then trained")
    p.add_argument("--confidence", type=float, help="the paper's x in (0, 1) (default 0.9)")
    p.add_argument("--tol", type=float, help="fraction of a layer's MI that may be lost (default 0.05)")
    p.add_argument("--target", type=float, help="fraction of units to remove overall (0-1)")
    p.add_argument("--path", choices=["fast", "sequential"])
    p.add_argument("--repeats", type=int)
    p.add_argument("--calibration-samples", type=int)
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other PruneConfig field (JSON value), repeatable")
    _add_train_options(p, epochs=1, flag="--retrain-epochs")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("evaluate", parents=[common, trust],
                       help="test accuracy of a model directory or a downloaded model.tar.gz")
    p.add_argument("model_dir", help="a model directory or model.tar.gz")
    p.set_defaults(func=cmd_evaluate)

    # The service's client (login, models, datasets, jobs, sweeps): torch-free, httpx only.
    from mipp.client_commands import register as register_client_commands
    register_client_commands(sub)

    for entry in entry_points(group="mipp.commands"):
        try:
            entry.load()(sub)
        except ImportError as exc:  # the service extra is not installed
            print(f"note: `{entry.name}` commands unavailable ({exc})", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MippError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from pydantic import ValidationError
        if isinstance(exc, ValidationError):
            print("error: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                         for e in exc.errors()), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
