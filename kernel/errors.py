"""Errors raised to callers. Each carries the HTTP status the API layer maps it to.

Torch-free, so the SDK can share the same classes.
"""

from __future__ import annotations


class AgentOSError(Exception):
    """Base of every error AgentOS raises on purpose."""

    status_code: int = 500
    type: str = "internal_error"

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message


class InvalidRequestError(AgentOSError, ValueError):
    """The caller's input is invalid; nothing was changed."""

    status_code = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """A prompt or generation does not fit the model's context window."""

    type = "context_length_exceeded"


class NotFoundError(AgentOSError, LookupError):
    """No such session or snapshot (or it was closed / deleted)."""

    status_code = 404
    type = "not_found_error"


class ConflictError(AgentOSError):
    """The session is in the wrong state for this call (e.g. it is generating)."""

    status_code = 409
    type = "conflict_error"


class OutOfCapacityError(AgentOSError):
    """Not enough KV memory (or other capacity) to serve the call now."""

    status_code = 503
    type = "capacity_error"


class EngineClosedError(AgentOSError):
    """The engine has been shut down."""

    status_code = 503
    type = "engine_closed"
