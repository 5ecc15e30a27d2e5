"""Database engine and sessions. Tables come from Alembic migrations (`migrate`), never create_all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Connection, Engine, Executable, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_DIR = REPO_ROOT / "alembic"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so the API and a worker share it."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


T = TypeVar("T")


class Reads:
    """Where the API's hot reads (a job, the job list) run: `await reads.run(fn)` calls
    `fn(connection)` on a pooled connection, on the reads' own `threads` per event loop, and
    returns its result.

    On PostgreSQL the reads have their own pool, in autocommit and without the pre-ping, so a
    read is one round trip where a session's is four (ping, BEGIN, the query, ROLLBACK). A
    connection the server has dropped fails its read once, and the read is retried on a fresh
    one (reads are safe to repeat; a database that is down fails the retry: a 503). SQLite
    reads share `engine`.

    `threads` is the setting MIPP_READ_THREADS (default 1, the measured best on 2 cores,
    BENCHMARKS.md §7): more threads overlap round trips but hand the GIL back and forth with
    the event loop, which at 50 clients cost more than they gained. The threads are a plain
    executor of this process, not anyio's `to_thread`: at 50 clients listing jobs, anyio's
    hand-off (its limiter, task and library lookups) took about 15% of the process's GIL time in
    one py-spy --gil profile of the list, the loop's `run_in_executor` a fraction of that
    (end to end the two were within the run-to-run spread, BENCHMARKS.md §7)."""

    def __init__(self, url: str, engine: Engine, threads: int):
        if url.startswith("sqlite"):
            self.engine = engine
        else:
            # Named, so pg_stat_activity tells the reads' connections apart.
            self.engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=threads,
                                        max_overflow=threads,
                                        connect_args={"application_name": "mipp-api-reads"})
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None  # made on first use, again after dispose

    async def run(self, fn: Callable[[Connection], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="mipp-reads")
        # The caller's context goes along (as anyio's to_thread would carry it).
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, context.run, self._run, fn)

    def _run(self, fn: Callable[[Connection], T]) -> T:
        for attempt in (1, 2):
            try:
                with self.engine.connect() as connection:
                    return fn(connection)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.engine.dispose()


class ReadQuery:
    """A read statement of the hot reads (`Reads.run`), its rows as plain tuples.

    On PostgreSQL the statement is compiled once and sent on the driver's own cursor:
    SQLAlchemy's execution context and result made a page of the job list (read and
    rendered) cost 0.47 ms against 0.37 ms this way (bench/bench_read_path.py; end to end at
    50 clients, +31% list and +39% GET throughput, BENCHMARKS.md §7). So the statement must
    need nothing of SQLAlchemy at run time: named parameters without values of their own (no
    literals, expanding IN lists or literal-execute limits) and no type processing of its
    parameters; that is checked when it is first compiled. Its result columns are taken as the
    driver returns them, so a timestamp comes in the connection's time zone (app.job_json
    turns it to UTC). A driver error is raised as SQLAlchemy's would be (a DBAPIError, the
    connection invalidated on a disconnect), so `Reads`' retry and the 503s work alike. Other
    databases (SQLite) run the statement through SQLAlchemy."""

    def __init__(self, stmt: Executable):
        self.stmt = stmt
        self._sql: str | None = None

    def rows(self, connection: Connection, params: dict) -> list[tuple]:
        dialect = connection.dialect
        if dialect.name != "postgresql":
            return [tuple(row) for row in connection.execute(self.stmt, params)]
        if self._sql is None:
            self._sql = self._compile(dialect)
        driver = connection.connection.driver_connection
        cursor = driver.cursor()
        try:
            cursor.execute(self._sql, params)
            return cursor.fetchall()
        except dialect.loaded_dbapi.Error as exc:
            dropped = dialect.is_disconnect(exc, driver, cursor)
            if dropped:
                connection.invalidate(exc)
            raise DBAPIError.instance(self._sql, params, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=dropped, dialect=dialect) from exc
        finally:
            cursor.close()

    def _compile(self, dialect) -> str:
        compiled = self.stmt.compile(dialect=dialect)
        # A bind that is not required carries its own value (a literal such as limit(1)),
        # which only SQLAlchemy would fill in.
        needs_sqlalchemy = [name for name, bind in compiled.binds.items()
                            if bind.expanding or bind.literal_execute or not bind.required
                            or bind.type._cached_bind_processor(dialect) is not None]
        if needs_sqlalchemy or compiled.positiontup or compiled.escaped_bind_names:
            raise ValueError(f"a ReadQuery's parameters must be plain named values; "
                             f"{needs_sqlalchemy or 'the positional style'} is not")
        return compiled.string


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["skip_logging_config"] = True
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (the only way tables are made)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
