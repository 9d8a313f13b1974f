"""The blocking SDK client's HTTP transport: httpx's `BaseTransport` over the standard
library's `http.client`, one keep-alive connection per concurrent request.

Why: on loopback, httpx's default transport (httpcore and h11) costs about 300 us of Python
a call: against a server that answers at once, 434-466 us a round trip where http.client
takes 141. A fork or rollback does about 100 us of work in the server. A loop of rollbacks
through the SDK took 680-800 us over httpx's transport and 550-620 over this one
(`agentos bench api` and docs/benchmarks.md have the rest).

httpx keeps everything above the transport: URLs, headers, redirects, timeouts as its
`Timeout`, content decoding and the streaming API. Errors are raised as httpx's own
(ConnectError, ReadTimeout, RemoteProtocolError...), so callers retry as they would over
httpx's transport. Plain http:// only: `Client` keeps httpx's transport for https:// (its
certificate handling) and where an HTTP proxy from the environment applies.
"""

from __future__ import annotations

import http.client
import select
import threading
import urllib.request
from collections.abc import Iterator

import httpx

MAX_IDLE = 8  # idle keep-alive connections kept per host
CHUNK = 64 * 1024  # most bytes a read of a streamed body hands on


def applies(url: str) -> bool:
    """True when this transport serves url: plain http://, with no proxy from the
    environment for its host."""
    parsed = httpx.URL(url)
    if parsed.scheme != "http":
        return False
    proxies = urllib.request.getproxies()
    return not (proxies.get("http") or proxies.get("all")) or bool(
        urllib.request.proxy_bypass(parsed.host))


class StdlibTransport(httpx.BaseTransport):
    """httpx's sync transport over http.client; thread-safe (each request holds its own
    connection until its response is read or closed)."""

    def __init__(self, max_idle: int = MAX_IDLE):
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"this transport speaks http://, not "
                                            f"{request.url.scheme}://")
        timeout = request.extensions.get("timeout", {})
        body = request.read()
        key = (request.url.host, request.url.port or 80)
        conn = self._checkout(key, request, timeout.get("connect"))
        try:
            response = self._exchange(conn, request, body, timeout)
        except BaseException:
            conn.close()
            raise
        return httpx.Response(
            response.status, headers=response.getheaders(),
            stream=_Body(self, key, conn, response),
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": response.reason.encode("latin-1")})

    @staticmethod
    def _exchange(conn: http.client.HTTPConnection, request: httpx.Request, body: bytes,
                  timeout: dict) -> http.client.HTTPResponse:
        """Sends the request and reads the response's status and headers."""
        assert conn.sock is not None
        try:
            conn.sock.settimeout(timeout.get("write"))
            conn.putrequest(request.method, request.url.raw_path.decode("ascii"),
                            skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.raw:
                conn.putheader(name, value)
            conn.endheaders(body or None)
        except TimeoutError as e:
            raise httpx.WriteTimeout(str(e), request=request) from e
        except OSError as e:
            raise httpx.WriteError(str(e), request=request) from e
        try:
            conn.sock.settimeout(timeout.get("read"))
            return conn.getresponse()
        except TimeoutError as e:
            raise httpx.ReadTimeout(str(e), request=request) from e
        except (http.client.HTTPException, ValueError) as e:
            raise httpx.RemoteProtocolError(str(e), request=request) from e
        except OSError as e:
            raise httpx.ReadError(str(e), request=request) from e

    def _checkout(self, key: tuple[str, int], request: httpx.Request,
                  connect_timeout: float | None) -> http.client.HTTPConnection:
        """An idle connection to key that is still open, else a new one."""
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                # NOTE: an idle connection with something to read has been closed by the
                # server (its keep-alive timeout) or sent what nobody asked for: not reused
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    return conn
                conn.close()
        host, port = key
        conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        try:
            conn.connect()
        except TimeoutError as e:
            raise httpx.ConnectTimeout(str(e), request=request) from e
        except OSError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        return conn  # NOTE: http.client sets TCP_NODELAY

    def _checkin(self, key: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class _Body(httpx.SyncByteStream):
    """A response's body as httpx reads it; its connection goes back to the pool once the
    body has been read to its end (and the server keeps it open), else it is closed."""

    def __init__(self, transport: StdlibTransport, key: tuple[str, int],
                 conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self._transport, self._key, self._response = transport, key, response
        self._conn: http.client.HTTPConnection | None = conn
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self._response.read1(CHUNK):
                yield chunk
        except TimeoutError as e:
            raise httpx.ReadTimeout(str(e)) from e
        except (http.client.HTTPException, ValueError) as e:
            raise httpx.RemoteProtocolError(str(e)) from e
        except OSError as e:
            raise httpx.ReadError(str(e)) from e
        self._done = True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and not self._response.will_close:
            self._response.close()
            self._transport._checkin(self._key, conn)
        else:
            conn.close()
