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
ADMIN_HELP = """Administration of a running server's database.

These commands use the server's database: the one MIPP_DATABASE_URL names, else DATA/mipp.db
where DATA is --data-dir, else $MIPP_DATA_DIR, else ./.mipp (what `mipp serve` prints as
"data in ..."). They never create one: only `mipp serve` and `mipp admin migrate` do.
"""


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

    admin = subparsers.add_parser(
        "admin", help="service administration (users, API keys, limits, storage)",
        description=ADMIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    users = admin_sub.add_parser("users", help="list users: keys, storage used, limits")
    _add_data_dir(users)
    users.set_defaults(func=cmd_users)
    keys = admin_sub.add_parser("keys", help="list a user's API keys (id, prefix, revoked)")
    keys.add_argument("name", help="user name")
    _add_data_dir(keys)
    keys.set_defaults(func=cmd_keys)
    revoke = admin_sub.add_parser("revoke-key", help="revoke an API key: it answers 401 from now on")
    revoke.add_argument("key", help="the key's id or its prefix, as `mipp admin keys` prints them")
    _add_data_dir(revoke)
    revoke.set_defaults(func=cmd_revoke_key)
    quota = admin_sub.add_parser(
        "quota", help="show or set a user's limits (storage, request rate)",
        description="Without options: the user's limits and usage. A value of 0 means no "
                    "limit; 'default' returns to the server's default (MIPP_STORAGE_QUOTA_BYTES, "
                    "MIPP_REQUESTS_PER_MINUTE).")
    quota.add_argument("name", help="user name")
    quota.add_argument("--storage-bytes", type=_limit_value(parse_size), metavar="N",
                       help="storage quota: bytes, or with a unit (500MB, 20GiB); 0 = none")
    quota.add_argument("--requests-per-minute", type=_limit_value(int), metavar="N",
                       help="request rate per API key (per API process); 0 = none")
    _add_data_dir(quota)
    quota.set_defaults(func=cmd_quota)
    gc = admin_sub.add_parser(
        "gc", help="remove store objects no row refers to",
        description="Garbage collection of the object store: objects under users/ that no "
                    "model, dataset or artifact row refers to, outside active jobs, older "
                    "than the grace period. The maintenance round runs it every "
                    "MIPP_GC_INTERVAL_S.")
    gc.add_argument("--grace-s", type=float, default=None,
                    help="keep objects younger than this (default MIPP_GC_GRACE_S)")
    _add_data_dir(gc)
    gc.set_defaults(func=cmd_gc)
    migrate = admin_sub.add_parser(
        "migrate", help="create the database or bring its schema up to date")
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


class AdminError(Exception):
    """A refusal of an admin command: printed as one line, exit status 2."""


def _where(args) -> str:
    """How the database location was chosen, for messages (read before `_settings`
    exports MIPP_DATA_DIR)."""
    if os.environ.get("MIPP_DATABASE_URL"):
        return "MIPP_DATABASE_URL is set"
    if args.data_dir is not None:
        return f"--data-dir {args.data_dir}"
    if os.environ.get("MIPP_DATA_DIR"):
        return f"MIPP_DATA_DIR={os.environ['MIPP_DATA_DIR']}"
    return (f"neither --data-dir, MIPP_DATA_DIR nor MIPP_DATABASE_URL is set, so "
            f"./{DEFAULT_DATA_DIR}")


def _existing_database(args):
    """The server's settings, after checking that its database exists and is at this
    code's schema; AdminError (naming where it looked) otherwise. Never creates one."""
    where = _where(args)
    settings = _settings(args)
    if not settings.database_url.startswith("sqlite") and "MIPP_DATABASE_URL" not in where:
        where = "MIPP_DATABASE_URL is set in .env"
    shown = settings.database_url.split("@")[-1]
    if settings.database_url.startswith("sqlite"):
        path = Path(settings.database_url.split("///", 1)[-1])
        if not path.is_file():
            raise AdminError(
                f"no mipp database at {path} (looked there because {where}). Run this with "
                "the server's --data-dir (`mipp serve` prints it as 'data in ...') or its "
                "MIPP_DATA_DIR / MIPP_DATABASE_URL; only `mipp serve` and `mipp admin migrate` "
                "create a database")
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import alembic_config, make_engine

    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise AdminError(f"cannot open the database at {shown} ({where}): "
                         f"{str(exc).splitlines()[0][:200]}") from None
    finally:
        engine.dispose()
    if current is None:
        raise AdminError(f"the database at {shown} ({where}) has no mipp tables; point at the "
                         "server's database, or create one with `mipp admin migrate`")
    if current != head:
        raise AdminError(f"the database at {shown} is at schema {current}, this mipp needs "
                         f"{head}: run `mipp admin migrate` (or restart `mipp serve`)")
    return settings


def _admin(command):
    """Run an admin command on the server's existing database; AdminError -> exit 2."""
    def run(args) -> int:
        from app.db import make_engine, make_sessionmaker, session_scope

        try:
            settings = _existing_database(args)
            engine = make_engine(settings.database_url)
            try:
                with session_scope(make_sessionmaker(engine)) as session:
                    return command(args, settings, session)
            finally:
                engine.dispose()
        except (AdminError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = command.__name__
    run.__doc__ = command.__doc__
    return run


def _user_named(session, name: str):
    from sqlalchemy import select

    from app.models import User

    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AdminError(f"no user named {name!r} (`mipp admin users` lists them)")
    return user


SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
              "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024,
              "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'1234', '500MB', '20GiB', '1.5G' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with B, KB, MB, GB, TB, KiB, MiB, "
            "GiB or TiB (e.g. 20GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _limit_value(parse):
    """An argparse type: 'default' (None: the server's default) or a value >= 0."""
    def convert(text: str):
        if text.strip().lower() == "default":
            return "default"
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 0:
            raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
        return value
    convert.__name__ = parse.__name__
    return convert


def _limits_line(user, settings, used: int) -> str:
    from app.limits import effective, human_bytes

    quota = effective(user.storage_quota_bytes, settings.storage_quota_bytes)
    rate = effective(user.requests_per_minute, settings.requests_per_minute)
    quota_text = "no limit" if quota == 0 else human_bytes(quota)
    rate_text = "no limit" if rate == 0 else f"{rate}/min"
    own = lambda v: " (server default)" if v is None else ""  # noqa: E731
    return (f"storage {human_bytes(used)} used of {quota_text}{own(user.storage_quota_bytes)}; "
            f"requests {rate_text} per key{own(user.requests_per_minute)}")


@_admin
def cmd_users(args, settings, session) -> int:
    """List every user with their keys, storage and limits."""
    from sqlalchemy import select

    from app.limits import storage_used
    from app.models import User

    users = session.scalars(select(User).order_by(User.created_at)).all()
    if not users:
        print("no users yet: `mipp admin create-user NAME`")
    for user in users:
        active = sum(not k.revoked for k in user.api_keys)
        kind = "admin" if user.is_admin else "user"
        print(f"{user.name}  ({kind}, id {user.id}, created {user.created_at:%Y-%m-%d %H:%M}, "
              f"keys {active} active / {len(user.api_keys)})")
        print(f"    {_limits_line(user, settings, storage_used(session, user.id))}")
    return 0


@_admin
def cmd_keys(args, settings, session) -> int:
    """A user's API keys (only a prefix of each is kept)."""
    user = _user_named(session, args.name)
    print(f"{'id':32}  {'prefix':12}  {'created':16}  state")
    for key in sorted(user.api_keys, key=lambda k: k.created_at):
        print(f"{key.id:32}  {key.prefix:12}  {key.created_at:%Y-%m-%d %H:%M}  "
              f"{'revoked' if key.revoked else 'active'}")
    return 0


@_admin
def cmd_revoke_key(args, settings, session) -> int:
    """Revoke a key by id or prefix; the next request with it answers 401."""
    from app.security import find_key, revoke_key

    key = find_key(session, args.key)
    if key is None:
        raise AdminError(f"no API key with id or prefix {args.key!r} (`mipp admin keys USER` "
                         "lists them)")
    if revoke_key(session, key):
        print(f"revoked key {key.prefix}... ({key.id}) of {key.user.name!r}: it answers 401 "
              "from now on")
    else:
        print(f"key {key.prefix}... ({key.id}) of {key.user.name!r} was already revoked")
    return 0


@_admin
def cmd_quota(args, settings, session) -> int:
    """Show, or set, a user's storage quota and request rate."""
    from app.limits import storage_used

    user = _user_named(session, args.name)
    for option, column in (("storage_bytes", "storage_quota_bytes"),
                           ("requests_per_minute", "requests_per_minute")):
        value = getattr(args, option)
        if value is not None:
            setattr(user, column, None if value == "default" else value)
    session.flush()
    print(f"{user.name}: {_limits_line(user, settings, storage_used(session, user.id))}")
    return 0


@_admin
def cmd_gc(args, settings, session) -> int:
    """Remove store objects no row refers to."""
    from app.core.housekeeping import collect_garbage
    from app.storage import make_store

    grace = settings.gc_grace_s if args.grace_s is None else args.grace_s
    removed = collect_garbage(session, make_store(settings), grace_s=grace)
    for key in removed:
        print(f"removed {key}")
    print(f"{len(removed)} unreferenced object(s) removed (grace {grace:.0f} s)")
    return 0


def cmd_migrate(args) -> int:
    settings = _settings(args)
    _migrate(settings)
    print(f"database at {settings.database_url.split('@')[-1]} is up to date")
    return 0


@_admin
def cmd_create_user(args, settings, session) -> int:
    """Create a user and print its API key once."""
    from app.security import create_user

    user, token = create_user(session, args.name, is_admin=args.admin)
    kind = "admin" if user.is_admin else "user"
    print(f"created {kind} {user.name!r} (id {user.id}). API key (shown once, keep it):")
    print(token)
    return 0


@_admin
def cmd_create_key(args, settings, session) -> int:
    """Print a new API key for an existing user."""
    from app.security import new_api_key

    print(new_api_key(session, _user_named(session, args.name)))
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
        f"  dashboard:    {base}/ui/  (sign in with an API key)\n"
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
