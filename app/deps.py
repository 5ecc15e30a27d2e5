"""Typed dependencies: the session, the store, the caller, and owned resources (404 if not yours).

Routes hold no lookup or ownership code: `job: OwnedJob` is the caller's job or a 404.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, Select, bindparam
from sqlalchemy.orm import Session

from app import job_json
from app.db import ReadQuery
from app.errors import NotFound, Unauthorized
from app.limits import check_rate
from app.models import Dataset, Job, ModelFile, Sweep, User
from app.queue import JobQueue
from app.security import CALLER_FOR_KEY, Caller, caller_of, hash_key, user_for_key
from app.settings import Settings
from app.storage import ObjectStore

T = TypeVar("T")


# The dependencies that do no I/O are `async def`: FastAPI runs every plain `def` dependency
# in its thread pool, and on 2 cores each such hop costs about as much as a database query.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    # Making the session does no I/O (it connects on first use); closing it returns the
    # connection to the pool (a ROLLBACK round trip), so that part goes to the thread pool.
    # Its own one-thread limiter (as FastAPI does for `def` dependencies with yield): with the
    # shared pool full of requests waiting for a connection, the close that frees one must
    # not wait for a thread itself.
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if session.in_transaction():
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()  # holds no connection: nothing to wait for


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]

bearer = HTTPBearer(auto_error=False, description="An API key from `mipp admin create-user`.")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return credentials.credentials


def admit(request: Request, settings: Settings, found: tuple[User | Caller, str] | None
          ) -> User | Caller:
    """The user of a key lookup's (user, key id) (401 when the key was unknown or revoked),
    after spending one of the key's requests (429 with Retry-After when it is over its rate;
    app.limits)."""
    if found is None:
        raise Unauthorized("invalid or revoked API key")
    user, key_id = found
    check_rate(request.app.state, user, key_id, settings)
    return user


def authenticate(request: Request, session: Session, settings: Settings,
                 credentials: HTTPAuthorizationCredentials | None) -> User:
    """The key's user: 401 for a missing, unknown or revoked key, 429 over its rate (admit).
    Blocking (one query): call it from the thread pool."""
    return admit(request, settings, user_for_key(session, bearer_token(credentials)))


def get_current_user(request: Request, session: SessionDep, settings: SettingsDep,
                     credentials: Credentials) -> User:
    return authenticate(request, session, settings, credentials)


CurrentUser = Annotated[User, Depends(get_current_user)]


def visible(stmt: Select, column, user: User | Caller) -> Select:
    """Restrict a query to the caller's rows unless the caller is an admin."""
    return stmt if user.is_admin else stmt.where(column == user.id)


# Ids are uuid4 hex (app.models.new_id); anything else (a NUL byte, 10 kB of text) cannot
# name a row, so it is a 404 without a query (PostgreSQL would refuse a NUL with an error).
ID_PATTERN = re.compile(r"[0-9a-f]{32}")


def check_id(object_id: str, what: str) -> None:
    if not ID_PATTERN.fullmatch(object_id):
        shown = object_id if len(object_id) <= 40 else object_id[:40] + "..."
        raise NotFound(f"{what} {shown!r} not found (ids are 32 hex characters)")


def owned_row(session: Session, cls, object_id: str, user: User, what: str):
    check_id(object_id, what)
    row = session.get(cls, object_id)
    if row is None or (row.owner_id != user.id and not user.is_admin):
        # Another user's id answers exactly like a missing one.
        raise NotFound(f"{what} {object_id!r} not found")
    return row


def owned_job(session: SessionDep, user: CurrentUser,
              job_id: Annotated[str, Path(description="The job's id.")]) -> Job:
    return owned_row(session, Job, job_id, user, "job")


def owned_model(session: SessionDep, user: CurrentUser,
                model_id: Annotated[str, Path(description="The model's id.")]) -> ModelFile:
    return owned_row(session, ModelFile, model_id, user, "model")


def owned_dataset(
    session: SessionDep, user: CurrentUser,
    dataset_id: Annotated[str, Path(description="The dataset's id.")],
) -> Dataset:
    return owned_row(session, Dataset, dataset_id, user, "dataset")


def owned_sweep(session: SessionDep, user: CurrentUser,
                sweep_id: Annotated[str, Path(description="The sweep's id.")]) -> Sweep:
    return owned_row(session, Sweep, sweep_id, user, "sweep")


# The hot reads (a job, the job list) do all their database work in one call to
# app.db.Reads (`request.app.state.reads`): one hop to its threads, one round trip per query.


async def read_as_caller(request: Request, settings: Settings,
                         credentials: HTTPAuthorizationCredentials | None,
                         fn: Callable[[Connection, Caller], T]) -> T:
    """`fn(connection, caller)` after the key check (the same 401 and 429 as CurrentUser), on
    one connection of the hot reads (app.db.Reads)."""
    token = bearer_token(credentials)

    def body(connection: Connection) -> T:
        row = connection.execute(CALLER_FOR_KEY, {"key_hash": hash_key(token)}).first()
        return fn(connection, admit(request, settings, caller_of(row)))

    return await request.app.state.reads.run(body)


# The key's caller and the job in one round trip (the job's columns are NULL when no such id).
_KEY_AND_JOB = ReadQuery(CALLER_FOR_KEY.add_columns(*job_json.COLUMNS).outerjoin_from(
    User, Job.__table__, Job.__table__.c.id == bindparam("job_id")))
_CALLER_WIDTH = len(CALLER_FOR_KEY.selected_columns)


async def viewed_job(request: Request, settings: SettingsDep, credentials: Credentials,
                     job_id: Annotated[str, Path(description="The job's id.")]) -> bytes:
    """The caller's job as its JSON answer (app.job_json), for a route that only shows it;
    the same 401, 429 and 404 answers as CurrentUser then OwnedJob. The key check and the job
    are one query, one round trip (app.db.Reads)."""
    token = bearer_token(credentials)
    if not ID_PATTERN.fullmatch(job_id):
        # The key is checked first, as CurrentUser then OwnedJob would; then the 404.
        await read_as_caller(request, settings, credentials, lambda c, u: None)
        check_id(job_id, "job")

    def load(connection: Connection) -> bytes:
        found = _KEY_AND_JOB.rows(connection, {"key_hash": hash_key(token), "job_id": job_id})
        row = found[0] if found else None
        user = admit(request, settings, caller_of(row))
        job = row[_CALLER_WIDTH:]
        if job[job_json.ID] is None or (job[job_json.OWNER_ID] != user.id
                                        and not user.is_admin):
            raise NotFound(f"job {job_id!r} not found")  # as owned_row answers
        return job_json.job_json(job)

    return await request.app.state.reads.run(load)


OwnedJob = Annotated[Job, Depends(owned_job)]
ViewedJob = Annotated[bytes, Depends(viewed_job)]
OwnedSweep = Annotated[Sweep, Depends(owned_sweep)]
OwnedModel = Annotated[ModelFile, Depends(owned_model)]
OwnedDataset = Annotated[Dataset, Depends(owned_dataset)]
