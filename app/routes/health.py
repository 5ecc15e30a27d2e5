"""Liveness (/healthz) and readiness (/readyz: database, broker and store reachable)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import QueueDep, SessionDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the API process answers (no dependency is asked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Something is unreachable: the body "
                                       "says which ({ready: false, database, broker, store})."}})
def readyz(session: SessionDep, store: StoreDep, queue: QueueDep) -> JSONResponse:
    """Readiness: the database, the broker and the store each answer (200), else 503."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", lambda: session.execute(text("SELECT 1"))),
        ("broker", queue.check),
        ("store", store.check),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - report, do not raise
            checks[name] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
