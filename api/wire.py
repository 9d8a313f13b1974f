"""Wire formats and request guards, as plain ASGI middleware around the FastAPI app.

- `AuthMiddleware` resolves the API key of every `/v1/` request to a tenant (401
  otherwise) before anything else reads the request; `/v1/internal/` needs the cluster
  secret instead (403 otherwise).
- `BodyMiddleware` reads the request body once, refuses one over the size limit (413)
  before reading past it, drops a request whose client went away before its body was
  whole (it is never run), refuses one that does not arrive in time (408), refuses text
  with lone surrogates (400: no tokenizer or JSON encoder can take them), and turns an
  `application/msgpack` body into JSON for FastAPI's validation. A client that sends
  `Accept: application/msgpack` gets msgpack back: `WireResponse`, the app's
  default response class, renders to what the request asked for.

Errors raised here are answered here, in the same `{"error": {"type", "message"}}` shape
as the app's exception handlers.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import math
import re
from collections.abc import Callable
from typing import Any

import msgpack
from fastapi.responses import JSONResponse, StreamingResponse

from agentos.kernel.errors import (
    APIStatusError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
)

MSGPACK = "application/msgpack"
# a JSON escape or UTF-8 bytes of a UTF-16 surrogate: maybe a lone one (json.loads takes it)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_wants_msgpack: contextvars.ContextVar[bool] = contextvars.ContextVar("wants_msgpack", default=False)


class WireResponse(JSONResponse):
    """JSON, or msgpack when the request's Accept header asks for it."""

    def render(self, content: Any) -> bytes:
        if _wants_msgpack.get():
            self.media_type = MSGPACK
            return msgpack.packb(content, use_bin_type=True)
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()


class EventStream(StreamingResponse):
    """Server-sent events. `on_close` runs however the response ends: finished, or the
    client gone before or during the stream (so a generate call is never left running)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event with compact JSON data."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_body(err: APIStatusError) -> dict:
    return {"error": {"type": err.type, "message": err.message, "code": err.status_code}}


def error_response(err: APIStatusError, close: bool = False) -> WireResponse:
    """The error's response; with close, the connection closes after it (a request body
    left unread is then never received)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status_code == 401 else {}
    if close:
        headers["Connection"] = "close"
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return WireResponse(error_body(err), status_code=err.status_code, headers=headers or None)


def _header(scope: dict, name: bytes) -> str:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return ""


class AuthMiddleware:
    """Puts the request's tenant in `scope["state"]["tenant"]` for paths under /v1/.

    Paths under /v1/internal/ (gateway to worker) take no tenant key: they need the
    cluster secret in X-AgentOS-Cluster (`cluster_secret()`: None while there is none,
    then every internal call is a 403)."""

    def __init__(self, app, tenants, cluster_secret: Callable[[], str | None] | None = None):
        self.app = app
        self.tenants = tenants
        self.cluster_secret = cluster_secret or (lambda: None)

    # vLLM's own endpoints (api/routes/vllm.py), authenticated like the /v1/ ones
    PATHS = ("/v1/", "/inference/", "/tokenize", "/detokenize", "/get_world_size",
             "/finish_session", "/pause", "/resume", "/sleep", "/wake_up",
             "/reset_prefix_cache")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.PATHS):
            return await self.app(scope, receive, send)
        _wants_msgpack.set(MSGPACK in _header(scope, b"accept"))
        if scope["path"].startswith("/v1/internal/"):
            secret = self.cluster_secret()
            given = _header(scope, b"x-agentos-cluster")
            if not (secret and given and hmac.compare_digest(secret.encode(), given.encode())):
                err = PermissionDeniedError("internal calls need the cluster secret")
                return await error_response(err)(scope, receive, send)
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        try:
            tenant = self.tenants.authenticate(_header(scope, b"authorization"),
                                               _header(scope, b"x-api-key"))
            tenant.throttle(int(declared) if declared.isdigit() else 0)
        except APIStatusError as e:  # refused before its body is read: not worth reading
            unread = declared not in ("", "0") or bool(_header(scope, b"transfer-encoding"))
            return await error_response(e, close=unread)(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyMiddleware:
    """Bounds request bodies and decodes msgpack ones; sets the response format."""

    def __init__(self, app, max_body_bytes: int, large: dict[str, int] | None = None,
                 raw: set[str] | None = None, body_timeout_s: float = 60.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # a body must arrive within this (a large one: each of its chunks), so a client
        # that trickles it cannot hold a connection and its request forever
        self.body_timeout_s = body_timeout_s
        self.large = large or {}  # path -> its own limit (weight uploads)
        self.raw = raw or set()  # paths whose msgpack body is handed over as it is (records)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _wants_msgpack.set(MSGPACK in _header(scope, b"accept"))
        try:
            body = await self._read(scope, receive)
            if body is None:  # the client went away mid-body: nothing to run, no one to answer
                return
            if body and scope.get("path") not in self.raw:
                if _header(scope, b"content-type").split(";")[0].strip() == MSGPACK:
                    body = _msgpack_to_json(body)
                    scope["headers"] = [(k, v) for k, v in scope["headers"]
                                        if k not in (b"content-type", b"content-length")]
                    scope["headers"] += [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode())]
                elif _SURROGATE.search(body):
                    _check_unicode(body)
        except APIStatusError as e:  # a body too large or too slow is not worth reading on
            close = isinstance(e, PayloadTooLargeError) or e.status_code == 408
            return await error_response(e, close=close)(scope, receive, send)

        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the body was handed over; what follows is the client going away
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes | None:
        """The whole body; None when the client disconnected before sending all of it.
        Raises PayloadTooLargeError as soon as the body (or its Content-Length) is over
        the path's limit, and InvalidRequestError for a body of another length than its
        Content-Length, and a 408 when it does not arrive in time."""
        path = scope.get("path", "")
        limit = self.large.get(path, self.max_body_bytes)
        loop = asyncio.get_running_loop()
        deadline = None if path in self.large else loop.time() + self.body_timeout_s
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"request body of {declared} bytes is over the limit "
                                       f"of {limit}")
        chunks, size = [], 0
        while True:
            wait = self.body_timeout_s if deadline is None else deadline - loop.time()
            try:
                message = await _within(receive(), max(wait, 0.0))
            except TimeoutError:
                raise InvalidRequestError(f"request body did not arrive within "
                                          f"{self.body_timeout_s:g} s", status_code=408) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if declared.isdigit() and size != int(declared):
            raise InvalidRequestError(f"request body is {size} bytes, not its Content-Length "
                                      f"of {declared}")
        return b"".join(chunks)


async def _within(aw, seconds: float):
    """await aw, raising TimeoutError after `seconds`. NOTE: asyncio.timeout (3.11) where
    there is one: wait_for wraps the awaitable in a task, a good part of a fast call."""
    if _timeout is None:
        return await asyncio.wait_for(aw, seconds)
    async with _timeout(seconds):
        return await aw


_timeout = getattr(asyncio, "timeout", None)


def _check_unicode(body: bytes) -> None:
    """Raises InvalidRequestError when the JSON body holds a lone surrogate (a pair is one
    character and fine). A body that is not JSON is left to the route's validation."""
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequestError("request text holds a lone UTF-16 surrogate "
                                  "(not a character)") from None
    except ValueError:
        pass


def _msgpack_to_json(body: bytes) -> bytes:
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
        return json.dumps(data, allow_nan=False).encode()
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise InvalidRequestError(f"request body is not valid msgpack: {e}") from None
