"""Tenants: API keys, ownership of sessions and snapshots, and per-tenant limits.

A tenant sees only what it created: any other id is answered as unknown (404), so ids
leak nothing across tenants. Without keys configured every request is the tenant
"default" (the server then listens on loopback only, unless told otherwise).

Keys come from a JSON file,

    {"keys": {"sk-alice-1": "alice", "sk-bob": "bob"},
     "tenants": {"alice": {"max_sessions": 100, "max_tokens": 1000000, "admin": true}}}

or from AGENTOS_API_KEYS="sk-alice-1=alice,sk-bob=bob" (a key without "=name" is its own
tenant). Limits not given per tenant take the server's defaults. Only an `admin` tenant
(every request of an open server) may act on the whole engine: weights, pause, sleep.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agentos.kernel.errors import (
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)


@dataclass(slots=True, eq=False)
class Tenant:
    name: str
    max_sessions: int | None = None  # live sessions at once; None = no limit
    max_tokens: int | None = None  # tokens held by its live sessions, generate calls counted
    sessions: set[str] = field(default_factory=set)
    snapshots: set[str] = field(default_factory=set)
    reserved_tokens: int = 0  # admitted but not yet in a session (generate calls in flight)
    reserved_sessions: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    admin: bool = False  # may act on the whole engine (weights, pause, sleep)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError(f"tenant {self.name!r} may not act on the engine "
                                        "(needs \"admin\": true in the keys file)")

    def session(self, sid: str) -> str:
        if sid not in self.sessions:
            raise NotFoundError(f"no session {sid!r}")
        return sid

    def snapshot(self, snap_id: str) -> str:
        if snap_id not in self.snapshots:
            raise NotFoundError(f"no snapshot {snap_id!r}")
        return snap_id

    @asynccontextmanager
    async def admit(self, engine, sessions: int = 0, tokens: int = 0):
        """Holds a reservation (see `reserve`) while the block runs."""
        release = await self.reserve(engine, sessions, tokens)
        try:
            yield
        finally:
            release()

    async def reserve(self, engine, sessions: int = 0, tokens: int = 0) -> Callable[[], None]:
        """Admits an operation that adds `sessions` sessions and `tokens` tokens and keeps
        them reserved until the returned function is called. Raises RateLimitError
        (changing nothing) when a limit would be exceeded."""
        check_tokens = self.max_tokens is not None and tokens > 0
        check_sessions = self.max_sessions is not None and sessions > 0
        if not (check_tokens or check_sessions):
            return _nothing
        async with self.lock:
            if check_sessions and len(self.sessions) + self.reserved_sessions + sessions > self.max_sessions:
                raise RateLimitError(f"tenant {self.name!r} may hold {self.max_sessions} live "
                                     f"sessions; it holds {len(self.sessions)}")
            if check_tokens:
                held = await engine.num_tokens(list(self.sessions)) + self.reserved_tokens
                if held + tokens > self.max_tokens:
                    raise RateLimitError(
                        f"tenant {self.name!r} may hold {self.max_tokens} tokens; it holds "
                        f"{held} and this call may add {tokens}")
            self.reserved_tokens += tokens
            self.reserved_sessions += sessions

        released = False

        def release() -> None:  # idempotent
            nonlocal released
            if not released:
                released = True
                self.reserved_tokens -= tokens
                self.reserved_sessions -= sessions

        return release


def _nothing() -> None:
    pass


class Tenants:
    def __init__(self, keys: dict[str, str] | None = None, limits: dict[str, dict] | None = None,
                 max_sessions: int | None = None, max_tokens: int | None = None):
        self.keys = dict(keys or {})
        limits = limits or {}
        names = set(self.keys.values()) or {"default"}
        self.by_name = {
            n: Tenant(n, limits.get(n, {}).get("max_sessions", max_sessions),
                      limits.get(n, {}).get("max_tokens", max_tokens),
                      admin=bool(limits.get(n, {}).get("admin", not self.keys)))
            for n in names}

    @property
    def open(self) -> bool:
        return not self.keys

    def authenticate(self, authorization: str, x_api_key: str) -> Tenant:
        """The tenant of the request's key (`Authorization: Bearer KEY` or `X-API-Key`).
        Raises AuthenticationError when keys are configured and none matches."""
        if self.open:
            return self.by_name["default"]
        key = x_api_key
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            key = value.strip()
        if not key:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        for known, name in self.keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return self.by_name[name]
        raise AuthenticationError("invalid API key")


def load_tenants(path: str | None = None, env: str | None = None,
                 max_sessions: int | None = None, max_tokens: int | None = None) -> Tenants:
    """Reads keys from the JSON file at `path` and/or the AGENTOS_API_KEYS-style string
    `env` (default: the environment variable). Raises ValueError on a malformed file."""
    keys: dict[str, str] = {}
    limits: dict[str, dict] = {}
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read API keys from {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys", {}), dict):
            raise ValueError(f"{path}: expected {{\"keys\": {{key: tenant}}, \"tenants\": {{...}}}}")
        keys.update({str(k): str(v) for k, v in data.get("keys", {}).items()})
        limits = data.get("tenants", {}) or {}
    env = os.environ.get("AGENTOS_API_KEYS", "") if env is None else env
    for item in filter(None, (x.strip() for x in env.split(","))):
        key, _, name = item.partition("=")
        keys[key.strip()] = name.strip() or key.strip()
    if any(not k for k in keys):
        raise ValueError("an API key is empty")
    return Tenants(keys, limits, max_sessions, max_tokens)
