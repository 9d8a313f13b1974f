"""Idempotency keys: a POST retried with the same `Idempotency-Key` header is answered
from the first try instead of being applied again (the OpenAI and Stripe APIs' scheme).

Why: a change is applied in memory before the journal makes it durable, so the first
change after the store goes down is applied and answered 503. Its retry must not apply it
twice. With a key, that change is remembered with its answer; a retry gets 503 again while
the store is down and the first answer once the change is durable, never a second
application.

The server remembers, per tenant, the last `max_keys` keys for `ttl_s` seconds, in this
process's memory (a restarted worker has forgotten them). Only successful answers (and
changes applied but not yet durable) are remembered: a refusal changed nothing, so its
retry runs again. A key reused for another request is a 422; a key whose first request is
still running is a 409. Streamed answers (server-sent events) are not remembered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentos.api.wire import error_response
from agentos.engine import pending_durable
from agentos.kernel.errors import (
    APIStatusError,
    ConflictError,
    StoreUnavailableError,
    UnprocessableEntityError,
)

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255


@dataclass(slots=True)
class Answer:
    """What the first request with a key got, or None while it runs."""

    fingerprint: bytes
    created_at: float
    start: dict | None = None  # the http.response.start message
    body: bytes = b""
    durable_at: int | None = None  # the journal position it waits for; None: durable


@dataclass(slots=True)
class IdempotencyKeys:
    """Per tenant, key -> Answer: at most `max_keys` each, forgotten after `ttl_s`."""

    max_keys: int = 256
    ttl_s: float = 3600.0
    tenants: dict[str, OrderedDict[str, Answer]] = field(default_factory=dict)

    def get(self, tenant: str, key: str) -> Answer | None:
        keys = self.tenants.get(tenant, OrderedDict())
        answer = keys.get(key)
        if answer is not None and time.monotonic() - answer.created_at > self.ttl_s:
            del keys[key]
            return None
        return answer

    def put(self, tenant: str, key: str, answer: Answer) -> None:
        keys = self.tenants.setdefault(tenant, OrderedDict())
        keys[key] = answer
        while len(keys) > self.max_keys:
            keys.popitem(last=False)

    def drop(self, tenant: str, key: str) -> None:
        keys = self.tenants.get(tenant)
        if keys is not None:
            keys.pop(key, None)


class IdempotencyMiddleware:
    """Answers a retried POST under /v1/ from its key's first answer (see the module).
    Runs inside AuthMiddleware (the tenant) and BodyMiddleware (the whole body).
    `journal()` is the engine's journal, or None without a store."""

    def __init__(self, app, journal: Callable[[], Any], keys: IdempotencyKeys | None = None):
        self.app = app
        self.journal = journal
        self.keys = keys or IdempotencyKeys()

    async def __call__(self, scope, receive, send):
        key = _header(scope, HEADER)
        if (scope["type"] != "http" or scope.get("method") != "POST" or key is None
                or not scope["path"].startswith("/v1/") or scope["path"].startswith("/v1/internal/")):
            return await self.app(scope, receive, send)
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            err = UnprocessableEntityError(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
            return await error_response(err)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        tenant = getattr(scope.get("state", {}).get("tenant"), "name", "")
        fingerprint = hashlib.sha256(b"%s\0%s\0%s" % (
            scope["path"].encode(), scope.get("query_string", b""), body)).digest()
        answer = self.keys.get(tenant, key)
        if answer is not None:
            return await self._replay(answer, fingerprint, scope, send)
        answer = Answer(fingerprint, time.monotonic())
        self.keys.put(tenant, key, answer)
        sent: list[dict] = []
        streamed = False

        handed = False

        async def replay_body():
            nonlocal handed
            if handed:  # the body was handed over; what follows is the client going away
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message):
            nonlocal streamed
            if message["type"] == "http.response.start" and _is_stream(message):
                streamed = True
                self.keys.drop(tenant, key)
            if streamed:
                return await send(message)
            sent.append(message)

        pending: list[int] = []
        token = pending_durable.set(pending)
        try:
            await self.app(scope, replay_body, capture)
        except BaseException:
            self.keys.drop(tenant, key)
            raise
        finally:
            pending_durable.reset(token)
        if streamed:
            return
        start = sent[0] if sent else None
        ok = start is not None and 200 <= start["status"] < 300
        if not ok:  # refused or failed: nothing of it is remembered, a retry runs again
            self.keys.drop(tenant, key)
            for message in sent:
                await send(message)
            return
        answer.start = start
        answer.body = b"".join(m.get("body", b"") for m in sent[1:])
        answer.durable_at = max(pending) if pending else None
        await self._replay(answer, fingerprint, scope, send, first=True)

    async def _replay(self, answer: Answer, fingerprint: bytes, scope, send, first: bool = False):
        if answer.fingerprint != fingerprint:
            err: APIStatusError = UnprocessableEntityError(
                "this Idempotency-Key was used with another request; use a new key per request")
        elif answer.start is None:
            err = ConflictError("a request with this Idempotency-Key is still running; retry later")
        elif answer.durable_at is not None and not await self._durable(answer.durable_at):
            err = StoreUnavailableError(
                "the store is unavailable: this change was applied but is not durable yet; "
                "retry with the same Idempotency-Key to get its answer once it is")
        else:
            answer.durable_at = None
            headers = list(answer.start.get("headers", []))
            if not first:
                headers.append((b"idempotent-replayed", b"true"))
            await send({**answer.start, "headers": headers})
            await send({"type": "http.response.body", "body": answer.body})
            return
        await error_response(err)(scope, _no_body, send)

    async def _durable(self, position: int) -> bool:
        journal = self.journal()
        if journal is None:
            return True
        try:
            await asyncio.wrap_future(journal.sync(position))
        except StoreUnavailableError:
            return False
        return True


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def _is_stream(start: dict) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in start.get("headers", []))


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}
