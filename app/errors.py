"""Domain errors and the one place that maps them (and engine errors) to HTTP answers.

A user-caused error is a 4xx with a message that names the problem; only bugs are 500s.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.storage import StoreError

log = logging.getLogger("mipp.api")


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class InvalidUpload(ServiceError):
    """An uploaded file is not what it claims to be; nothing was stored."""

    status_code = 422
    code = "invalid_upload"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class TooLarge(ServiceError):
    status_code = 413
    code = "too_large"


class QuotaExceeded(ServiceError):
    status_code = 429
    code = "quota_exceeded"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


def _answer(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "code": code}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    from mipp.errors import MippError  # pure Python, no torch

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return _answer(exc.status_code, exc.code, exc.message, headers)

    @app.exception_handler(MippError)
    async def _mipp_error(_req: Request, exc: MippError) -> JSONResponse:
        return _answer(422, type(exc).__name__.lower().replace("error", "_error"), str(exc))

    @app.exception_handler(StoreError)
    async def _store_error(_req: Request, exc: StoreError) -> JSONResponse:
        log.error("object store: %s", exc)
        return _answer(503, "store_unavailable", "the object store is unavailable; try again")

    @app.exception_handler(DBAPIError)
    async def _db_error(_req: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            log.error("database: %s", exc)
            return _answer(503, "database_unavailable", "the database is unavailable; try again")
        log.exception("database error")
        return _answer(500, "internal_error", "internal error (logged on the server)")

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _answer(500, "internal_error", "internal error (logged on the server)")
