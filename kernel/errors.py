"""Errors raised to callers, in-process and over HTTP alike. Torch-free.

The tree:

    AgentOSError
    ├── APIStatusError              carries the HTTP status the API layer answers with
    │   ├── InvalidRequestError     400 (also a ValueError)
    │   │   ├── ContextLengthError  400
    │   │   ├── CodecError          400 (a record is corrupted or of another format version)
    │   │   └── UnprocessableEntityError  422 (request body fails its schema)
    │   ├── AuthenticationError     401
    │   ├── PermissionDeniedError   403
    │   ├── NotFoundError           404 (also a LookupError)
    │   ├── ConflictError           409
    │   ├── PayloadTooLargeError    413
    │   ├── RateLimitError          429
    │   ├── InternalServerError     500
    │   └── OutOfCapacityError      503
    │       ├── EngineClosedError   503
    │       └── StoreUnavailableError  503 (the durable store, Redis, cannot be reached)
    └── APIConnectionError          the server could not be reached (SDK only)
        └── APITimeoutError

The engine raises these classes directly; the SDK raises the same ones from the error
body's `type` (or the status code), so `except agentos.NotFoundError` works either way.
"""

from __future__ import annotations

from typing import Any


class AgentOSError(Exception):
    """Base of every error AgentOS raises on purpose."""

    status_code: int = 500
    type: str = "internal_error"

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message


class APIStatusError(AgentOSError):
    """An error answered with an HTTP status (`status_code`); `body` is the error body
    when it came over HTTP."""

    def __init__(self, message: str = "", status_code: int | None = None, body: Any = None):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.body = body


class InvalidRequestError(APIStatusError, ValueError):
    """The caller's input is invalid; nothing was changed."""

    status_code = 400
    type = "invalid_request_error"


BadRequestError = InvalidRequestError


class ContextLengthError(InvalidRequestError):
    """A prompt or generation does not fit the model's context window."""

    type = "context_length_exceeded"


class UnprocessableEntityError(InvalidRequestError):
    """The request body does not match its schema (missing field, wrong type)."""

    status_code = 422
    type = "validation_error"


class AuthenticationError(APIStatusError):
    """No API key, or an unknown one."""

    status_code = 401
    type = "authentication_error"


class PermissionDeniedError(APIStatusError):
    status_code = 403
    type = "permission_denied"


class NotFoundError(APIStatusError, LookupError):
    """No such session or snapshot (or it was closed / deleted, or belongs to another
    tenant)."""

    status_code = 404
    type = "not_found_error"


class ConflictError(APIStatusError):
    """The session is in the wrong state for this call (e.g. it is generating)."""

    status_code = 409
    type = "conflict_error"


class PayloadTooLargeError(APIStatusError):
    status_code = 413
    type = "payload_too_large"


class RateLimitError(APIStatusError):
    """A tenant's limit (live sessions, tokens) would be exceeded; nothing was changed."""

    status_code = 429
    type = "rate_limit_error"


class InternalServerError(APIStatusError):
    status_code = 500
    type = "internal_error"


class OutOfCapacityError(APIStatusError):
    """Not enough KV memory (or other capacity) to serve the call now; nothing was
    changed, so the call may be retried."""

    status_code = 503
    type = "capacity_error"


class EngineClosedError(OutOfCapacityError):
    """The engine has been shut down."""

    type = "engine_closed"


class StoreUnavailableError(OutOfCapacityError):
    """The durable store (Redis) cannot be reached: a change that must be durable is
    refused (or, if it was already applied in memory, not acknowledged). Retry later."""

    type = "store_unavailable"


class CodecError(InvalidRequestError):
    """A session or snapshot record is corrupted (checksum), truncated, or written by an
    incompatible format version; nothing was loaded from it."""

    type = "invalid_record"


class APIConnectionError(AgentOSError):
    """The server could not be reached, or the connection broke (SDK only)."""

    type = "connection_error"


class APITimeoutError(APIConnectionError):
    type = "timeout"


_BY_TYPE: dict[str, type[APIStatusError]] = {
    c.type: c for c in (ContextLengthError, UnprocessableEntityError, EngineClosedError,
                        StoreUnavailableError, CodecError)}
_BY_STATUS: dict[int, type[APIStatusError]] = {
    c.status_code: c for c in (InvalidRequestError, AuthenticationError, PermissionDeniedError,
                               NotFoundError, ConflictError, PayloadTooLargeError,
                               RateLimitError, InternalServerError, OutOfCapacityError)}
_BY_STATUS[422] = UnprocessableEntityError


def error_from_status(status_code: int, body: Any) -> APIStatusError:
    """The error for an HTTP answer `{"error": {"type", "message"}}` with this status."""
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or body or f"HTTP {status_code}")
    cls = _BY_TYPE.get(err.get("type"))
    if cls is None or cls.status_code != status_code:
        cls = _BY_STATUS.get(status_code, APIStatusError)
    return cls(message, status_code=status_code, body=body)
