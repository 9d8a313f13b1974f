"""The HTTP SDK: `Client` (blocking) and `AsyncClient` (asyncio) over httpx.

They return the same Session and Snapshot handles as the in-process engines, with the
same methods and return types, so agent code moves between `Engine(...)` and
`Client(url)` unchanged. Errors are the same classes too (`agentos.NotFoundError`, ...),
rebuilt from the server's `{"error": {"type", "message"}}` and status code.

Retries, with exponential backoff: a 503 (the server changed nothing: out of capacity) and
a connection that could not be opened are retried for every call; a connection that
broke after the request went out is retried only for idempotent calls (GET, DELETE).
No torch here: `from agentos import Client` works on a laptop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack

from agentos.kernel.errors import APIConnectionError, APITimeoutError, error_from_status
from agentos.kernel.process import Generation, GenerationChunk, NextTokenLogprobs
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Backend, Session, Snapshot

MSGPACK = "application/msgpack"
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_BROKEN = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout,
           httpx.WriteTimeout)


@dataclass(slots=True)
class _Call:
    method: str
    path: str
    body: dict | None = None
    post: Callable[[Any], Any] = lambda body: body
    stream: bool = False
    content: bytes | None = None  # a raw body (application/octet-stream) instead of `body`
    params: dict | None = None  # query string
    raw: bool = False  # post gets the response's bytes, not its decoded body

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "DELETE")


class _ClientBase(Backend):
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

    def encode(self, text: str, add_special_tokens: bool = False):
        """Returns the token ids of text (the server's tokenizer)."""
        return self._op("tokenize", text, add_special_tokens)

    def decode(self, token_ids: list[int]):
        return self._op("detokenize", token_ids)

    # -- operations to HTTP calls -------------------------------------------------------

    def _route(self, name: str, *args) -> _Call:
        session = self._session_handle
        if name == "create":
            prompt, tokens, seed = args
            body = {"prompt": prompt} if tokens is None else {"tokens": list(tokens)}
            return _Call("POST", "/v1/sessions", _drop_none({**body, "seed": seed}), session)
        if name in ("get", "info"):
            post = session if name == "get" else _session_info
            return _Call("GET", f"/v1/sessions/{args[0]}", None, post)
        if name == "list":
            ids = args[0]
            return _Call("GET", "/v1/sessions", None, lambda b: [
                _session_info(d) for d in b["data"] if ids is None or d["id"] in ids])
        if name == "append":
            pid, text, tokens = args
            body = {"text": text} if tokens is None else {"tokens": list(tokens)}
            return _Call("POST", f"/v1/sessions/{pid}/append", body, lambda b: b["num_tokens"])
        if name == "generate":
            pid, params, stream = args
            if not isinstance(params, SamplingParams):
                raise TypeError("params must be a SamplingParams")
            body = {**dataclasses.asdict(params), "stream": stream}
            return _Call("POST", f"/v1/sessions/{pid}/generate", body,
                         lambda b: Generation(**b), stream)
        if name == "fork":
            pid, n = args
            return _Call("POST", f"/v1/sessions/{pid}/fork", {"n": n},
                         lambda b: [session(d) for d in b["data"]])
        if name == "snapshot":
            return _Call("POST", f"/v1/sessions/{args[0]}/snapshots", None, self._snapshot_handle)
        if name == "rollback":
            pid, snap_id = args
            return _Call("POST", f"/v1/sessions/{pid}/rollback", {"snapshot_id": snap_id},
                         lambda b: b["num_tokens"])
        if name == "restore":
            return _Call("POST", f"/v1/snapshots/{args[0]}/restore", None, session)
        if name == "export":
            pid, kv = args
            return _Call("GET", f"/v1/sessions/{pid}/export", None, bytes,
                         params={"kv": str(bool(kv)).lower()}, raw=True)
        if name == "import":
            data = args[0]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError("a session record is bytes (from export_session)")
            return _Call("POST", "/v1/sessions/import", None, session, content=bytes(data))
        if name == "get_snapshot":
            return _Call("GET", f"/v1/snapshots/{args[0]}", None, self._snapshot_handle)
        if name == "delete_snapshot":
            return _Call("DELETE", f"/v1/snapshots/{args[0]}", None, _none)
        if name == "list_snapshots":
            return _Call("GET", f"/v1/sessions/{args[0]}/snapshots", None,
                         lambda b: [self._snapshot_handle(d) for d in b["data"]])
        if name == "close":
            return _Call("DELETE", f"/v1/sessions/{args[0]}", None, _none)
        if name in ("tokens", "mask", "tokens_and_mask"):
            pick = {"tokens": lambda b: b["tokens"], "mask": lambda b: b["mask"],
                    "tokens_and_mask": lambda b: (b["tokens"], b["mask"])}[name]
            return _Call("GET", f"/v1/sessions/{args[0]}/tokens", None, pick)
        if name == "score":
            pid, text, tokens = args
            body = {"text": text} if tokens is None else {"tokens": list(tokens)}
            return _Call("POST", f"/v1/sessions/{pid}/score", body, lambda b: b["logprobs"])
        if name == "next_token_logprobs":
            pid, top_k, candidates = args
            body = _drop_none({"top_k": top_k, "candidates": candidates})
            return _Call("POST", f"/v1/sessions/{pid}/next_token_logprobs", body,
                         lambda b: NextTokenLogprobs(**b))
        if name == "update_weights":
            weights, version, kv_policy = args
            return _Call("POST", "/v1/weights", None, lambda b: b["version"],
                         content=_safetensors(weights),
                         params=_drop_none({"version": version, "kv_policy": kv_policy}))
        if name in ("pause", "resume", "abort", "sleep", "wake_up"):
            body = {"level": args[0]} if name == "sleep" else None
            post = (lambda b: b["aborted"]) if name == "abort" else _none
            return _Call("POST", f"/v1/engine/{name}", body, post)
        if name == "stats":
            return _Call("GET", "/v1/system", None, lambda b: b["stats"])
        if name == "check":
            return _Call("POST", "/v1/system/check", None, _none)
        if name == "tokenize":
            text, special = args
            return _Call("POST", "/v1/tokenize", {"text": text, "add_special_tokens": special},
                         lambda b: b["tokens"])
        if name == "detokenize":
            return _Call("POST", "/v1/detokenize", {"tokens": list(args[0])}, lambda b: b["text"])
        raise AssertionError(f"unknown operation {name}")

    def _session_handle(self, info: dict) -> Session:
        return Session(self, info["id"], info.get("parent_id"))

    def _snapshot_handle(self, info: dict) -> Snapshot:
        return Snapshot(self, info["id"], info["session_id"], info["num_tokens"],
                        info.get("device_blocks"), info.get("created_at"), info.get("host_blocks"))

    # -- wire ---------------------------------------------------------------------------

    def _request(self, http, call: _Call) -> httpx.Request:
        headers = dict(self.headers)
        if call.stream:
            headers["Accept"] = "text/event-stream"
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
        return http.build_request(call.method, call.path, content=content, headers=headers,
                                  params=call.params)

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after") if response is not None else None
        if after and after.replace(".", "", 1).isdigit():
            return min(float(after), 30.0)
        return min(0.25 * 2**attempt, 8.0) * (0.5 + random.random() / 2)

    def _should_retry(self, call: _Call, attempt: int, error: Exception | None,
                      response: httpx.Response | None) -> bool:
        if attempt >= self.max_retries:
            return False
        if error is not None:
            return isinstance(error, _NEVER_SENT) or (call.idempotent and isinstance(error, _BROKEN))
        if response.status_code != 503:
            return False
        # NOTE: a change the store could not make durable may have been applied in memory:
        # repeating it (an append, a generate) would apply it twice, so only reads retry
        body = _decode(response)
        err = body.get("error") if isinstance(body, dict) else None
        return call.idempotent or not (isinstance(err, dict) and err.get("type") == "store_unavailable")

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


class Client(_ClientBase):
    """A blocking client of an AgentOS server. Thread-safe; use as a context manager or
    call close()."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, wire: str = "json"):
        super().__init__(base_url, api_key, timeout, max_retries, wire)
        self._http = httpx.Client(**self._client_args())

    def _op(self, name: str, *args):
        call = self._route(name, *args)
        response = self._send(call)
        if call.stream:
            return _EventStream(response)
        return call.post(response.content if call.raw else _decode(response))

    def _send(self, call: _Call) -> httpx.Response:
        request = self._request(self._http, call)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=call.stream)
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

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The client for asyncio code: the same methods, as awaitables.

    `async with AsyncClient(url) as client: s = await client.create_session(...)`
    """

    is_async = True

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, wire: str = "json"):
        super().__init__(base_url, api_key, timeout, max_retries, wire)
        self._http = httpx.AsyncClient(**self._client_args())

    def _op(self, name: str, *args):
        return self._run(name, *args)

    async def _run(self, name: str, *args):
        call = self._route(name, *args)
        response = await self._send(call)
        if call.stream:
            return _AsyncEventStream(response)
        return call.post(response.content if call.raw else _decode(response))

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
