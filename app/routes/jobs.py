"""Jobs: submit, list, get, cancel, per-layer results, artifacts.

Submit writes the row (queued), commits, then enqueues only the id: the row is the truth.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.deps import (
    CurrentUser,
    OwnedJob,
    QueueDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    owned_row,
    visible,
)
from app.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, Unavailable
from app.jobs import request_cancel
from app.models import Dataset, Job, JobStatus, ModelFile, utcnow
from app.routes.common import Limit, Offset, check_text, page
from app.schemas import ArtifactOut, JobIn, JobOut, LayerOut, Page

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _check_compatible(model: ModelFile, dataset: Dataset) -> None:
    summary = dataset.summary or {}
    data_shape = summary.get("input_shape")
    if model.input_shape and data_shape and list(model.input_shape) != list(data_shape):
        raise InvalidRequest(
            f"model {model.id!r} takes input_shape {list(model.input_shape)} but dataset "
            f"{dataset.id!r} has samples of shape {list(data_shape)}"
        )
    data_classes = summary.get("num_classes")
    if model.num_classes and data_classes and data_classes > model.num_classes:
        raise InvalidRequest(
            f"model {model.id!r} has {model.num_classes} outputs but dataset {dataset.id!r} "
            f"has labels up to {data_classes - 1}"
        )


@router.post("", response_model=JobOut, status_code=201)
def submit_job(
    body: JobIn,
    user: CurrentUser,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    response: Response,
):
    check_text(body.idempotency_key, "idempotency_key", 100)
    if body.idempotency_key:
        existing = session.scalar(
            select(Job).where(Job.owner_id == user.id, Job.idempotency_key == body.idempotency_key)
        )
        if existing is not None:
            response.status_code = 200
            return existing
    model = owned_row(session, ModelFile, body.model_id, user, "model")
    dataset = owned_row(session, Dataset, body.dataset_id, user, "dataset")
    _check_compatible(model, dataset)
    queue_name = body.queue or settings.default_queue
    if queue_name not in settings.all_queues:
        raise InvalidRequest(
            f"queue {queue_name!r} does not exist; choose one of {', '.join(settings.all_queues)}"
        )
    time_limit = body.time_limit_s or settings.job_time_limit_s
    if time_limit > settings.job_time_limit_s:
        raise InvalidRequest(
            f"time_limit_s {time_limit} is above the server's limit of {settings.job_time_limit_s}"
        )
    active = session.scalar(
        select(func.count()).where(Job.owner_id == user.id, Job.status.in_(JobStatus.ACTIVE))
    )
    if active >= settings.max_active_jobs_per_user:
        raise QuotaExceeded(
            f"you have {active} queued or running jobs (limit {settings.max_active_jobs_per_user});"
            " wait for some to finish or cancel them"
        )
    job = Job(
        owner_id=user.id,
        model_id=model.id,
        dataset_id=dataset.id,
        idempotency_key=body.idempotency_key,
        config=body.config.model_dump(mode="json"),
        queue=queue_name,
        time_limit_s=time_limit,
        status=JobStatus.QUEUED,
        phase=JobStatus.QUEUED,
        message="waiting for a worker",
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two submits with one idempotency key raced; the other one's row wins.
        session.rollback()
        existing = session.scalar(
            select(Job).where(Job.owner_id == user.id, Job.idempotency_key == body.idempotency_key)
        )
        if existing is None:
            raise
        response.status_code = 200
        return existing
    try:
        queue.enqueue(job.id, queue_name, time_limit)
    except Exception as exc:
        job.status, job.phase = JobStatus.FAILED, JobStatus.FAILED
        job.error = f"could not enqueue the job: the broker is unreachable ({type(exc).__name__})"
        job.finished_at = utcnow()
        session.commit()
        raise Unavailable("the job queue is unavailable; try again shortly") from exc
    job.enqueued_at = utcnow()
    session.commit()
    return job


@router.get("", response_model=Page[JobOut])
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    status: Annotated[list[str] | None, Query(description="Filter; repeat for several.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
):
    stmt = visible(select(Job), Job.owner_id, user)
    if status:
        unknown = sorted(set(status) - set(JobStatus.ALL))
        if unknown:
            raise InvalidRequest(
                f"unknown status {', '.join(unknown)}; choose from {', '.join(JobStatus.ALL)}"
            )
        stmt = stmt.where(Job.status.in_(status))
    items, total = page(session, stmt, Job.created_at.desc(), limit, offset)
    return Page[JobOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: OwnedJob):
    return job


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job: OwnedJob, session: SessionDep):
    if job.status in JobStatus.FINAL:
        raise Conflict(f"job {job.id!r} already ended ({job.status}); nothing to cancel")
    request_cancel(session, job)
    return job


@router.get("/{job_id}/layers", response_model=list[LayerOut])
def job_layers(job: OwnedJob):
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


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job: OwnedJob, request: Request):
    return [_artifact_out(request, job, a) for a in job.artifacts]


@router.get("/{job_id}/artifacts/{name}", name="download_artifact")
def download_artifact(job: OwnedJob, name: str, store: StoreDep, settings: SettingsDep):
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        names = ", ".join(a.name for a in job.artifacts) or "none yet"
        raise NotFound(f"job {job.id!r} has no artifact {name!r} (it has: {names})")
    path = store.local_path(artifact.store_key)
    if path is not None:
        return FileResponse(path, media_type=artifact.content_type, filename=name)
    url = store.presign_get(artifact.store_key, name, settings.presign_ttl_s)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    body = store.open_stream(artifact.store_key)
    return StreamingResponse(
        body.iter_chunks(1024 * 1024) if hasattr(body, "iter_chunks") else body,
        media_type=artifact.content_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
