"""The fast path for simple routes answers exactly as FastAPI does: every request of a
scenario (successes, validation errors, wrong content types, other tenants' ids, msgpack,
idempotency keys) gets the same status and body with it on and off."""

from __future__ import annotations

import json
import os

import msgpack
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from agentos.api.app import ServerSettings, create_app
from agentos.api.tenants import load_tenants
from agentos.engine import AsyncEngine

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
VOLATILE = {"created_at", "last_active", "swapped_s", "queue_wait_s", "created"}


@pytest.fixture(scope="module")
def served():
    engine = AsyncEngine("tiny", kv_blocks=1024)
    app = create_app(ServerSettings(max_tokens_cap=16), engine=engine,
                     tenants=load_tenants(env="key-a=alice,key-b=bob"))
    with TestClient(app) as c:
        yield app, c
    engine.kernel.shutdown()


def scenario(c) -> list[tuple[int, object]]:
    """Runs the requests; returns each one's status and decoded body."""
    out = []

    def call(method, path, headers=A, keys_only=False, **kw):
        r = c.request(method, path, headers=headers, **kw)
        kind = r.headers.get("content-type", "").split(";")[0]
        if kind == "application/msgpack":
            body = msgpack.unpackb(r.content)
        elif kind == "text/event-stream":  # the events' data, in order
            body = [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                    for line in r.text.splitlines() if line.startswith("data: ")]
        elif kind == "application/json":
            body = r.json()
        else:
            body = (kind, r.content if method == "GET" else len(r.content))
        out.append((r.status_code, sorted(body) if keys_only else body))
        return body

    sid = call("POST", "/v1/sessions", json={"tokens": [1, 5, 6, 7]})["id"]
    call("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 3, "temperature": 0})
    call("GET", f"/v1/sessions/{sid}")
    call("GET", f"/v1/sessions/{sid}/tokens")
    snap = call("POST", f"/v1/sessions/{sid}/snapshots")["id"]
    call("GET", f"/v1/snapshots/{snap}")
    call("GET", f"/v1/sessions/{sid}/snapshots")
    kids = call("POST", f"/v1/sessions/{sid}/fork", json={"n": 2})["data"]
    call("POST", f"/v1/sessions/{sid}/append", json={"tokens": [9, 10]})
    call("POST", f"/v1/sessions/{sid}/rollback", json={"snapshot_id": snap})
    call("POST", f"/v1/sessions/{sid}/score", json={"tokens": [3, 4]})
    call("POST", f"/v1/sessions/{sid}/next_token_logprobs", json={"top_k": 3})
    # routes that take the request too: streamed and plain generates, OpenAI's and vLLM's
    # completions, an import (the raw body), the system's state (its counters move: keys)
    call("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 2, "stream": True,
                                                              "temperature": 0})
    call("POST", "/v1/completions", json={"model": "tiny", "prompt": [1, 5, 6], "max_tokens": 3,
                                          "temperature": 0})
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0}
    call("POST", "/v1/chat/completions", json=chat)
    call("POST", "/v1/chat/completions", json={**chat, "stream": True})
    call("POST", "/v1/chat/completions", json={**chat, "model": "other"})
    call("POST", "/inference/v1/generate", json={"token_ids": [1, 5], "sampling_params": {
        "max_tokens": 2, "temperature": 0}})
    record = c.get(f"/v1/sessions/{sid}/export", headers=A).content
    imported = call("POST", "/v1/sessions/import", content=record,
                    headers={**A, "Content-Type": "application/octet-stream"})
    call("POST", "/v1/sessions/import", content=b"junk",
         headers={**A, "Content-Type": "application/octet-stream"})
    call("DELETE", f"/v1/sessions/{imported['id']}")
    call("GET", "/v1/system", keys_only=True)
    # validation: FastAPI's own 400 and 422
    call("POST", f"/v1/sessions/{sid}/fork", json={"n": 0})
    call("POST", f"/v1/sessions/{sid}/fork", json={"n": "two"})
    call("POST", f"/v1/sessions/{sid}/fork", json={"n": 1, "extra": True})
    call("POST", f"/v1/sessions/{sid}/fork", json=[1])
    call("POST", f"/v1/sessions/{sid}/fork")
    call("POST", f"/v1/sessions/{sid}/rollback", content=b"{not json",
         headers={**A, "Content-Type": "application/json"})
    call("POST", f"/v1/sessions/{sid}/rollback", content=b'{"snapshot_id": "x"}',
         headers={**A, "Content-Type": "text/plain"})
    call("POST", f"/v1/sessions/{sid}/rollback", content=b'{"snapshot_id": "x"}', headers=A)
    call("POST", f"/v1/sessions/{sid}/rollback", json={})
    call("POST", f"/v1/sessions/{sid}/append", json={"tokens": [1], "text": "both"})
    call("POST", f"/v1/sessions/{sid}/append", json={"tokens": [10 ** 9]})
    # errors the routes raise: unknown ids, another tenant's ids, wrong methods and paths
    call("POST", f"/v1/sessions/{sid}/rollback", json={"snapshot_id": "nope"})
    call("POST", "/v1/sessions/nope/fork", json={"n": 1})
    call("GET", f"/v1/sessions/{sid}", headers=B)
    call("POST", f"/v1/sessions/{sid}/rollback", headers=B, json={"snapshot_id": snap})
    call("DELETE", f"/v1/snapshots/{snap}", headers=B)
    call("PUT", f"/v1/sessions/{sid}/fork", json={"n": 1})
    call("POST", f"/v1/sessions/{sid}/fork/", json={"n": 1})
    call("GET", "/v1/sessions/a/b/c")
    call("GET", f"/v1/sessions/{sid}", headers={})
    # msgpack both ways, and an idempotent retry
    packed = {**A, "Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    call("POST", f"/v1/sessions/{sid}/fork", content=msgpack.packb({"n": 1}), headers=packed)
    call("POST", f"/v1/sessions/{sid}/fork", content=b"\xc1", headers=packed)
    keyed = {**A, "Idempotency-Key": os.urandom(8).hex()}  # a key per run
    first = call("POST", f"/v1/sessions/{sid}/snapshots", headers=keyed)
    again = call("POST", f"/v1/sessions/{sid}/snapshots", headers=keyed)
    assert first == again
    call("POST", f"/v1/snapshots/{snap}/restore")
    for k in kids:
        call("DELETE", f"/v1/sessions/{k['id']}")
    call("DELETE", f"/v1/snapshots/{snap}")
    call("DELETE", f"/v1/snapshots/{first['id']}")
    call("DELETE", f"/v1/sessions/{sid}")
    call("DELETE", f"/v1/sessions/{sid}")
    return out


def normalized(results: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Ids replaced by their order of first appearance; times dropped."""
    names: dict[str, str] = {}

    def norm(x, key=None):
        if isinstance(x, dict):
            return {k: norm(v, k) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [norm(v) for v in x]
        if isinstance(x, str) and (key in ("id", "parent_id", "session_id")
                                   or x.startswith(("sess", "snap"))):
            return names.setdefault(x, f"<id{len(names)}>")
        if isinstance(x, str):  # messages name ids too
            for real, name in names.items():
                x = x.replace(real, name)
        return x

    return [(status, norm(body)) for status, body in results]


def test_fast_path_answers_as_fastapi(served):
    app, c = served
    app.state.fast_routes = False
    slow = normalized(scenario(c))
    app.state.fast_routes = True
    fast = normalized(scenario(c))
    assert [s for s, _ in slow] == [s for s, _ in fast]
    for i, (a, b) in enumerate(zip(slow, fast)):
        assert a == b, (i, a, b)
    statuses = {s for s, _ in fast}
    assert {200, 201, 400, 401, 404, 405, 422} <= statuses  # the scenario reaches each kind


def test_simple_routes_take_the_fast_path(served):
    """The hot syscall and generate routes are served by the fast path; routes with query
    parameters stay with FastAPI."""
    app, _ = served
    fast = app.middleware_stack
    while type(fast).__name__ != "FastRoutes":
        fast = fast.app

    def route_of(method, path):
        found = fast.match({"path": path, "method": method})
        return found and found[0].route.path

    for method, path in [("POST", "/v1/sessions/s1/fork"), ("POST", "/v1/sessions/s1/rollback"),
                         ("POST", "/v1/sessions/s1/snapshots"), ("GET", "/v1/sessions/s1"),
                         ("DELETE", "/v1/sessions/s1"), ("DELETE", "/v1/snapshots/x"),
                         ("POST", "/v1/sessions/s1/append"), ("POST", "/v1/sessions"),
                         ("POST", "/v1/sessions/s1/generate"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/v1/sessions/import"),
                         ("POST", "/inference/v1/generate")]:
        assert route_of(method, path) is not None, (method, path)
    assert route_of("POST", "/v1/sessions/s1/rollback") == "/v1/sessions/{sid}/rollback"
    for method, path in [("GET", "/v1/sessions/s1/export"), ("PUT", "/v1/sessions/s1/fork"),
                         ("GET", "/v1/nothing"), ("POST", "/v1/engine/pause")]:
        assert route_of(method, path) is None, (method, path)


def test_fast_path_counts_requests_by_route(served):
    """The request log and metrics name the route template, as for FastAPI's routes."""
    app, c = served
    sid = c.post("/v1/sessions", json={"tokens": [1, 2]}, headers=A).json()["id"]
    c.get(f"/v1/sessions/{sid}", headers=A)
    c.delete(f"/v1/sessions/{sid}", headers=A)
    metrics = generate_latest(app.state.http_metrics.registry).decode()
    assert 'route="/v1/sessions/{sid}",status="200"' in metrics
    assert sid not in metrics
