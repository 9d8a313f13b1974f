"""The HTTP SDK: `Client` (blocking) and `AsyncClient` (asyncio) over httpx.

They return the same Session and Snapshot handles as the in-process engines, with the
same methods and return types, so agent code moves between `Engine(...)` and
`Client(url)` unchanged. Errors are the same classes too (`agentos.NotFoundError`, ...),
rebuilt from the server's `{"error": {"type", "message"}}` and status code.

Retries, with exponential backoff: a 503 and a connection that could not be opened are
retried for every call; a connection that broke after the request went out is retried
for idempotent calls (GET, DELETE) and for POSTs, which carry an `Idempotency-Key` (one
per call, the same on its retries) so the server answers a retry of a change it already
applied without applying it again. A streamed generate has no key: it is not retried
once it may have been applied.
No torch here: `from agentos import Client` works on a laptop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import httpx
import msgpack

from agentos import transport
from agentos.backend import AsyncBackend, Backend, NamedTensors, Op, Operations
from agentos.kernel.errors import APIConnectionError, APITimeoutError, error_from_status
from agentos.kernel.process import Generation, GenerationChunk, NextTokenLogprobs
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Session, Snapshot

T = TypeVar("T")

MSGPACK = "application/msgpack"
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_BROKEN = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout,
           httpx.WriteTimeout)


def _body(body: Any) -> Any:
    return body


@dataclass(slots=True)
class _Call(Op[T]):
    """An operation as one HTTP call; post makes the caller's result of the response."""

    method: str
    path: str
    body: dict | None = None
    post: Callable[[Any], T] = _body
    stream: bool = False
    content: bytes | None = None  # a raw body (application/octet-stream) instead of `body`
    params: dict | None = None  # query string
    raw: bool = False  # post gets the response's bytes, not its decoded body

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "DELETE")

    @property
    def keyed(self) -> bool:
        """It carries an Idempotency-Key: the server applies it once however often sent."""
        return self.method == "POST" and not self.stream


class _ClientBase(Operations):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, wire: str = "json"):
        if wire not in ("json", "msgpack"):
            raise ValueError(f"wire must be 'json' or 'msgpack', got {wire!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("AGENTOS_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.wire = wire
        self.headers = {"Accept": MSGPACK if wire == "msgpack" else "application/json"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    # -- the operations as HTTP calls ----------------------------------------------------

    def _op_create(self, prompt: str | None, tokens: list[int] | None,
                   seed: int | None) -> _Call[Session]:
        body = {"prompt": prompt} if tokens is None else {"tokens": list(tokens)}
        return _Call("POST", "/v1/sessions", _drop_none({**body, "seed": seed}),
                     self._session_handle)

    def _op_session(self, session_id: str) -> _Call[Session]:
        return _Call("GET", f"/v1/sessions/{session_id}", None, self._session_handle)

    def _op_session_info(self, session_id: str) -> _Call[dict]:
        return _Call("GET", f"/v1/sessions/{session_id}", None, _session_info)

    def _op_list_sessions(self, ids: list[str] | None, owner: str | None) -> _Call[list[dict]]:
        return _Call("GET", "/v1/sessions", None, lambda b: [
            _session_info(d) for d in b["data"]
            if (ids is None or d["id"] in ids) and (owner is None or d.get("owner") == owner)])

    def _op_append(self, session_id: str, text: str | None,
                   tokens: list[int] | None) -> _Call[int]:
        body = {"text": text} if tokens is None else {"tokens": list(tokens)}
        return _Call("POST", f"/v1/sessions/{session_id}/append", body, lambda b: b["num_tokens"])

    def _op_generate(self, session_id: str, params: SamplingParams, stream: bool,
                     append: str | list[int] | None = None) -> _Call[Any]:
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        body = {**dataclasses.asdict(params), "stream": stream}
        if append is not None:
            body["append"] = {"text": append} if isinstance(append, str) else {"tokens": list(append)}
        return _Call("POST", f"/v1/sessions/{session_id}/generate", body,
                     lambda b: Generation(**b), stream)

    def _op_score(self, session_id: str, text: str | None,
                  tokens: list[int] | None) -> _Call[list[float]]:
        body = {"text": text} if tokens is None else {"tokens": list(tokens)}
        return _Call("POST", f"/v1/sessions/{session_id}/score", body, lambda b: b["logprobs"])

    def _op_next_token_logprobs(self, session_id: str, top_k: int,
                                candidates: list[int] | None) -> _Call[NextTokenLogprobs]:
        body = _drop_none({"top_k": top_k, "candidates": candidates})
        return _Call("POST", f"/v1/sessions/{session_id}/next_token_logprobs", body,
                     lambda b: NextTokenLogprobs(**b))

    def _op_fork(self, session_id: str, n: int) -> _Call[list[Session]]:
        return _Call("POST", f"/v1/sessions/{session_id}/fork", {"n": n},
                     lambda b: [self._session_handle(d) for d in b["data"]])

    def _op_snapshot(self, session_id: str) -> _Call[Snapshot]:
        return _Call("POST", f"/v1/sessions/{session_id}/snapshots", None, self._snapshot_handle)

    def _op_rollback(self, session_id: str, snapshot_id: str) -> _Call[int]:
        return _Call("POST", f"/v1/sessions/{session_id}/rollback", {"snapshot_id": snapshot_id},
                     lambda b: b["num_tokens"])

    def _op_close_session(self, session_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/sessions/{session_id}", None, _none)

    def _op_tokens_and_mask(self, session_id: str) -> _Call[tuple[list[int], list[int]]]:
        return _Call("GET", f"/v1/sessions/{session_id}/tokens", None,
                     lambda b: (b["tokens"], b["mask"]))

    def _op_export(self, session_id: str, kv: bool) -> _Call[bytes]:
        return _Call("GET", f"/v1/sessions/{session_id}/export", None, bytes,
                     params={"kv": str(bool(kv)).lower()}, raw=True)

    def _op_import(self, data: bytes) -> _Call[Session]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("a session record is bytes (from export_session)")
        return _Call("POST", "/v1/sessions/import", None, self._session_handle,
                     content=bytes(data))

    def _op_list_snapshots(self, session_id: str | None,
                           owner: str | None) -> _Call[list[Snapshot]]:
        path = "/v1/snapshots" if session_id is None else f"/v1/sessions/{session_id}/snapshots"
        return _Call("GET", path, None, lambda b: [
            self._snapshot_handle(d) for d in b["data"] if owner is None or d.get("owner") == owner])

    def _op_restore(self, snapshot_id: str) -> _Call[Session]:
        return _Call("POST", f"/v1/snapshots/{snapshot_id}/restore", None, self._session_handle)

    def _op_get_snapshot(self, snapshot_id: str) -> _Call[Snapshot]:
        return _Call("GET", f"/v1/snapshots/{snapshot_id}", None, self._snapshot_handle)

    def _op_delete_snapshot(self, snapshot_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/snapshots/{snapshot_id}", None, _none)

    def _op_update_weights(self, named_tensors: NamedTensors, version: int | None,
                           kv_policy: str) -> _Call[int]:
        return _Call("POST", "/v1/weights", None, lambda b: b["version"],
                     content=_safetensors(named_tensors),
                     params=_drop_none({"version": version, "kv_policy": kv_policy}))

    def _op_pause(self, wait: bool) -> _Call[None]:
        return _Call("POST", "/v1/engine/pause", {"wait": True} if wait else None, _none)

    def _op_resume(self) -> _Call[None]:
        return _Call("POST", "/v1/engine/resume", None, _none)

    def _op_abort(self) -> _Call[int]:
        return _Call("POST", "/v1/engine/abort", None, lambda b: b["aborted"])

    def _op_sleep(self, level: int) -> _Call[None]:
        return _Call("POST", "/v1/engine/sleep", {"level": level}, _none)

    def _op_reset_prefix_cache(self) -> _Call[int]:
        return _Call("POST", "/v1/engine/reset_prefix_cache", None, lambda b: b["dropped"])

    def _op_wake_up(self) -> _Call[None]:
        return _Call("POST", "/v1/engine/wake_up", None, _none)

    def _op_stats(self) -> _Call[dict]:
        return _Call("GET", "/v1/system", None, lambda b: b["stats"])

    def _op_check(self) -> _Call[None]:
        return _Call("POST", "/v1/system/check", None, _none)

    def _op_tokenize(self, text: str, add_special_tokens: bool) -> _Call[list[int]]:
        return _Call("POST", "/v1/tokenize", {"text": text, "add_special_tokens": add_special_tokens},
                     lambda b: b["tokens"])

    def _op_detokenize(self, token_ids: list[int]) -> _Call[str]:
        return _Call("POST", "/v1/detokenize", {"tokens": list(token_ids)}, lambda b: b["text"])

    def _session_handle(self, info: dict) -> Session:
        return Session(cast("Backend | AsyncBackend", self), info["id"], info.get("parent_id"))

    def _snapshot_handle(self, info: dict) -> Snapshot:
        return Snapshot(cast("Backend | AsyncBackend", self), info["id"], info["session_id"],
                        info["num_tokens"], info.get("device_blocks"), info.get("created_at"),
                        info.get("host_blocks"), info.get("owner"))

    # -- wire ---------------------------------------------------------------------------

    def _request(self, http, call: _Call) -> httpx.Request:
        headers = dict(self.headers)
        if call.stream:
            headers["Accept"] = "text/event-stream"
        if call.keyed:
            headers["Idempotency-Key"] = uuid.uuid4().hex  # built once per call: its retries share it
        content = call.content
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        elif call.body is not None:
            if self.wire == "msgpack":
                content = msgpack.packb(call.body, use_bin_type=True)
                headers["Content-Type"] = MSGPACK
            else:
                content = json.dumps(call.body).encode()
                headers["Content-Type"] = "application/json"
        # NOTE: the whole URL: one parse, and any http_client's own base_url is not used
        return http.build_request(call.method, self.base_url + call.path, content=content,
                                  headers=headers, params=call.params)

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after") if response is not None else None
        if after and after.replace(".", "", 1).isdigit():
            return min(float(after), 30.0)
        return min(0.25 * 2**attempt, 8.0) * (0.5 + random.random() / 2)

    def _should_retry(self, call: _Call, attempt: int, error: Exception | None,
                      response: httpx.Response | None) -> bool:
        if attempt >= self.max_retries:
            return False
        safe = call.idempotent or call.keyed
        if error is not None:
            return isinstance(error, _NEVER_SENT) or (safe and isinstance(error, _BROKEN))
        assert response is not None  # no error: a response came
        if response.status_code != 503:
            return False
        # NOTE: a change the store could not make durable may have been applied in memory:
        # repeating it without a key (a streamed generate) could apply it twice
        body = _decode(response)
        err = body.get("error") if isinstance(body, dict) else None
        return safe or not (isinstance(err, dict) and err.get("type") == "store_unavailable")

    def _client_args(self) -> dict:
        return {"base_url": self.base_url, "timeout": httpx.Timeout(self.timeout, connect=10.0)}


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    if response.headers.get("content-type", "").startswith(MSGPACK):
        return msgpack.unpackb(response.content, raw=False)
    try:
        return response.json()
    except ValueError:
        return response.text


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_status(response.status_code, _decode(response))


def _connection_error(e: Exception) -> APIConnectionError:
    cls = APITimeoutError if isinstance(e, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(e).__name__}: {e}")


def _chunk(event: str, data: str) -> GenerationChunk:
    """One server-sent event of a streamed generate; an `error` event raises."""
    body = json.loads(data)
    if event == "error":
        raise error_from_status(body.get("error", {}).get("code", 500), body)
    return GenerationChunk(**body)


class _SSE:
    """Server-sent events, line by line: `feed` returns a chunk at each `data:` line."""

    def __init__(self):
        self.event = "message"

    def feed(self, line: str) -> GenerationChunk | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            event, self.event = self.event, "message"
            return _chunk(event, line[5:].strip())
        return None


class _EventStream:
    """The chunks of a streamed generate, read off the server's events: an iterator.
    Closing it early drops the connection, which ends the call on the server (its tokens
    so far stay in the session)."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._lines = response.iter_lines()
        self._sse = _SSE()
        self._closed = False

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        if self._closed:
            raise StopIteration
        try:
            for line in self._lines:
                if (chunk := self._sse.feed(line)) is not None:
                    return chunk
        except httpx.HTTPError as e:
            self.close()
            raise _connection_error(e) from e
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class _AsyncEventStream:
    """The same as an async iterator."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._lines = response.aiter_lines()
        self._sse = _SSE()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            async for line in self._lines:
                if (chunk := self._sse.feed(line)) is not None:
                    return chunk
        except httpx.HTTPError as e:
            await self.aclose()
            raise _connection_error(e) from e
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._response.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _session_info(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "object"}


def _safetensors(weights) -> bytes:
    """Named tensors (a dict or pairs) as one safetensors file (needs torch, as a trainer
    has)."""
    from safetensors.torch import save

    items = weights.items() if hasattr(weights, "items") else weights
    return save({name: t.detach().contiguous().cpu() for name, t in items})


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _none(_body) -> None:
    return None


class Client(_ClientBase, Backend):
    """A blocking client of an AgentOS server. Thread-safe; use as a context manager or
    call close().

    `http_client`: an httpx.Client to send the calls through (TLS settings, proxies, an
    app in the same process), closed with this one. Without it, plain http:// URLs go
    over the standard library's http.client (transport.py), others over httpx's own."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, wire: str = "json",
                 http_client: httpx.Client | None = None):
        super().__init__(base_url, api_key, timeout, max_retries, wire)
        # NOTE: calls go straight to the http.client transport: httpx's client around it
        # (redirects, cookies, auth hooks, none of which the SDK uses) cost about 100 us a call
        self._transport = (transport.StdlibTransport() if http_client is None
                           and transport.applies(self.base_url) else None)
        self._http = http_client or httpx.Client(**self._client_args(),
                                                 transport=self._transport)

    def _call(self, op: Op[T]) -> T:
        assert isinstance(op, _Call)
        response = self._send(op)
        if op.stream:
            return _EventStream(response)  # type: ignore[return-value]
        return op.post(response.content if op.raw else _decode(response))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Returns the token ids of text (the server's tokenizer)."""
        return self._call(self._op_tokenize(text, add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return self._call(self._op_detokenize(token_ids))

    def _send(self, call: _Call) -> httpx.Response:
        request = self._request(self._http, call)
        attempt = 0
        while True:
            try:
                response = self._exchange(request, call.stream)
            except httpx.HTTPError as e:
                if not self._should_retry(call, attempt, e, None):
                    raise _connection_error(e) from e
                time.sleep(self._retry_delay(attempt, None))
            else:
                if response.status_code < 400:
                    return response
                if call.stream:
                    response.read()
                    response.close()
                if not self._should_retry(call, attempt, None, response):
                    _raise_for(response)
                time.sleep(self._retry_delay(attempt, response))
            attempt += 1

    def _exchange(self, request: httpx.Request, stream: bool) -> httpx.Response:
        if self._transport is None:
            return self._http.send(request, stream=stream)
        response = self._transport.handle_request(request)
        response.request = request
        if not stream:
            try:
                response.read()  # NOTE: the connection goes back to the pool at its end
            except BaseException:
                response.close()
                raise
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase, AsyncBackend):
    """The client for asyncio code: the same methods, as awaitables (over httpx's own
    transport; `http_client`: an httpx.AsyncClient of the caller's, as Client's).

    `async with AsyncClient(url) as client: s = await client.create_session(...)`
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, wire: str = "json",
                 http_client: httpx.AsyncClient | None = None):
        super().__init__(base_url, api_key, timeout, max_retries, wire)
        self._http = http_client or httpx.AsyncClient(**self._client_args())

    async def _call(self, op: Op[T]) -> T:
        assert isinstance(op, _Call)
        response = await self._send(op)
        if op.stream:
            return _AsyncEventStream(response)  # type: ignore[return-value]
        return op.post(response.content if op.raw else _decode(response))

    async def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Returns the token ids of text (the server's tokenizer)."""
        return await self._call(self._op_tokenize(text, add_special_tokens))

    async def decode(self, token_ids: list[int]) -> str:
        return await self._call(self._op_detokenize(token_ids))

    async def _send(self, call: _Call) -> httpx.Response:
        request = self._request(self._http, call)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=call.stream)
            except httpx.HTTPError as e:
                if not self._should_retry(call, attempt, e, None):
                    raise _connection_error(e) from e
                await asyncio.sleep(self._retry_delay(attempt, None))
            else:
                if response.status_code < 400:
                    return response
                if call.stream:
                    await response.aread()
                    await response.aclose()
                if not self._should_retry(call, attempt, None, response):
                    _raise_for(response)
                await asyncio.sleep(self._retry_delay(attempt, response))
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
