"""Connection guards under uvicorn: a deadline for each request's headers and a cap on
open connections, so clients that connect and never finish a request (slowloris) cannot
hold the server's file descriptors and starve everyone else, /health included.

uvicorn closes a connection that stays idle after a response (`timeout_keep_alive`) but
waits forever for the headers of a request that has begun arriving, or for the first
byte of a new connection; the guard gives each request `header_timeout_s`
from the first moment it is awaited, however slowly its bytes trickle in. A connection
past `max_connections` makes room by closing the one that has waited longest for a
request's headers (so a client that sends its request at once, a health check, gets in
even while the cap is full of idle sockets), or is closed itself when every other
connection is busy with a request.

The guard goes on either of uvicorn's HTTP/1.1 protocols: httptools (a C parser, about a
third of h11's CPU per request: what a flood of cheap requests costs the interpreter the
engine thread shares) when it is installed, else h11 (pure Python). `guarded_protocol`
picks one.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HTTP_PROTOCOLS = ("auto", "httptools", "h11")


def guarded_protocol(kind: str, header_timeout_s: float, max_connections: int) -> type:
    """The guarded protocol class for uvicorn's `http=`: "httptools", "h11", or "auto"
    (httptools when it is installed). Raises ValueError for another kind, or httptools
    asked for and missing."""
    if kind not in HTTP_PROTOCOLS:
        raise ValueError(f"--http must be one of {', '.join(HTTP_PROTOCOLS)}, got {kind!r}")
    has_httptools = importlib.util.find_spec("httptools") is not None
    if kind == "httptools" and not has_httptools:
        raise ValueError("--http httptools: the httptools package is not installed")
    if kind == "h11" or not has_httptools:
        base: type = GuardedH11Protocol
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = type("GuardedHttpToolsProtocol", (_Guard, HttpToolsProtocol), {})
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s,
                                         "max_connections": max_connections})


class _Guard:
    """The header deadline and the connection cap, over a uvicorn HTTP protocol (the class
    after this one in the MRO): both keep `cycle` (the request in progress; None before
    the first), `connections`, `transport`, `loop` and `logger`."""

    header_timeout_s: float = 10.0
    max_connections: int = 4096
    cycle: Any
    connections: set
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    logger: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()
        if len(self.connections) > self.max_connections:
            self._close_longest_waiting()

    def _close_longest_waiting(self) -> None:
        """Closes the connection waiting longest for a request (this one if none is)."""
        waiting = [c for c in self.connections if isinstance(c, _Guard)
                   and c is not self and c._awaiting_request() and not c.transport.is_closing()]
        victim = min(waiting, key=_Guard._waiting_since, default=self)
        self.logger.warning("over %d open connections: closing one waiting for a request",
                            self.max_connections)
        victim._disarm()
        victim.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._awaiting_request():
            self._arm()  # a partial request: its deadline runs from its first byte
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _awaiting_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _waiting_since(self) -> float:
        """When its wait for the next request's headers began (idle ones count as oldest)."""
        return self._header_deadline.when() if self._header_deadline is not None else 0.0

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if self._awaiting_request() and not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(_Guard, H11Protocol):
    pass
