"""AgentOS: agent sessions as processes, the KV cache as paged virtual memory.

`import agentos` stays light (no torch): the engine's heavy imports happen when an
`Engine` is created.
"""

from agentos.kernel.errors import (
    AgentOSError,
    ConflictError,
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    NotFoundError,
    OutOfCapacityError,
)
from agentos.kernel.process import Generation
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import AsyncSession, Session, Snapshot

__version__ = "0.1.0"

__all__ = [
    "AgentOSError", "AsyncEngine", "AsyncSession", "ConflictError", "ContextLengthError",
    "Engine", "EngineClosedError", "Generation", "InvalidRequestError", "NotFoundError",
    "OutOfCapacityError", "SamplingParams", "Session", "Snapshot",
]


def __getattr__(name: str):
    # Engine pulls in torch; import it only when asked for
    if name in ("Engine", "AsyncEngine"):
        from agentos import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'agentos' has no attribute {name!r}")
