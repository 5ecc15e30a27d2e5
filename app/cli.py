"""`mipp serve` and `mipp admin ...`: the service's commands, registered as a `mipp` plugin.

`mipp serve` is the embedded default: SQLite, a local-directory store and the kombu
filesystem broker under one data directory, the API and one worker started together and
restarted when they die. The
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
    serve.add_argument(
        "--allow-code-uploads", action="store_true",
        help="accept models as Python source (MIPP_ALLOW_CODE_UPLOADS=true): the code runs in "
             "the worker's job process, so only for a server whose users you trust",
    )
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


def worker_command(settings, extra: list[str] | None = None,
                   hostname: str = "mipp-worker@%h") -> list[str]:
    """The worker command line: prefork, one process, the configured queues. Each worker
    node needs its own `hostname` (node name): orphan recovery goes by it."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
        "--queues", ",".join(settings.all_queues), "--hostname", hostname,
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
    if args.allow_code_uploads:
        os.environ["MIPP_ALLOW_CODE_UPLOADS"] = "true"  # read by the API and the worker
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
    children = [Supervised("api", api_cmd, env)]
    if not args.no_worker:
        children.append(Supervised("worker", worker_command(settings), env))
    for child in children:
        child.start()

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
            for child in children:
                failed = child.restart_if_dead()
                if failed is not None:  # it could not start at all (a port in use, ...)
                    stopping, code = True, failed or 1
            time.sleep(0.2)
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        for child in reversed(children):
            child.stop(grace_s=10.0 if child.name == "worker" else 5.0)
        for s, handler in old.items():
            signal.signal(s, handler)
    return code


class Supervised:
    """A child process of `mipp serve` that is restarted when it dies.

    A dead child's whole process group is killed first (a worker's job process may outlive
    its parent), so nothing runs unsupervised; the restarted worker re-queues the job that
    process held (orphan recovery) and the API's maintenance loop sends it within seconds.
    Restarts back off (1 s doubling to 30 s) while a child keeps dying within a minute; a
    child that dies within `STARTUP_S` of its first start is a failure to start, not a crash.
    """

    STARTUP_S = 5.0

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]):
        self.name, self.cmd, self.env = name, cmd, env
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.backoff_s = 0.0
        self.restart_at: float | None = None
        self.starts = 0

    def start(self) -> None:
        # Own process group: Ctrl-C reaches only us, and we stop the children in order.
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.starts += 1

    def restart_if_dead(self) -> int | None:
        """Restart a dead child (after its back-off); returns its exit code if it never
        started, else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        now = time.monotonic()
        if self.restart_at is None:
            _kill_group(self.proc.pid)
            lived = now - self.started_at
            if self.starts == 1 and lived < self.STARTUP_S:
                print(f"{self.name} exited with code {self.proc.returncode} at start; stopping",
                      file=sys.stderr, flush=True)
                return self.proc.returncode
            self.backoff_s = 0.0 if lived > 60 else min(max(1.0, self.backoff_s * 2), 30.0)
            print(f"{self.name} exited with code {self.proc.returncode} after {lived:.0f} s; "
                  f"restarting it in {self.backoff_s:.0f} s", file=sys.stderr, flush=True)
            self.restart_at = now + self.backoff_s
        if now >= self.restart_at:
            self.restart_at = None
            self.start()
        return None

    def stop(self, grace_s: float) -> None:
        if self.proc is not None:
            _stop(self.proc, self.name, grace_s)
            _kill_group(self.proc.pid)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a stopped child's process group (nothing, normally)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m app.cli ...`: the same commands without the engine's CLI (API image)."""
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="mipp service commands")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
