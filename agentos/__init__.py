"""AgentOS: agent sessions as processes, the KV cache as paged virtual memory.

`import agentos` stays light (no torch): the engine's heavy imports happen when an
`Engine` is created, and `Client` needs only httpx.
"""

from agentos.backend import AsyncBackend, Backend
from agentos.kernel.errors import (
    AgentOSError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CodecError,
    ConflictError,
    ContextLengthError,
    EngineClosedError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    OutOfCapacityError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    StoreUnavailableError,
    UnprocessableEntityError,
)
from agentos.kernel.process import Generation, GenerationChunk
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import AsyncSession, Session, Snapshot

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIStatusError", "APITimeoutError", "AgentOSError", "AsyncBackend",
    "AsyncClient", "Backend",
    "AsyncEngine", "AsyncSession", "AuthenticationError", "BadRequestError", "Client", "CodecError",
    "ConflictError", "ContextLengthError", "Engine", "EngineClosedError", "Generation",
    "GenerationChunk", "InternalServerError", "InvalidRequestError", "NotFoundError",
    "OutOfCapacityError", "PayloadTooLargeError", "PermissionDeniedError", "RateLimitError",
    "SamplingParams", "Session", "Snapshot", "StoreUnavailableError", "UnprocessableEntityError",
]


def __getattr__(name: str):
    # Engine pulls in torch, Client pulls in httpx: import them only when asked for
    if name in ("Engine", "AsyncEngine"):
        from agentos import engine

        return getattr(engine, name)
    if name in ("Client", "AsyncClient"):
        from agentos import client

        return getattr(client, name)
    raise AttributeError(f"module 'agentos' has no attribute {name!r}")
