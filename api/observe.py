"""Request logs and HTTP metrics: one structured line per request, with a request id.

`RequestLogMiddleware` runs outermost. It takes the client's `X-Request-ID` (or makes
one), returns it on the response, and when the response ends logs one line to the
`agentos.access` logger with the method, path, route, status, duration, tenant and id.
It also counts the request in Prometheus metrics labelled by route template (never by raw
path, so session ids do not multiply the series) and status.

`configure_logging("json")` makes every `agentos.*` logger write one JSON object per
line; "text" writes `key=value` pairs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger("agentos.access")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class HttpMetrics:
    """The HTTP families of one app, in their own registry (merged into /metrics)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("agentos_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("agentos_http_request_duration_seconds",
                                 "HTTP request time, headers in to last byte out",
                                 ["method", "route"], registry=self.registry,
                                 # from 100 us: a fork, a rollback or an info is well
                                 # under a millisecond
                                 buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025,
                                          .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        # (method, route, status) -> its two children: labels() takes a lock and builds
        # its key each call. Bounded: routes are templates, statuses a few dozen codes
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Counts one request of `route` (a template) and its time."""
        if method not in _METHODS:  # a client's own method name: not a series of its own
            method = "OTHER"
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)),
                        self.latency.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class RequestLogMiddleware:
    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # unless a response starts
        t0 = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.observe(method, template, status, seconds)
            if log.isEnabledFor(logging.INFO):
                tenant = scope.get("state", {}).get("tenant")
                log.info("request", extra={"fields": {
                    "request_id": rid, "method": method, "path": scope.get("path", ""),
                    "route": template, "status": status, "ms": round(seconds * 1e3, 2),
                    "tenant": getattr(tenant, "name", None)}})


def _header(scope: dict, name: bytes) -> str:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return ""


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str):
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                  "logger": record.name, "msg": record.getMessage(),
                  **getattr(record, "fields", {})}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        if self.json:
            return json.dumps(fields, ensure_ascii=False, default=str)
        return " ".join(f"{k}={_text(v)}" for k, v in fields.items())


def _text(v) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """One line per record for every `agentos.*` logger: "json" or "text" (key=value)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger("agentos")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
