"""Tenants: API keys, ownership of sessions and snapshots, and per-tenant limits.

A tenant sees only what it created: any other id is answered as unknown (404), so ids
leak nothing across tenants. Who owns what is the kernel's record (each session's and
snapshot's `owner`, journaled with it), asked for on each request. Without keys
configured every request is the tenant "default" (the server then listens on loopback
only, unless told otherwise); with keys, no key may claim that name.

Keys come from a JSON file,

    {"keys": {"sk-alice-1": "alice", "sk-bob": "bob"},
     "tenants": {"alice": {"max_sessions": 100, "max_tokens": 1000000,
                           "max_snapshots": 1000, "admin": true}}}

or from AGENTOS_API_KEYS="sk-alice-1=alice,sk-bob=bob" (a key without "=name" is its own
tenant). Limits not given per tenant take the server's defaults. Tenants giving the same
`"cache_scope": "name"` share prefix-cache pages; the others share with no one. Only an
`admin` tenant may act on the whole engine (weights, pause, sleep); on a server without
keys, only when it was started with --allow-open-admin.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agentos.engine import DEFAULT_OWNER as DEFAULT
from agentos.kernel.errors import (
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)


@dataclass(slots=True, eq=False)
class Bucket:
    """A token bucket: refills at `rate` a second up to `rate * burst_s`. A request may
    overdraw it (a body larger than the burst passes once the bucket is full) and later
    requests wait until the debt is repaid, so the average stays at `rate`."""

    rate: float
    burst_s: float = 1.0
    level: float = field(init=False)
    at: float = field(init=False)

    def __post_init__(self):
        if not self.rate > 0:
            raise ValueError(f"a rate must be > 0, got {self.rate!r}")
        self.level, self.at = self.rate * self.burst_s, time.monotonic()

    def wait(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0: now)."""
        now = time.monotonic()
        self.level = min(self.rate * self.burst_s, self.level + (now - self.at) * self.rate)
        self.at = now
        need = min(amount, self.rate * self.burst_s)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass(slots=True, eq=False)
class Tenant:
    """A tenant's limits and reservations. What it owns is the kernel's to say: every
    session and snapshot records its owner, so ownership survives restarts and re-homing."""

    name: str
    max_sessions: int | None = None  # live sessions at once; None = no limit
    max_tokens: int | None = None  # tokens held by its live sessions, generate calls counted
    max_snapshots: int | None = None  # live snapshots, those of closed sessions included
    reserved_tokens: int = 0  # admitted but not yet in a session (generate calls in flight)
    reserved_sessions: int = 0
    reserved_snapshots: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    admin: bool = False  # may act on the whole engine (weights, pause, sleep)
    cache_scope: str | None = None  # prefix-cache scope shared with tenants naming it; None: its own
    requests: Bucket | None = None  # requests a second, at most; None = no limit
    body_bytes: Bucket | None = None  # request body bytes a second, at most; None = no limit

    def throttle(self, body_bytes: int) -> None:
        """Admits one request with a body of `body_bytes` against the tenant's rates, before
        its body is read. Raises RateLimitError (with retry_after) when either is spent."""
        buckets = [(b, n) for b, n in ((self.requests, 1), (self.body_bytes, body_bytes))
                   if b is not None]
        wait = max((b.wait(n) for b, n in buckets), default=0.0)
        if wait > 0:
            err = RateLimitError(f"tenant {self.name!r} is over its request rate; retry in "
                                 f"{wait:.2f} s")
            err.retry_after = wait
            raise err
        for b, n in buckets:
            b.take(n)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError(
                f"tenant {self.name!r} may not act on the engine: it needs \"admin\": true in "
                "the keys file (a server without API keys needs --allow-open-admin)")

    async def session(self, engine, sid: str) -> str:
        """`sid` if the tenant owns that live session. Raises NotFoundError otherwise, as
        for an unknown id."""
        if not await engine.list_sessions([sid], owner=self.name):
            raise NotFoundError(f"no session {sid!r}")
        return sid

    async def snapshot(self, engine, snap_id: str):
        """The Snapshot handle if the tenant owns that live snapshot. Raises NotFoundError
        otherwise, as for an unknown id."""
        try:
            snap = await engine.get_snapshot(snap_id)
        except NotFoundError:
            snap = None
        if snap is None or snap.owner != self.name:
            raise NotFoundError(f"no snapshot {snap_id!r}")
        return snap

    @asynccontextmanager
    async def admit(self, engine, sessions: int = 0, tokens: int = 0, snapshots: int = 0):
        """Holds a reservation (see `reserve`) while the block runs."""
        release = await self.reserve(engine, sessions, tokens, snapshots)
        try:
            yield
        finally:
            release()

    async def reserve(self, engine, sessions: int = 0, tokens: int = 0,
                      snapshots: int = 0) -> Callable[[], None]:
        """Admits an operation that adds `sessions` sessions, `tokens` tokens and
        `snapshots` snapshots, and keeps them reserved until the returned function is
        called (idempotent). Raises RateLimitError (changing nothing) when a limit would be
        exceeded."""
        checks = [(self.max_sessions, sessions), (self.max_tokens, tokens),
                  (self.max_snapshots, snapshots)]
        if not any(limit is not None and n > 0 for limit, n in checks):
            return _nothing
        async with self.lock:
            held = await engine.usage(self.name)
            for what, limit, n, reserved in (
                    ("sessions", self.max_sessions, sessions, self.reserved_sessions),
                    ("tokens", self.max_tokens, tokens, self.reserved_tokens),
                    ("snapshots", self.max_snapshots, snapshots, self.reserved_snapshots)):
                if limit is not None and n > 0 and held[what] + reserved + n > limit:
                    raise RateLimitError(
                        f"tenant {self.name!r} may hold {limit} {what}; it holds "
                        f"{held[what] + reserved} and this call may add {n}")
            self.reserved_sessions += sessions
            self.reserved_tokens += tokens
            self.reserved_snapshots += snapshots

        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.reserved_sessions -= sessions
                self.reserved_tokens -= tokens
                self.reserved_snapshots -= snapshots

        return release


def _nothing() -> None:
    pass


class Tenants:
    def __init__(self, keys: dict[str, str] | None = None, limits: dict[str, dict] | None = None,
                 max_sessions: int | None = None, max_tokens: int | None = None,
                 max_snapshots: int | None = None, allow_open_admin: bool = False,
                 requests_per_s: float | None = None, body_bytes_per_s: float | None = None):
        self.keys = dict(keys or {})
        limits = limits or {}
        names = set(self.keys.values()) or {DEFAULT}

        def tenant(n: str) -> Tenant:
            own = limits.get(n, {})
            return Tenant(n, own.get("max_sessions", max_sessions), own.get("max_tokens", max_tokens),
                          own.get("max_snapshots", max_snapshots),
                          admin=bool(own.get("admin", allow_open_admin and not self.keys)),
                          cache_scope=str(own["cache_scope"]) if own.get("cache_scope") else None,
                          requests=_bucket(own.get("requests_per_s", requests_per_s)),
                          body_bytes=_bucket(own.get("body_bytes_per_s", body_bytes_per_s)))

        self.by_name = {n: tenant(n) for n in names}

    @property
    def open(self) -> bool:
        return not self.keys

    def authenticate(self, authorization: str, x_api_key: str) -> Tenant:
        """The tenant of the request's key (`Authorization: Bearer KEY` or `X-API-Key`).
        Raises AuthenticationError when keys are configured and none matches."""
        if self.open:
            return self.by_name[DEFAULT]
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
                 max_sessions: int | None = None, max_tokens: int | None = None,
                 max_snapshots: int | None = None, allow_open_admin: bool = False,
                 requests_per_s: float | None = None,
                 body_bytes_per_s: float | None = None) -> Tenants:
    """Reads keys from the JSON file at `path` and/or the AGENTOS_API_KEYS-style string
    `env` (default: the environment variable). Raises ValueError on a malformed file or
    a key mapped to the tenant "default" (the owner of an open server's records)."""
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
    if DEFAULT in keys.values():
        raise ValueError(f"no API key may map to the tenant {DEFAULT!r}: it owns what an open "
                         "server (no keys) created; give that tenant another name")
    return Tenants(keys, limits, max_sessions, max_tokens, max_snapshots, allow_open_admin,
                   requests_per_s, body_bytes_per_s)


def _bucket(rate) -> Bucket | None:
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"a tenant's requests_per_s and body_bytes_per_s must be numbers > 0, "
                         f"got {rate!r}")
    return Bucket(float(rate))
