"""The FastAPI application: `create_app(settings)`; run with
`uvicorn app.main:create_app --factory` (or `mipp serve`)."""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.body_guard import JsonBodyGuard
from app.core.maintenance import MaintenanceReport, run_maintenance
from app.core.scratch import remove_abandoned
from app.db import Reads, make_engine, make_sessionmaker
from app.errors import install_error_handlers
from app.queue import JobQueue
from app.routes import datasets, health, jobs, models, sweeps, users
from app.settings import Settings, get_settings
from app.storage import make_store
from app.web import UI_PATH, mount_dashboard, mount_offline_docs, wants_html

API_PREFIX = "/api/v1"
API_THREADS = 256
log = logging.getLogger("mipp.api")


class BodySizeLimit:
    """Refuse bodies above `max_bytes` (413) before they are spooled: FastAPI has no limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")

        async def too_large(scope: Scope, receive: Receive, send: Send) -> None:
            answer = JSONResponse(
                {"detail": f"request body above the limit of {self.max_bytes} bytes",
                 "code": "too_large"},
                status_code=413,
            )
            await answer(scope, receive, send)

        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised from `receive` while a chunked body (no Content-Length) is read. An
    HTTPException, so FastAPI's body parser passes it on as the 413 it is (any other
    exception there becomes a 400 "error parsing the body")."""

    code = "too_large"

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body above the limit of {max_bytes} bytes")


class Maintenance:
    """Every `sweeper_interval_s`, one maintenance round (app.core.maintenance): sweep stale
    jobs, send unsent ones, reconcile lost messages, remove abandoned scratch folders."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mipp-maintenance", daemon=True)

    def _loop(self) -> None:
        settings: Settings = self.app.state.settings
        while not self.stop.wait(settings.sweeper_interval_s):
            try:
                maintain_once(self.app)
            except Exception:  # noqa: BLE001 - keep going; the next round may succeed
                log.exception("maintenance round failed")


def maintain_once(app: FastAPI) -> MaintenanceReport:
    state = app.state
    return run_maintenance(state.sessionmaker, state.queue, state.store, state.settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Every `def` route and dependency runs in anyio's thread pool (40 threads by
        # default), and a request keeps its database connection from its first query to the
        # end. With more waiting requests than threads, all threads could block on the
        # connection pool while the requests holding connections wait for a thread to go on:
        # a deadlock until the pool's 30 s timeout (seen at 50 concurrent clients). Threads
        # are cheap next to that; with this many, a holder always finds one.
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        # An API killed mid-upload left its scratch folder; remove it before serving.
        remove_abandoned(settings.tmp_dir)
        # Fewer, cheaper garbage collections: what the app allocated at start (routes,
        # models, compiled statements) is frozen out of every later collection, and the
        # young generation is collected every 50,000 allocations, not 700: a request
        # allocates thousands of short-lived objects, and each collection paused every
        # request of the process (the load benchmark's tail, BENCHMARKS.md §7).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, *gc.get_threshold()[1:])
        maintenance = None
        if settings.sweeper_interval_s > 0:
            maintenance = Maintenance(app)
            maintenance.thread.start()
        yield
        if maintenance is not None:
            maintenance.stop.set()
        app.state.engine.dispose()
        app.state.reads.dispose()

    app = FastAPI(
        title="mipp pruning service",
        version="0.1.0",
        summary="Upload a model and a dataset, run a pruning job on a GPU worker, download the result.",
        lifespan=lifespan,
        docs_url=None,  # served from local files by mount_offline_docs: no CDN
        redoc_url=None,  # not served: ReDoc's bundle loads its logo from a CDN
    )
    engine = make_engine(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.reads = Reads(settings.database_url, engine, settings.read_threads)
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.store = make_store(settings)
    app.state.queue = JobQueue(settings)
    install_error_handlers(app)

    api = APIRouter(prefix=API_PREFIX)
    for module in (users, models, datasets, jobs, sweeps):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)

    mount_offline_docs(app)
    mount_dashboard(app)

    @app.get("/", include_in_schema=False)
    async def root(request: Request):
        if wants_html(request):  # a browser: the dashboard
            return RedirectResponse(f"{request.scope.get('root_path', '')}{UI_PATH}/")
        return {"service": "mipp", "docs": "/docs", "dashboard": f"{UI_PATH}/", "api": API_PREFIX}

    app.add_middleware(JsonBodyGuard)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)
    return app
