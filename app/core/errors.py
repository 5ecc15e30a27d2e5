"""Domain errors of the service: raised by the core (app.core) and by the routes, mapped to
HTTP answers in one place (app.errors.install_error_handlers). No FastAPI here: the worker
imports the core.
"""

from __future__ import annotations


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
