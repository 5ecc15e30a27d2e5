"""Sweeps: one submission of a model and a dataset with several targets (or tols), methods
and seeds. It creates one child job per combination and reports them together: a table
(GET /sweeps/{id}) and a plot of accuracy against units removed, params and MACs (plot.svg).
"""

from __future__ import annotations

import itertools

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from sqlalchemy import select

from app.core import jobs
from app.deps import CurrentUser, OwnedSweep, QueueDep, SessionDep, SettingsDep, visible
from app.errors import InvalidRequest
from app.models import Job, JobStatus, ModelFile, Sweep
from app.routes.common import AUTHENTICATED, Limit, Offset, check_text, error_responses, page
from app.schemas import Page, SweepIn, SweepOut, SweepRow
from app.sweep_plot import sweep_svg
from mipp.config import PruneConfig

router = APIRouter(prefix="/sweeps", tags=["sweeps"], responses=AUTHENTICATED)

MAX_JOBS_PER_SWEEP = 100


def child_configs(body: SweepIn) -> list[PruneConfig]:
    """One PruneConfig per method x (target or tol) x seed, each validated like a job's."""
    if bool(body.targets) == bool(body.tols):
        raise InvalidRequest("give exactly one of `targets` (fractions of units to remove) or "
                             "`tols` (MIPP tolerances)")
    if body.tols and any(m != "mipp" for m in body.methods):
        raise InvalidRequest("tols: only method mipp takes a tol; give `targets` to compare "
                             f"with {', '.join(m for m in body.methods if m != 'mipp')}")
    knobs = [("target", t) for t in body.targets] if body.targets else [("tol", t) for t in body.tols]
    combos = list(itertools.product(dict.fromkeys(body.methods), knobs, dict.fromkeys(body.seeds)))
    if len(combos) > MAX_JOBS_PER_SWEEP:
        raise InvalidRequest(f"this sweep makes {len(combos)} jobs; the most is "
                             f"{MAX_JOBS_PER_SWEEP} (fewer targets, methods or seeds)")
    base = body.config.model_dump()
    configs = []
    for method, (knob, value), seed in combos:
        fields = {**base, "method": method, "seed": seed, knob: value}
        if knob == "tol":
            fields["target"] = None
        try:
            configs.append(PruneConfig.model_validate(fields))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or knob}: {e['msg']}"
                                 for e in exc.errors())
            raise InvalidRequest(f"{knob}s: {value} with method {method}: {problems}") from None
    return configs


@router.post("", response_model=SweepOut, status_code=201, responses=error_responses(404, 422))
def submit_sweep(body: SweepIn, user: CurrentUser, session: SessionDep, queue: QueueDep,
                 settings: SettingsDep, request: Request):
    """One job per method x (target or tol) x seed, reported together. 429 when they would
    put you above the active-jobs limit."""
    check_text(body.name, "name", 200)
    configs = child_configs(body)
    name = body.name
    if not name:
        model = session.get(ModelFile, body.model_id)
        knob = f"{len(body.targets)} targets" if body.targets else f"{len(body.tols)} tols"
        name = (f"{model.name if model is not None else body.model_id}: "
                f"{', '.join(dict.fromkeys(body.methods))} x {knob}")[:200]
    sweep = jobs.submit_sweep(
        session, queue, settings, user, model_id=body.model_id, dataset_id=body.dataset_id,
        configs=[c.model_dump(mode="json") for c in configs], queue_name=body.queue,
        time_limit_s=body.time_limit_s, name=name,
        spec=body.model_dump(mode="json", exclude={"model_id", "dataset_id"}),
    )
    return sweep_out(sweep, request)


def _row(job: Job) -> SweepRow:
    config, metrics = job.config or {}, job.metrics or {}
    acc = metrics.get("accuracy") or {}
    params, macs = metrics.get("params") or {}, metrics.get("macs") or {}
    method = config.get("method", "mipp")
    return SweepRow(
        job_id=job.id, method=method, target=config.get("target"),
        tol=job.tol if job.tol is not None else (config.get("tol") if method == "mipp" else None),
        seed=config.get("seed", 0), status=job.status, phase=job.phase, progress=job.progress,
        error=job.error,
        units_removed_fraction=(metrics.get("units") or {}).get("removed_fraction"),
        params_before=params.get("before"), params_after=params.get("after"),
        macs_before=macs.get("before"), macs_after=macs.get("after"),
        accuracy_dense=acc.get("dense"), accuracy_pruned=acc.get("pruned_no_refit"),
        accuracy_refit=acc.get("pruned"), accuracy_retrained=acc.get("retrained"),
    )


def sweep_status(statuses: list[str]) -> str:
    if any(s == JobStatus.RUNNING for s in statuses):
        return JobStatus.RUNNING
    if any(s == JobStatus.QUEUED for s in statuses):
        # Some ended, some wait: the sweep as a whole is under way.
        return JobStatus.QUEUED if all(s == JobStatus.QUEUED for s in statuses) else JobStatus.RUNNING
    if statuses and all(s == JobStatus.SUCCEEDED for s in statuses):
        return JobStatus.SUCCEEDED
    if statuses and all(s == JobStatus.CANCELLED for s in statuses):
        return JobStatus.CANCELLED
    return JobStatus.FAILED


def sweep_out(sweep: Sweep, request: Request) -> SweepOut:
    rows = [_row(job) for job in sweep.jobs]
    counts = {status: 0 for status in JobStatus.ALL}
    for row in rows:
        counts[row.status] += 1
    return SweepOut(
        id=sweep.id, owner_id=sweep.owner_id, name=sweep.name, model_id=sweep.model_id,
        dataset_id=sweep.dataset_id, spec=sweep.spec, created_at=sweep.created_at,
        status=sweep_status([r.status for r in rows]), counts=counts, rows=rows,
        plot_url=str(request.url_for("sweep_plot", sweep_id=sweep.id).path),
    )


@router.get("", response_model=Page[SweepOut], responses=error_responses(422))
def list_sweeps(user: CurrentUser, session: SessionDep, request: Request, limit: Limit = 20,
                offset: Offset = 0):
    """Your sweeps (an admin: everyone's), newest first, each with its table."""
    stmt = visible(select(Sweep), Sweep.owner_id, user)
    items, total = page(session, stmt, Sweep.created_at.desc(), limit, offset)
    return Page[SweepOut](items=[sweep_out(s, request) for s in items], total=total, limit=limit,
                          offset=offset)


@router.get("/{sweep_id}", response_model=SweepOut, responses=error_responses(404, 422))
def get_sweep(sweep: OwnedSweep, request: Request):
    """One sweep: its status, counts per status, and a row of figures per job."""
    return sweep_out(sweep, request)


@router.post("/{sweep_id}/cancel", response_model=SweepOut, responses=error_responses(404, 422))
def cancel_sweep(sweep: OwnedSweep, session: SessionDep, request: Request):
    """Cancel the sweep's queued jobs at once and flag its running ones; ended jobs stay."""
    jobs.cancel_sweep(session, sweep)
    session.refresh(sweep)
    return sweep_out(sweep, request)


@router.get(
    "/{sweep_id}/plot.svg",
    name="sweep_plot",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}},
                     "description": "Accuracy vs units removed, params and MACs, per method."},
               **error_responses(404, 422)},
)
def sweep_plot(sweep: OwnedSweep):
    """The sweep's plot as SVG: accuracy against units removed, params and MACs."""
    rows = [_row(job).model_dump() for job in sweep.jobs]
    return Response(sweep_svg(rows, sweep.name), media_type="image/svg+xml")
