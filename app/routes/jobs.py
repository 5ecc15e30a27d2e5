"""Jobs: submit, list, get, cancel, delete, per-layer results, artifacts, log.

HTTP only: every state change of a job is a call into app.core.jobs.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy import bindparam, select

from app import job_json
from app.core import jobs
from app.core.housekeeping import delete_job_files
from app.core.jobs import JobRequest
from app.deps import (Credentials, CurrentUser, OwnedJob, QueueDep, SessionDep,
                      SettingsDep, StoreDep, ViewedJob, admit, bearer_token, read_as_caller)
from app.errors import InvalidRequest, NotFound
from app.models import ApiKey, Job, JobLogLine, JobStatus
from app.routes.common import (AUTHENTICATED, Limit, Offset, PagedQuery, check_text,
                               error_responses)
from app.schemas import ArtifactOut, JobIn, JobOut, LayerOut, Page
from app.security import CALLER_FOR_KEY, caller_of, hash_key

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=AUTHENTICATED)


@router.post("", response_model=JobOut, status_code=201,
             responses={200: {"model": JobOut, "description": "The job this idempotency key "
                              "already made (same body)."}, **error_responses(404, 409, 422)})
def submit_job(
    body: JobIn,
    user: CurrentUser,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    response: Response,
):
    """Queue a pruning job of a model on a dataset. 429 when you already have the most
    queued + running jobs the server allows; 409 when `idempotency_key` was used with another
    body."""
    check_text(body.idempotency_key, "idempotency_key", 100)
    request = JobRequest(
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        config=body.config.model_dump(mode="json"),
        queue=body.queue,
        time_limit_s=body.time_limit_s,
        idempotency_key=body.idempotency_key,
    )
    job, created = jobs.submit_job(session, queue, settings, user, request)
    if not created:
        response.status_code = 200  # the idempotency key's own job
    return job


_FILTERS = {"sweep_id": Job.sweep_id, "model_id": Job.model_id, "dataset_id": Job.dataset_id}
# The caller's user, as the list's own filter (the key check's row comes with the page).
_KEY_USER = (select(ApiKey.user_id)
             .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked.is_(False))
             .scalar_subquery())


@lru_cache(maxsize=2 * (len(JobStatus.ALL) + 1) * 2 ** len(_FILTERS))  # every combination
def _jobs_query(own: bool, statuses: int, filters: tuple[str, ...]) -> PagedQuery:
    """The job list's query for one combination of filters and number of statuses asked for
    (parameters status0, status1, ...: a plain parameter each, not an expanding list, so it
    runs as an app.db.ReadQuery), built once: the key check and the page in one query."""
    stmt = select(*job_json.COLUMNS)
    if own:
        stmt = stmt.where(Job.owner_id == _KEY_USER)
    if statuses:
        stmt = stmt.where(Job.status.in_([bindparam(f"status{i}") for i in range(statuses)]))
    for name in filters:
        stmt = stmt.where(_FILTERS[name] == bindparam(name))
    return PagedQuery(stmt, Job.id, (Job.created_at, Job.id), caller=CALLER_FOR_KEY)


# Key hashes last seen to be an admin's: an admin's list has no owner filter, and which query
# to send is known only from the key check's row, which comes with the page. A wrong guess
# (an admin's first list, a key whose user changed rank) is seen in that row and the list is
# read again with the right query, so the answer is always exact.
_admin_keys: set[str] = set()


@router.get("", response_model=Page[JobOut], responses=error_responses(422))
async def list_jobs(
    request: Request,
    settings: SettingsDep,
    credentials: Credentials,
    status: Annotated[list[str] | None, Query(description="Filter; repeat for several.")] = None,
    sweep_id: Annotated[str | None, Query(description="Only the jobs of this sweep.")] = None,
    model_id: Annotated[str | None, Query(
        description="Only the jobs of this model (a deleted one's too).")] = None,
    dataset_id: Annotated[str | None, Query(
        description="Only the jobs of this dataset (a deleted one's too).")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
):
    """Your jobs (an admin: everyone's), newest first."""
    if status:
        unknown = sorted(set(status) - set(JobStatus.ALL))
        if unknown:
            await read_as_caller(request, settings, credentials, lambda c, u: None)  # 401 first
            raise InvalidRequest(
                f"unknown status {', '.join(unknown)}; choose from {', '.join(JobStatus.ALL)}"
            )
    filters = {name: value for name, value in (("sweep_id", sweep_id), ("model_id", model_id),
                                               ("dataset_id", dataset_id)) if value}
    key_hash = hash_key(bearer_token(credentials))
    statuses = sorted(set(status or ()))
    params = {**filters, "key_hash": key_hash,
              **{f"status{i}": value for i, value in enumerate(statuses)}}

    def load(connection) -> bytes:
        # One query on the reads' thread: the key check's row and the page (with its total),
        # the columns an answer shows as rows, rendered by app.job_json.
        admin = key_hash in _admin_keys
        for _ in range(2):
            query = _jobs_query(not admin, len(statuses), tuple(filters))
            caller, rows, total = query.run(connection, params, limit, offset)
            if caller is None or caller[2] == admin:
                break
            admin = caller[2]  # the guess was wrong: the other query
        (_admin_keys.add if admin else _admin_keys.discard)(key_hash)
        admit(request, settings, caller_of(caller))
        return job_json.page_json(rows, total, limit, offset)

    return Response(await request.app.state.reads.run(load), media_type="application/json")


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404, 422))
async def get_job(job: ViewedJob):
    """One job: status, phase, progress and ETA, then its metrics, tol and units per layer."""
    # The dependency has read and rendered it (app.job_json): the bytes are the answer.
    return Response(job, media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses=error_responses(404, 409, 422))
def cancel_job(job: OwnedJob, session: SessionDep):
    """Cancel a queued job at once; a running one stops at its next step. 409 once ended."""
    jobs.request_cancel(session, job)
    return job


@router.delete("/{job_id}", status_code=204, responses=error_responses(404, 409, 422))
def delete_job(job: OwnedJob, session: SessionDep, store: StoreDep) -> Response:
    """Delete an ended job: its row, layers, log and every file it stored. A queued or
    running job answers 409: cancel it first."""
    prefix = jobs.delete_ended_job(session, job.id)
    # The row is gone first; files a store outage keeps are the garbage collection's.
    delete_job_files(store, [prefix])
    return Response(status_code=204)


@router.get("/{job_id}/layers", response_model=list[LayerOut],
            responses=error_responses(404, 422))
def job_layers(job: OwnedJob):
    """Per-layer units before and after, with the engine's MI-loss figures."""
    return job.layers


def _artifact_out(request: Request, job: Job, artifact) -> ArtifactOut:
    url = str(request.url_for("download_artifact", job_id=job.id, name=artifact.name).path)
    return ArtifactOut(
        name=artifact.name,
        size_bytes=artifact.size_bytes,
        sha256=artifact.sha256,
        content_type=artifact.content_type,
        created_at=artifact.created_at,
        url=url,
    )


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut],
            responses=error_responses(404, 422))
def list_artifacts(job: OwnedJob, request: Request):
    """The files the job wrote (model.tar.gz, model.onnx, report.json, log.txt, ...)."""
    return [_artifact_out(request, job, a) for a in job.artifacts]


BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/{job_id}/artifacts/{name}",
    name="download_artifact",
    response_class=Response,
    responses={
        200: {"description": "The file, with its own media type (Content-Disposition: "
                             "attachment).",
              "content": {"application/octet-stream": BINARY, "application/gzip": BINARY,
                          "application/json": BINARY, "text/plain": BINARY}},
        307: {"description": "Redirect to a presigned store URL (S3 with presigned "
                             "downloads on); follow it without the Authorization header."},
        **error_responses(404, 422),
    },
)
def download_artifact(
    job: OwnedJob,
    name: Annotated[str, FastAPIPath(description="Artifact name, e.g. model.tar.gz.")],
    store: StoreDep,
    settings: SettingsDep,
    redirect: Annotated[bool, Query(
        description="false: the bytes through the API even where the store presigns "
                    "downloads (the dashboard asks so: a page cannot follow a 307 to the store)."
    )] = True,
):
    """Download one artifact: the bytes (or a 307 to the store). 503 when the store is down."""
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        names = ", ".join(a.name for a in job.artifacts) or "none yet"
        raise NotFound(f"job {job.id!r} has no artifact {name!r} (it has: {names})")
    # Asked before redirecting: with the store down the answer is 503, not a 307 to a dead host.
    if not store.exists(artifact.store_key):
        raise NotFound(f"the stored file of artifact {name!r} of job {job.id!r} is missing")
    path = store.local_path(artifact.store_key)
    if path is not None:
        return FileResponse(path, media_type=artifact.content_type, filename=name)
    url = store.presign_get(artifact.store_key, name, settings.presign_ttl_s) if redirect else None
    if url is not None:
        return RedirectResponse(url, status_code=307)
    body = store.open_stream(artifact.store_key)
    return StreamingResponse(
        body.iter_chunks(1024 * 1024) if hasattr(body, "iter_chunks") else body,
        media_type=artifact.content_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


LOG_POLL_S = 0.5
LOG_BATCH = 1000


def _log_lines_after(sessionmaker, job_id: str, last_id: int) -> tuple[str | None, list]:
    """The job's status, then its log lines with id > last_id. Status first: once it reads
    final, every line the worker wrote before finishing is already committed."""
    with sessionmaker() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        lines = session.execute(
            select(JobLogLine.id, JobLogLine.line)
            .where(JobLogLine.job_id == job_id, JobLogLine.id > last_id)
            .order_by(JobLogLine.id)
            .limit(LOG_BATCH)
        ).all()
    return status, lines


@router.get(
    "/{job_id}/log",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "The log, one line each."}, **error_responses(404, 422)},
)
async def job_log(
    job: OwnedJob,
    request: Request,
    follow: Annotated[bool, Query(description="Keep the response open and send lines as the "
                                              "worker writes them, until the job ends.")] = False,
):
    """The job's log as plain text: what the worker has written so far (all of it once the job
    has ended; also kept as the artifact log.txt). With follow=true, a chunked stream."""
    sessionmaker, job_id = request.app.state.sessionmaker, job.id

    async def lines():
        last_id = 0
        while True:
            status, batch = await run_in_threadpool(_log_lines_after, sessionmaker, job_id, last_id)
            if batch:
                last_id = batch[-1][0]
                yield "".join(f"{line}\n" for _, line in batch)
            if len(batch) == LOG_BATCH:
                continue
            if not follow or status is None or status in JobStatus.FINAL:
                return
            await asyncio.sleep(LOG_POLL_S)

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
