"""Connection guards under uvicorn: a deadline for each request's headers and a cap on
open connections, so clients that connect and never finish a request (slowloris) cannot
hold the server's file descriptors and starve everyone else, /health included.

uvicorn closes a connection that stays idle after a response (`timeout_keep_alive`) but
waits forever for the headers of a request that has begun arriving, or for the first
byte of a new connection; `GuardedH11Protocol` gives each request `header_timeout_s`
from the first moment it is awaited, however slowly its bytes trickle in. A connection
past `max_connections` makes room by closing the one that has waited longest for a
request's headers (so a client that sends its request at once, a health check, gets in
even while the cap is full of idle sockets), or is closed itself when every other
connection is busy with a request.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 4096

    @classmethod
    def configured(cls, header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
        """This protocol with its limits (uvicorn builds one instance per connection)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s,
                                           "max_connections": max_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._close_longest_waiting()

    def _close_longest_waiting(self) -> None:
        """Closes the connection waiting longest for a request (this one if none is)."""
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol)
                   and c is not self and c._awaiting_request() and not c.transport.is_closing()]
        victim = min(waiting, key=GuardedH11Protocol._waiting_since, default=self)
        self.logger.warning("over %d open connections: closing one waiting for a request",
                            self.max_connections)
        victim._disarm()
        victim.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_request():
            self._arm()  # a partial request: its deadline runs from its first byte
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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
