"""The blocking SDK client's http.client transport (agentos/transport.py) against a plain
HTTP/1.1 server of the standard library: keep-alive reuse, connections the server closed,
streamed bodies read in pieces and dropped early, compressed bodies, errors as httpx's
own (and so as the SDK's), threads sharing one client, and where it does not apply."""

import gzip
import http.server
import json
import threading
import time

import httpx
import pytest

from agentos import Client, transport
from agentos.kernel.errors import APIConnectionError, APITimeoutError, NotFoundError
from agentos.transport import StdlibTransport


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.connections.add(self.client_address)  # type: ignore[attr-defined]
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/close":  # answers, then closes the connection
            self.close_connection = True
            return self._send(200, b'{"closed": true}', {"Connection": "close"})
        if self.path == "/gzip":
            return self._send(200, gzip.compress(b'{"zipped": true}'),
                              {"Content-Encoding": "gzip"})
        if self.path == "/stream":  # chunked, a piece at a time
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = f"data: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if self.path.startswith("/missing"):
            return self._send(404, json.dumps({"error": {"type": "not_found",
                                                         "message": "no such thing"}}).encode())
        return self._send(200, json.dumps({"path": self.path}).encode())

    def do_POST(self):
        self.server.connections.add(self.client_address)  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(200, json.dumps({"echo": json.loads(body),
                                    "key": self.headers.get("Idempotency-Key")}).encode())


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.connections = set()  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def _client(srv, **kw) -> httpx.Client:
    return httpx.Client(base_url=_url(srv), transport=StdlibTransport(), **kw)


def test_keep_alive_reuses_one_connection(server):
    with _client(server) as c:
        for i in range(5):
            assert c.get(f"/a{i}").json() == {"path": f"/a{i}"}
            assert c.post("/p", json={"i": i}).json()["echo"] == {"i": i}
    assert len(server.connections) == 1


def test_a_connection_the_server_closed_is_not_reused(server):
    with _client(server) as c:
        assert c.get("/close").json() == {"closed": True}  # Connection: close
        assert c.get("/after").json() == {"path": "/after"}
        # NOTE: an idle connection the server then drops (its keep-alive timeout)
        conn = c._transport._idle[("127.0.0.1", server.server_address[1])][0]  # type: ignore[attr-defined]
        conn.sock.shutdown(2)  # as if the other end had gone
        assert c.get("/again").json() == {"path": "/again"}
    assert len(server.connections) == 3


def test_streamed_body_in_pieces_and_dropped_early(server):
    with _client(server) as c:
        with c.stream("GET", "/stream") as r:
            assert [line for line in r.iter_lines() if line] == ["data: 0", "data: 1", "data: 2"]
        with c.stream("GET", "/stream") as r:
            next(r.iter_lines())  # then closed mid-body: the connection is not reused
        assert not c._transport._idle.get(("127.0.0.1", server.server_address[1]))  # type: ignore[attr-defined]
        assert c.get("/next").json() == {"path": "/next"}


def test_compressed_body_is_decoded_by_httpx(server):
    with _client(server) as c:
        assert c.get("/gzip").json() == {"zipped": True}


def test_errors_are_httpx_errors(server):
    port = server.server_address[1]
    with _client(server, timeout=httpx.Timeout(0.2)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get("/slow")
        assert c.get("/fine").json() == {"path": "/fine"}  # a new connection
    server.shutdown()
    server.server_close()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=StdlibTransport()) as c, \
            pytest.raises(httpx.ConnectError):
        c.get("/gone")


def test_sdk_client_over_it(server, monkeypatch):
    client = Client(_url(server), max_retries=0, timeout=0.3)
    assert isinstance(client._transport, StdlibTransport)
    op = client._op_session_info("x")
    op.path, op.post = "/missing", lambda b: b
    with pytest.raises(NotFoundError, match="no such thing"):
        client._call(op)
    op = client._op_append("s1", None, [1, 2])
    op.post = lambda b: b
    body = client._call(op)
    assert body["echo"] == {"tokens": [1, 2]} and len(body["key"]) == 32
    op = client._op_session_info("x")
    op.path = "/slow"
    with pytest.raises(APITimeoutError):
        client._call(op)
    client.close()
    dead = Client("http://127.0.0.1:9", max_retries=0)  # nothing listens on port 9
    with pytest.raises(APIConnectionError):
        dead.session("anything")
    dead.close()


def test_threads_share_one_client(server):
    errors, n = [], 8
    with _client(server) as c:
        def work(t):
            try:
                for i in range(20):
                    assert c.post("/p", json={"t": t, "i": i}).json()["echo"] == {"t": t, "i": i}
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(server.connections) <= n


def test_where_it_applies(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert transport.applies("http://127.0.0.1:8000")
    assert not transport.applies("https://example.com")  # TLS: httpx's transport
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert not transport.applies("http://10.1.2.3:8000")  # through the proxy: httpx's
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert transport.applies("http://10.1.2.3:8000")
    assert Client("https://example.com")._transport is None
