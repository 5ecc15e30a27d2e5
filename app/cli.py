"""`mipp serve` and `mipp admin ...`: the service's commands, registered as a `mipp` plugin.

`mipp serve` is the embedded default: SQLite, a local-directory store and the kombu
filesystem broker under one data directory, the API and one worker started together. The
same code with MIPP_DATABASE_URL / MIPP_BROKER_URL / MIPP_STORE=s3 is the team setup.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA_DIR = ".mipp"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the pruning service (API + one worker) with the embedded default",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_dir(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="start the API only")
    serve.set_defaults(func=cmd_serve)

    admin = subparsers.add_parser("admin", help="service administration (users, API keys)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    create = admin_sub.add_parser("create-user", help="create a user and print its API key once")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true", help="the user sees everyone's resources")
    _add_data_dir(create)
    create.set_defaults(func=cmd_create_user)
    key = admin_sub.add_parser("create-key", help="print a new API key for an existing user")
    key.add_argument("name")
    _add_data_dir(key)
    key.set_defaults(func=cmd_create_key)
    migrate = admin_sub.add_parser("migrate", help="bring the database schema up to date")
    _add_data_dir(migrate)
    migrate.set_defaults(func=cmd_migrate)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the embedded default keeps its files (default $MIPP_DATA_DIR or ./{DEFAULT_DATA_DIR})",
    )


def _settings(args):
    """Settings from the environment, with --data-dir exported so child processes agree."""
    data_dir = args.data_dir or Path(os.environ.get("MIPP_DATA_DIR", DEFAULT_DATA_DIR))
    os.environ["MIPP_DATA_DIR"] = str(data_dir.expanduser().absolute())
    from app.settings import Settings

    return Settings()


def _migrate(settings) -> None:
    import logging

    from app.db import migrate

    logging.getLogger("alembic").setLevel(logging.WARNING)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)


def cmd_migrate(args) -> int:
    settings = _settings(args)
    _migrate(settings)
    print(f"database at {settings.database_url.split('@')[-1]} is up to date")
    return 0


def cmd_create_user(args) -> int:
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.security import create_user

    settings = _settings(args)
    _migrate(settings)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            user, token = create_user(session, args.name, is_admin=args.admin)
            kind = "admin" if user.is_admin else "user"
            print(f"created {kind} {user.name!r} (id {user.id}). API key (shown once, keep it):")
            print(token)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def cmd_create_key(args) -> int:
    from sqlalchemy import select

    from app.db import make_engine, make_sessionmaker, session_scope
    from app.models import User
    from app.security import new_api_key

    settings = _settings(args)
    _migrate(settings)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            user = session.scalar(select(User).where(User.name == args.name))
            if user is None:
                print(f"error: no user named {args.name!r}", file=sys.stderr)
                return 2
            print(new_api_key(session, user))
    finally:
        engine.dispose()
    return 0


def worker_command(settings, extra: list[str] | None = None) -> list[str]:
    """The worker command line: prefork, one process, the configured queues."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
        "--queues", ",".join(settings.all_queues), "--hostname", "mipp-worker@%h",
        "--without-gossip", "--without-mingle",
        *(extra or []),
    ]


def _stop(proc: subprocess.Popen, name: str, grace_s: float) -> None:
    """SIGTERM (warm shutdown), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in {grace_s:.0f} s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


def cmd_serve(args) -> int:
    settings = _settings(args)
    _migrate(settings)
    from app.queue import ensure_broker_dirs

    ensure_broker_dirs(settings)
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    # Both run in fresh interpreters: the API never imports torch, and the worker's parent
    # never initialises CUDA before forking its job process.
    api_cmd = [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", args.host, "--port", str(args.port), "--log-level", "info",
    ]
    procs: list[tuple[str, subprocess.Popen]] = []
    # Own process groups: Ctrl-C reaches only us, and we stop the children in order.
    api = subprocess.Popen(api_cmd, env=env, start_new_session=True)
    procs.append(("api", api))
    if not args.no_worker:
        procs.append(("worker", subprocess.Popen(worker_command(settings), env=env, start_new_session=True)))

    base = f"http://{args.host if args.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{args.port}"
    print(
        f"\nmipp service: data in {settings.data_dir}\n"
        f"  API docs:     {base}/docs\n"
        f"  create a key: mipp admin create-user NAME --data-dir {settings.data_dir}\n"
        f"  then:         curl -H 'Authorization: Bearer KEY' {base}/api/v1/users/me\n"
        "  Ctrl-C stops the API and the worker.\n",
        flush=True,
    )
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stopping:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    stopping, code = True, proc.returncode or 1
            time.sleep(0.2)
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        for name, proc in reversed(procs):
            _stop(proc, name, grace_s=10.0 if name == "worker" else 5.0)
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m app.cli ...`: the same commands without the engine's CLI (API image)."""
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="mipp service commands")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
