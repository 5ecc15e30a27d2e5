"""`mipp login`, `mipp models|datasets|jobs|sweeps ...`: the service from the shell.

    mipp login http://gpu-box:8000                 # asks for the API key, checks it, saves it (0600)
    mipp models upload mlp.safetensors --arch mlp --config '{"widths": [64, 32, 16]}'
    mipp datasets upload digits.npz
    mipp jobs submit --model M --dataset D --target 0.5 --watch
    mipp jobs logs J --follow
    mipp jobs download J --out pruned --load
    mipp sweeps submit --model M --dataset D --targets 0.3 0.5 0.7 --methods mipp l1 --watch

The server and key come from MIPP_URL / MIPP_API_KEY, else from the file `mipp login` wrote.
Nothing here imports torch except `jobs download --load` (which loads the model).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
from typing import Any

from mipp.cli import _json_object, _key_value


def _client(args):
    from mipp.client import Client

    return Client.from_config(url=getattr(args, "url", None))


def _handles_service_errors(fn):
    """Print the service's refusal (status, code, message) and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def run(args) -> int:
        try:
            from mipp.client import ServiceError
        except ImportError as exc:
            print(f"error: the client needs httpx ({exc}); pip install 'mipp[client]'",
                  file=sys.stderr)
            return 2
        try:
            return fn(args)
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a local file to upload or a folder to write: name it
            print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
            return 2
    return run


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _fields(args) -> dict[str, Any]:
    """Named options that are set, plus every --field KEY=VALUE (passed through unchanged)."""
    return dict(args.field)


# --------------------------------------------------------------------------------------------
# login


@_handles_service_errors
def cmd_login(args) -> int:
    from mipp.client import Client, save_login

    url = args.url_arg or os.environ.get("MIPP_URL")
    if not url:
        print("error: give the server URL: mipp login http://HOST:8000", file=sys.stderr)
        return 2
    if args.key_stdin:
        key = sys.stdin.readline().strip()
    else:
        key = os.environ.get("MIPP_API_KEY") or getpass.getpass("API key: ").strip()
    if not key:
        print("error: no API key given (type it at the prompt, pipe it with --key-stdin, "
              "or set MIPP_API_KEY)", file=sys.stderr)
        return 2
    with Client(url, key) as api:
        me = api.me()  # refuse to save a key the server does not accept
    path = save_login(url, key)
    print(f"logged in to {url} as {me['name']}; saved to {path} (readable by you only)")
    return 0


# --------------------------------------------------------------------------------------------
# models and datasets


@_handles_service_errors
def cmd_models_upload(args) -> int:
    fields = {"arch": args.arch, "format": args.format, "config": args.config,
              "input_shape": args.input_shape, "num_classes": args.num_classes,
              "name": args.name, **_fields(args)}
    with _client(args) as api:
        model = api.upload_model(args.file, **{k: v for k, v in fields.items() if v is not None})
    _print_row(model, ("id", "name", "arch", "format", "size_bytes"), args.json)
    return 0


@_handles_service_errors
def cmd_datasets_upload(args) -> int:
    with _client(args) as api:
        dataset = api.upload_dataset(args.file, **{"name": args.name, **_fields(args)})
    _print_row(dataset, ("id", "name", "kind", "size_bytes", "summary"), args.json)
    return 0


@_handles_service_errors
def cmd_datasets_builtin(args) -> int:
    with _client(args) as api:
        dataset = api.add_builtin_dataset(args.name, args.display_name)
    _print_row(dataset, ("id", "name", "kind", "builtin_name"), args.json)
    return 0


def _list_command(method: str, columns: tuple[str, ...]):
    @_handles_service_errors
    def run(args) -> int:
        with _client(args) as api:
            page = getattr(api, method)(limit=args.limit, offset=args.offset)
        if args.json:
            _print_json(page)
        else:
            _print_table(page["items"], columns)
            print(f"{len(page['items'])} of {page['total']}")
        return 0
    return run


def _print_row(row: dict, columns: tuple[str, ...], as_json: bool) -> None:
    if as_json:
        _print_json(row)
        return
    for column in columns:
        value = row.get(column)
        print(f"{column:<12} {json.dumps(value) if isinstance(value, dict | list) else value}")


def _print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# --------------------------------------------------------------------------------------------
# jobs


def _prune_config(args) -> dict[str, Any]:
    """--config JSON, then the named shortcuts, then --set KEY=VALUE (last wins)."""
    config = dict(args.config or {})
    for name in ("method", "tol", "target", "seed", "device"):
        value = getattr(args, name, None)
        if value is not None:
            config[name] = value
    if getattr(args, "retrain_epochs", None) is not None:
        config["retrain"] = {**config.get("retrain", {}), "epochs": args.retrain_epochs}
    config.update(dict(args.set))
    return config


@_handles_service_errors
def cmd_jobs_submit(args) -> int:
    with _client(args) as api:
        job = api.submit_job(args.model, args.dataset, _prune_config(args), queue=args.queue,
                             time_limit_s=args.time_limit, idempotency_key=args.idempotency_key)
        print(f"job {job['id']} {job['status']}", file=sys.stderr)
        if args.json and not args.watch:
            _print_json(job)
        elif not args.watch:
            print(job["id"])
        if args.watch:
            return _watch(api, job["id"], args)
    return 0


@_handles_service_errors
def cmd_jobs_list(args) -> int:
    with _client(args) as api:
        page = api.list_jobs(status=args.status, limit=args.limit, offset=args.offset,
                             model_id=args.model, dataset_id=args.dataset, sweep_id=args.sweep)
    if args.json:
        _print_json(page)
        return 0
    rows = [{**job, "method": job["config"].get("method"),
             "target": job["config"].get("target"),
             "removed": ((job.get("metrics") or {}).get("units") or {}).get("removed_fraction"),
             "created": job["created_at"][:19]} for job in page["items"]]
    _print_table(rows, ("id", "status", "phase", "progress", "method", "target", "tol",
                        "removed", "created"))
    print(f"{len(rows)} of {page['total']}")
    return 0


def format_job(job: dict, layers: list[dict] | None = None) -> str:
    """A readable summary of a job: state, the chosen tol, units per layer, headline metrics."""
    lines = [f"job {job['id']}: {job['status']}" + (f" ({job['error']})" if job.get("error") else "")]
    config = job.get("config") or {}
    lines.append(f"  method {config.get('method', 'mipp')}, target {config.get('target')}, "
                 f"tol {job.get('tol') if job.get('tol') is not None else config.get('tol')}")
    if job["status"] in ("queued", "running"):
        eta = job.get("eta_s")
        lines.append(f"  phase {job['phase']} {job.get('phase_progress', job['progress']):.0%}"
                     + (f", about {_duration(eta)} left in this phase" if eta is not None else "")
                     + f"; overall {job['progress']:.0%}: {job['message']}")
    units = job.get("layer_units") or {
        layer["name"]: {"before": layer["units_before"], "after": layer["units_after"]}
        for layer in layers or []}
    if units:
        lines.append("  units per layer (before -> after):")
        lines += [f"    {name:<24} {u['before']:>6} -> {u['after']}" for name, u in units.items()]
    metrics = job.get("metrics")
    if metrics:
        acc = metrics.get("accuracy", {})
        lines.append(f"  removed {metrics['units']['removed_fraction']:.1%} of units; params "
                     f"{metrics['params']['before']:,} -> {metrics['params']['after']:,}; MACs "
                     f"{metrics['macs']['before']:,} -> {metrics['macs']['after']:,}")
        labels = {"dense": "dense", "pruned_no_refit": "pruned", "pruned": "refit",
                  "retrained": "retrained"}  # the engine's keys, named as `mipp prune` prints them
        lines.append("  accuracy " + " | ".join(
            f"{labels.get(k, k)} {v:.4f}" for k, v in acc.items() if v is not None))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@_handles_service_errors
def cmd_jobs_show(args) -> int:
    with _client(args) as api:
        job = api.job(args.job_id)
        layers = api.layers(args.job_id) if job["status"] == "succeeded" else []
    if args.json:
        _print_json({**job, "layers": layers})
    else:
        print(format_job(job, layers))
    return 0


def _watch(api, job_id: str, args) -> int:
    """Draw the job's phase as a progress bar until it ends; exit 0 only if it succeeded."""
    from mipp.cli import ProgressBar

    bar = ProgressBar(enabled=not getattr(args, "quiet", False))

    def show(job: dict) -> None:
        if job["status"] == "queued":
            bar("queued", 0.0, job["message"])
        elif job["status"] == "running":
            eta = job.get("eta_s")
            prefix = f"~{_duration(eta)} left | " if eta is not None else ""  # before the cut
            bar(job["phase"], job.get("phase_progress", job["progress"]), prefix + job["message"])
    try:
        job = api.wait(job_id, progress=show, poll_s=args.poll)
    finally:
        bar.close()
    print(format_job(job))
    return 0 if job["status"] == "succeeded" else 1


@_handles_service_errors
def cmd_jobs_watch(args) -> int:
    with _client(args) as api:
        return _watch(api, args.job_id, args)


@_handles_service_errors
def cmd_jobs_logs(args) -> int:
    with _client(args) as api:
        if args.follow:
            for line in api.follow_log(args.job_id):
                print(line, flush=True)
        else:
            sys.stdout.write(api.log(args.job_id))
    return 0


@_handles_service_errors
def cmd_jobs_cancel(args) -> int:
    with _client(args) as api:
        job = api.cancel(args.job_id)
    print(f"job {job['id']}: {job['status']}"
          + (" (cancel requested; it stops at its next step)" if job["status"] == "running" else ""))
    return 0


@_handles_service_errors
def cmd_jobs_delete(args) -> int:
    with _client(args) as api:
        api.delete_job(args.job_id)
    print(f"job {args.job_id} deleted")
    return 0


@_handles_service_errors
def cmd_jobs_download(args) -> int:
    from pathlib import Path

    out = Path(args.out)
    with _client(args) as api:
        names = args.names or ["model.tar.gz"]
        for name in names:
            if name == "model.tar.gz" and not args.no_unpack:
                model_dir = api.download_model(args.job_id, out)
                print(f"model directory: {model_dir}")
            else:
                out.mkdir(parents=True, exist_ok=True)
                print(f"{name}: {api.download(args.job_id, name, out / name)}")
    if args.load:
        try:
            from mipp.artifacts import load_model_dir
            from mipp.groups import count_params
        except ImportError as exc:
            print(f"error: --load needs the engine (torch): {exc}", file=sys.stderr)
            return 2
        model = load_model_dir(out / "model")
        spec = model.zoo_spec
        print(f"loaded {spec.arch} {tuple(spec.input_shape)} -> {spec.num_classes} classes, "
              f"{count_params(model):,} parameters (mipp.load_model_dir({str(out / 'model')!r}))")
    return 0


# --------------------------------------------------------------------------------------------
# sweeps


def format_sweep(sweep: dict) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sweep["counts"].items() if v)
    lines = [f"sweep {sweep['id']}: {sweep['status']} ({counts})"]
    columns = ("method", "target", "tol", "seed", "status", "removed", "params", "macs",
               "acc_pruned", "acc_refit", "acc_retrained")
    rows = [{"method": r["method"], "target": r["target"], "tol": r["tol"], "seed": r["seed"],
             "status": r["status"], "removed": r["units_removed_fraction"],
             "params": r["params_after"], "macs": r["macs_after"],
             "acc_pruned": r["accuracy_pruned"], "acc_refit": r["accuracy_refit"],
             "acc_retrained": r["accuracy_retrained"]} for r in sweep["rows"]]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


@_handles_service_errors
def cmd_sweeps_submit(args) -> int:
    with _client(args) as api:
        sweep = api.submit_sweep(args.model, args.dataset, targets=args.targets, tols=args.tols,
                                 methods=args.methods, seeds=args.seeds,
                                 config=_prune_config(args), queue=args.queue,
                                 time_limit_s=args.time_limit, name=args.name)
        print(f"sweep {sweep['id']}: {len(sweep['rows'])} jobs", file=sys.stderr)
        if not args.watch:
            if args.json:
                _print_json(sweep)
            else:
                print(sweep["id"])
            return 0
        return _watch_sweep(api, sweep["id"], args)


def _watch_sweep(api, sweep_id: str, args) -> int:
    from tqdm import tqdm

    bar = None

    def show(sweep: dict) -> None:
        nonlocal bar
        total = len(sweep["rows"])
        if bar is None:
            bar = tqdm(total=total, desc="jobs ended", unit="job", disable=args.quiet)
        ended = sum(sweep["counts"].get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        bar.n = ended
        bar.set_postfix_str(f"{sweep['counts'].get('running', 0)} running", refresh=False)
        bar.refresh()
    try:
        sweep = api.wait_sweep(sweep_id, progress=show, poll_s=args.poll)
    finally:
        if bar is not None:
            bar.close()
    print(format_sweep(sweep))
    if args.plot:
        print(f"plot: {api.sweep_plot(sweep_id, args.plot)}")
    return 0 if sweep["counts"].get("succeeded", 0) == len(sweep["rows"]) else 1


@_handles_service_errors
def cmd_sweeps_show(args) -> int:
    with _client(args) as api:
        sweep = api.sweep(args.sweep_id)
        if args.watch and sweep["status"] not in ("succeeded", "failed", "cancelled"):
            return _watch_sweep(api, args.sweep_id, args)
        if args.json:
            _print_json(sweep)
        else:
            print(format_sweep(sweep))
        if args.plot:
            print(f"plot: {api.sweep_plot(args.sweep_id, args.plot)}")
    return 0


@_handles_service_errors
def cmd_sweeps_cancel(args) -> int:
    with _client(args) as api:
        sweep = api.cancel_sweep(args.sweep_id)
    print(f"sweep {sweep['id']}: {sweep['status']} "
          f"({', '.join(f'{v} {k}' for k, v in sweep['counts'].items() if v)})")
    return 0


# --------------------------------------------------------------------------------------------
# the parser


def _floats(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client commands to the `mipp` parser (torch-free: nothing heavy at import)."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="server URL (default: $MIPP_URL, else the `mipp login` file)")
    remote.add_argument("--json", action="store_true", help="print the service's JSON")

    p = sub.add_parser("login", help="save a server URL and API key for the commands below",
                       description="Check the key against the server, then save URL and key to "
                                   "the user config file (mode 0600).")
    p.add_argument("url_arg", nargs="?", metavar="URL", help="e.g. http://127.0.0.1:8000")
    p.add_argument("--key-stdin", action="store_true", help="read the key from stdin "
                   "(default: $MIPP_API_KEY, else a prompt)")
    p.set_defaults(func=cmd_login)

    # models
    models = sub.add_parser("models", help="models on the server").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND")
    p = models.add_parser("upload", parents=[remote], help="upload weights for a zoo architecture")
    p.add_argument("file", help="weights: .safetensors or a state_dict .pt")
    p.add_argument("--arch", help="zoo architecture, e.g. mlp, lenet5, resnet20")
    p.add_argument("--format", help="safetensors (default) or pt")
    p.add_argument("--config", type=_json_object, help="architecture options JSON")
    p.add_argument("--input-shape", type=json.loads, help="per-sample shape JSON, e.g. [64]")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--name")
    p.add_argument("--field", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other form field of POST /models (repeatable)")
    p.set_defaults(func=cmd_models_upload)
    p = models.add_parser("list", parents=[remote], help="your models")
    _add_paging(p)
    p.set_defaults(func=_list_command("list_models", ("id", "name", "arch", "format", "size_bytes",
                                                       "created_at")))

    # datasets
    datasets = sub.add_parser("datasets", help="datasets on the server").add_subparsers(
        dest="datasets_command", required=True, metavar="COMMAND")
    p = datasets.add_parser("upload", parents=[remote], help="upload an .npz (x, y[, x_test, y_test])")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--field", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other form field of POST /datasets (repeatable)")
    p.set_defaults(func=cmd_datasets_upload)
    p = datasets.add_parser("builtin", parents=[remote], help="refer to a dataset the server ships")
    p.add_argument("name", help="digits, mnist, fashion-mnist, cifar10, cifar100")
    p.add_argument("--display-name")
    p.set_defaults(func=cmd_datasets_builtin)
    p = datasets.add_parser("list", parents=[remote], help="your datasets")
    _add_paging(p)
    p.set_defaults(func=_list_command("list_datasets", ("id", "name", "kind", "size_bytes",
                                                         "created_at")))

    # jobs
    jobs = sub.add_parser("jobs", help="pruning jobs on the server").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND")
    p = jobs.add_parser("submit", parents=[remote], help="submit a pruning job")
    _add_job_options(p)
    p.add_argument("--target", type=float, help="fraction of units to remove (0-1)")
    p.add_argument("--tol", type=float, help="MIPP's tolerance")
    p.add_argument("--method", help="mipp (default), random, l1, taylor, thinet, snip, grasp, synflow")
    p.add_argument("--seed", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--watch", action="store_true", help="then show its progress until it ends")
    p.set_defaults(func=cmd_jobs_submit)

    p = jobs.add_parser("list", parents=[remote], help="your jobs, newest first")
    p.add_argument("--status", action="append", help="queued, running, succeeded, failed, cancelled")
    p.add_argument("--model", help="only jobs of this model id")
    p.add_argument("--dataset", help="only jobs of this dataset id")
    p.add_argument("--sweep", help="only the jobs of this sweep id")
    _add_paging(p)
    p.set_defaults(func=cmd_jobs_list)

    for name, func, text in (
        ("show", cmd_jobs_show, "a job: state, chosen tol, units per layer, metrics"),
        ("watch", cmd_jobs_watch, "a progress bar of the job's phase until it ends"),
        ("logs", cmd_jobs_logs, "the job's log (--follow: as it is written, until the job ends)"),
        ("cancel", cmd_jobs_cancel, "cancel a queued or running job"),
        ("delete", cmd_jobs_delete, "delete an ended job and its artifacts"),
        ("download", cmd_jobs_download, "download artifacts; model.tar.gz is unpacked"),
    ):
        p = jobs.add_parser(name, parents=[remote], help=text)
        p.add_argument("job_id")
        p.set_defaults(func=func)
        if name in ("watch",):
            p.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true")
        if name == "download":
            p.add_argument("names", nargs="*", metavar="NAME",
                           help="artifact names (default model.tar.gz); see `jobs show`")
            p.add_argument("--out", default=".", help="directory (default: here)")
            p.add_argument("--no-unpack", action="store_true", help="keep model.tar.gz packed")
            p.add_argument("--load", action="store_true",
                           help="load the model with mipp.load_model_dir to check it (needs torch)")

    # sweeps
    sweeps = sub.add_parser("sweeps", help="several targets/methods/seeds as one submission") \
        .add_subparsers(dest="sweeps_command", required=True, metavar="COMMAND")
    p = sweeps.add_parser("submit", parents=[remote], help="submit one job per method x target x seed")
    _add_job_options(p)
    p.add_argument("--targets", type=_floats, nargs="+", help="fractions of units to remove")
    p.add_argument("--tols", type=_floats, nargs="+", help="MIPP tolerances (instead of targets)")
    p.add_argument("--methods", nargs="+", help="default: mipp")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0")
    p.add_argument("--name")
    p.add_argument("--watch", action="store_true", help="then wait and print the table")
    p.add_argument("--plot", help="with --watch: write the SVG plot to this file")
    p.add_argument("--poll", type=float, default=2.0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sweeps_submit)
    p = sweeps.add_parser("show", parents=[remote], help="a sweep's table (and plot)")
    p.add_argument("sweep_id")
    p.add_argument("--plot", help="write the SVG plot to this file")
    p.add_argument("--watch", action="store_true", help="wait until every job has ended")
    p.add_argument("--poll", type=float, default=2.0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sweeps_show)
    p = sweeps.add_parser("cancel", parents=[remote], help="cancel every job of the sweep not ended")
    p.add_argument("sweep_id")
    p.set_defaults(func=cmd_sweeps_cancel)


def _add_paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model id")
    p.add_argument("--dataset", required=True, help="dataset id")
    p.add_argument("--config", type=_json_object, help="PruneConfig as JSON")
    p.add_argument("--retrain-epochs", type=int)
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any PruneConfig field (JSON value), repeatable")
    p.add_argument("--queue", help="GPU class queue (default: the server's)")
    p.add_argument("--time-limit", type=int, help="soft time limit in seconds")
