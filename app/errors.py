"""The one place that maps domain errors (app.core.errors), engine errors and framework
errors to HTTP answers.

A user-caused error is a 4xx with a message that names the problem; only bugs are 500s.
Every error answer has one shape: `{"detail": str, "code": str, "errors"?: [...]}`, where
`errors` (validation only) lists `{"loc", "msg", "type"}` per bad field.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException

from app.core.errors import (  # noqa: F401 - the routes import them from here
    ServiceError,
    NotFound,
    InvalidUpload,
    InvalidRequest,
    Conflict,
    TooLarge,
    QuotaExceeded,
    Unavailable,
    Unauthorized,
    Forbidden,
)
from app.storage import StoreError


class StorageQuotaExceeded(TooLarge):
    """An upload would put the user above their storage quota (app.limits)."""

    code = "storage_quota_exceeded"


class RateLimited(ServiceError):
    """An API key sent more requests than its rate allows (app.limits); carries Retry-After."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}

log = logging.getLogger("mipp.api")


# Codes of the HTTP errors Starlette/FastAPI raise themselves (unknown route, wrong method...).
HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 413: "too_large",
    415: "unsupported_media_type", 422: "invalid_request", 429: "quota_exceeded",
}  # fmt: skip
# FastAPI's own message when a body is neither valid JSON nor a parsable form.
_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def error_body(code: str, message: str, errors: list | None = None) -> dict:
    body = {"detail": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return body


def _answer(status: int, code: str, message: str, headers: dict | None = None,
            errors: list | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, errors), status_code=status, headers=headers)


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def validation_errors(raw: list[dict]) -> list[dict]:
    """Pydantic's errors without `input` and `ctx`: they can hold NaN, bytes or exception
    objects that JSON cannot carry (a NaN once made the 422 itself a 500)."""
    return [
        {"loc": [p if isinstance(p, int | str) else str(p) for p in e.get("loc", ())],
         "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in raw
    ]


def validation_summary(errors: list[dict]) -> str:
    shown = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid request: {shown}{more}"


def install_error_handlers(app: FastAPI) -> None:
    from mipp.errors import MippError  # pure Python, no torch

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        headers = getattr(exc, "headers", None) or headers
        return _answer(exc.status_code, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        return _answer(422, "validation_error", validation_summary(errors), errors=errors)

    @app.exception_handler(HTTPException)
    async def _http_error(_req: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # A body that cannot be parsed: FastAPI's JSON/form parse error, or Starlette's
            # multipart parser (e.g. "Missing boundary in multipart."). A malformed body is a
            # 422 like every other one.
            cause = exc.__cause__
            if exc.detail == _FASTAPI_PARSE_ERROR:
                why = f" ({type(cause).__name__}: {str(cause)[:200]})" if cause else ""
            else:
                why = f" ({str(exc.detail)[:200]})"
            return _answer(
                422, "malformed_body",
                f"the request body could not be parsed{why}; send JSON (UTF-8) or a "
                "multipart form as the route's schema says",
            )
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "http_error")
        return _answer(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(MippError)
    async def _mipp_error(_req: Request, exc: MippError) -> JSONResponse:
        return _answer(422, type(exc).__name__.lower().replace("error", "_error"), str(exc))

    @app.exception_handler(StoreError)
    async def _store_error(_req: Request, exc: StoreError) -> JSONResponse:
        log.error("object store: %s", exc)
        return _answer(503, "store_unavailable", "the object store is unavailable; try again")

    @app.exception_handler(DBAPIError)
    async def _db_error(_req: Request, exc: DBAPIError) -> JSONResponse:
        if isinstance(exc, DataError):
            # The database refused a value (a NUL byte, a number out of range, a string too
            # long): the request's fault. The routes check these first; this is the backstop.
            log.warning("database refused a value: %s", exc.orig)
            return _answer(
                422, "invalid_request",
                f"a value in the request cannot be stored ({str(exc.orig).splitlines()[0][:200]});"
                " remove NUL bytes and keep numbers and names within the documented limits",
            )
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            log.error("database: %s", exc)
            return _answer(503, "database_unavailable", "the database is unavailable; try again")
        log.exception("database error")
        return _answer(500, "internal_error", "internal error (logged on the server)")

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _answer(500, "internal_error", "internal error (logged on the server)")
