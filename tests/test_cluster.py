"""Workers behind a gateway: the registry and heartbeats in Redis, the gateway's routing
(fake workers: small FastAPI apps under uvicorn in threads), re-homing a dead worker's
records, the worker side (internal route, fence, heartbeat wiring), and end to end:
two `agentos serve --worker` processes behind `agentos gateway`, one killed."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager

import httpx
import msgpack
import pytest
import redis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from agentos.api.gateway import Gateway, create_gateway
from agentos.bench.api import free_port, run_agentos
from agentos.bench.redis_server import RedisServer
from agentos.snapshot.durable.cluster import SECRET_HEADER, Heartbeat, WorkerRegistry, plan_rehome

_names = itertools.count()


@pytest.fixture(scope="module")
def redis_url():
    try:
        server = RedisServer()
    except RuntimeError as e:
        pytest.skip(str(e))
    with server:
        yield server.url


@pytest.fixture
def ns():
    """A fresh deployment per test: (deployment name, key namespace)."""
    name = f"t{next(_names)}_{time.monotonic_ns()}"
    return name, f"agentos:{name}"


def wait_for(predicate, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def dir_entries(client, ns: str) -> dict[str, list]:
    return {k.decode(): msgpack.unpackb(v) for k, v in client.hgetall(f"{ns}:dir").items()}


# -- the registry and the plan ------------------------------------------------------------


def test_registry_leases_and_fencing(redis_url, ns):
    client = redis.Redis.from_url(redis_url)
    reg = WorkerRegistry(client, ns[1])
    a = reg.register("a", "http://a")
    b = reg.register("b", "http://b")
    assert reg.heartbeat("a", a, {"sessions": 3, "tokens": 40}, ttl_ms=200)
    assert reg.heartbeat("b", b, {"sessions": 1, "tokens": 5}, ttl_ms=10_000)
    view = reg.workers()
    assert {w: (i.alive, i.sessions, i.tokens, i.url) for w, i in view.items()} == {
        "a": (True, 3, 40, "http://a"), "b": (True, 1, 5, "http://b")}
    wait_for(lambda: not reg.workers()["a"].alive, what="a's lease to lapse")
    assert reg.workers()["a"].sessions == 0 and reg.workers()["b"].alive

    # a restarted "a" re-registers: the old registration can neither beat nor be removed
    a2 = reg.register("a", "http://a")
    assert not reg.heartbeat("a", a, {}, ttl_ms=1000)
    assert not reg.remove("a", a)
    assert reg.remove("a", a2) and "a" not in reg.workers()
    assert not reg.heartbeat("a", a2, {}, ttl_ms=1000)  # re-homed: fenced
    reg.leave("b")
    assert not reg.workers()["b"].alive

    assert reg.secret() == reg.secret() and len(reg.secret()) == 64
    token = reg.lock("a", 5000)
    assert token and reg.lock("a", 5000) is None and reg.locked("a")
    reg.unlock("a", "not-the-token")
    assert reg.locked("a")
    reg.unlock("a", token)
    assert not reg.locked("a") and reg.lock("a", 5000)

    client.hset(f"{ns[1]}:dir", mapping={"sess_1": msgpack.packb(["b", "alice", "s", "sess_1"]),
                                         "snap_1": msgpack.packb(["b", "alice", "p", "sess_1"]),
                                         "sess_2": msgpack.packb(["c", "bob", "s", "sess_2"])})
    assert reg.records("b") == {"sess_1": ("alice", "s", "sess_1"), "snap_1": ("alice", "p", "sess_1")}
    assert reg.records("nobody") == {}


def test_plan_rehome_keeps_families_together_and_spreads():
    records = {"sess_a1": ("alice", "s", "sess_a1"), "snap_a1": ("alice", "p", "sess_a1"),
               "sess_a2": ("alice", "s", "sess_a1"), "sess_b1": ("bob", "s", "sess_b1"),
               "sess_c1": ("alice", "s", "sess_c1"), "sess_c2": ("alice", "s", "sess_c1")}
    plan = plan_rehome(records, {"w1": 0, "w2": 1})
    assert sorted(i for ids in plan.values() for i in ids) == sorted(records)
    worker_of = {i: w for w, ids in plan.items() for i in ids}
    for family in ("sess_a1", "sess_b1", "sess_c1"):
        assert len({worker_of[i] for i, (_, _, f) in records.items() if f == family}) == 1
    assert worker_of["sess_a1"] == "w1"  # the biggest family to the least loaded
    assert worker_of["sess_c1"] == "w2" and worker_of["sess_b1"] == "w1"  # w1 2 sessions, w2 3
    assert plan_rehome({}, {}) == {}
    with pytest.raises(ValueError):
        plan_rehome(records, {})


def test_heartbeat_thread_survives_redis_outage(ns):
    try:
        server = RedisServer()
    except RuntimeError as e:
        pytest.skip(str(e))
    with server:
        reg = WorkerRegistry(redis.Redis.from_url(server.url, socket_timeout=0.5,
                                                  socket_connect_timeout=0.5), ns[1])
        load = {"sessions": 2, "tokens": 7}
        hb = Heartbeat(reg, "w", "http://w", lambda: load, interval_s=0.05).start()
        try:
            wait_for(lambda: reg.workers()["w"].sessions == 2, what="the load")
            load = {"sessions": 5, "tokens": 9}
            wait_for(lambda: reg.workers()["w"].sessions == 5, what="the new load")
            server.stop()
            time.sleep(0.3)  # beats fail, logged
            assert hb._thread.is_alive() and not hb.fenced
            server.start()
            beats = hb.beats
            wait_for(lambda: hb.beats > beats + 2, what="beats after the outage")
            assert reg.workers()["w"].alive
            reg.remove("w", hb.registration)
            wait_for(lambda: hb.fenced, what="the fence")
            wait_for(lambda: not hb._thread.is_alive(), what="the thread to end")
        finally:
            hb.stop()
        assert "w" not in reg.workers()


def test_heartbeat_stop_ends_the_lease(redis_url, ns):
    reg = WorkerRegistry(redis.Redis.from_url(redis_url), ns[1])
    hb = Heartbeat(reg, "w", "http://w", lambda: 1 / 0, interval_s=10).start()  # load fails
    assert reg.workers()["w"].alive and reg.workers()["w"].sessions == 0
    hb.stop()
    assert not reg.workers()["w"].alive  # registered, lease ended: to be re-homed


# -- fake workers and the gateway -----------------------------------------------------


@contextmanager
def serve_app(app, port: int | None = None):
    """Serves an ASGI app with uvicorn in a thread; yields (url, server)."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 10, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(10)


class FakeWorker:
    """A worker's HTTP surface without an engine: sessions are names in the directory."""

    def __init__(self, redis_url: str, ns: str, wid: str):
        self.id = wid
        self.ns = ns
        self.redis = redis.Redis.from_url(redis_url)
        self.registry = WorkerRegistry(self.redis, ns)
        self.sessions: set[str] = set()
        self.adopted: list[str] = []
        self.admin_error = False
        self.calls: list[dict] = []
        self.app = self._app()
        self.stack = ExitStack()
        self.heartbeat: Heartbeat | None = None

    def start(self) -> FakeWorker:
        self.url, self.server = self.stack.enter_context(serve_app(self.app))
        self.heartbeat = Heartbeat(self.registry, self.id, self.url, self.load, interval_s=0.1).start()
        return self

    def load(self) -> dict:
        return {"sessions": len(self.sessions), "tokens": 0}

    def kill(self) -> None:
        """A crash: the server stops and the lease lapses (nothing is cleaned up)."""
        self.heartbeat.stop(leave=False)
        self.stack.close()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.stack.close()

    def _app(self) -> FastAPI:
        app = FastAPI()
        dir_key = f"{self.ns}:dir"

        @app.post("/v1/sessions", status_code=201)
        async def create(request: Request):
            sid = f"sess_{self.id}_{len(self.sessions)}_{time.monotonic_ns()}"
            self.redis.hset(dir_key, sid, msgpack.packb([self.id, "default", "s"]))
            self.sessions.add(sid)
            return {"id": sid, "worker": self.id}

        @app.get("/v1/sessions")
        async def list_sessions(request: Request):
            if request.headers.get("authorization") == "Bearer bad":
                return JSONResponse({"error": {"type": "authentication_error", "message": "no",
                                               "code": 401}}, status_code=401)
            return {"object": "list", "data": [{"id": s, "worker": self.id}
                                               for s in sorted(self.sessions)]}

        @app.post("/v1/internal/adopt")
        async def adopt(request: Request):
            if request.headers.get(SECRET_HEADER) != self.registry.secret():
                return JSONResponse({"error": {"type": "permission_denied", "message": "no",
                                               "code": 403}}, status_code=403)
            items = []
            for rid in (await request.json())["ids"]:
                value = self.redis.hget(dir_key, rid)
                if value is None:
                    continue
                _, owner, kind = msgpack.unpackb(value)
                self.redis.hset(dir_key, rid, msgpack.packb([self.id, owner, kind]))
                self.sessions.add(rid)
                self.adopted.append(rid)
                items.append({"id": rid, "kind": "session" if kind == "s" else "snapshot",
                              "owner": owner})
            return {"data": items}

        @app.post("/v1/engine/{op}")
        async def engine(op: str):
            self.calls.append({"path": f"/v1/engine/{op}"})
            if self.admin_error:
                return JSONResponse({"error": {"type": "permission_denied", "message": self.id,
                                               "code": 403}}, status_code=403)
            return {"ok": True, "worker": self.id}

        @app.post("/v1/sessions/{sid}/generate")
        async def generate(sid: str, request: Request):
            body = await request.json()
            if not body.get("stream"):
                return {"worker": self.id, "tokens": [1, 2]}

            async def events():
                yield 'data: {"token": 1}\n\n'
                await asyncio.sleep(0.6)
                yield 'data: {"token": 2}\n\n'

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"])
        async def echo(path: str, request: Request):
            parts = path.split("/")
            if parts[0] in ("sessions", "snapshots") and len(parts) > 1 and parts[1] not in self.sessions:
                return JSONResponse({"error": {"type": "not_found_error", "message": parts[1],
                                               "code": 404}}, status_code=404)
            call = {"worker": self.id, "method": request.method, "path": f"/v1/{path}",
                    "query": request.url.query, "body": (await request.body()).decode(),
                    "authorization": request.headers.get("authorization"),
                    "x-api-key": request.headers.get("x-api-key"),
                    "content-type": request.headers.get("content-type")}
            self.calls.append(call)
            return JSONResponse(call, headers={"retry-after": "1"} if path == "slow" else None)

        return app


@pytest.fixture
def cluster(redis_url, ns):
    """Two fake workers (leases of 0.3 s) behind a gateway app (worker timeout 0.3 s)."""
    workers = []
    try:
        workers = [FakeWorker(redis_url, ns[1], w).start() for w in ("w1", "w2")]
        app = create_gateway(redis_url, ns[0], worker_timeout_s=0.3)
        with serve_app(app) as (url, _), httpx.Client(base_url=url, trust_env=False,
                                                      timeout=10) as http:
            yield http, {w.id: w for w in workers}, app.state.gateway
    finally:
        for w in workers:
            w.close()


def test_gateway_places_spreads_and_routes(cluster, redis_url, ns):
    http, workers, gateway = cluster
    made = [http.post("/v1/sessions", json={"prompt": "x"}) for _ in range(6)]
    assert all(r.status_code == 201 for r in made)
    by_worker = [r.json()["worker"] for r in made]
    assert by_worker.count("w1") == 3 and by_worker.count("w2") == 3  # a burst spreads

    for r in made:  # a record's calls go to its worker, unchanged
        sid, wid = r.json()["id"], r.json()["worker"]
        got = http.post(f"/v1/sessions/{sid}/append?x=1&y=two", content=b'{"text": "hi"}',
                        headers={"Authorization": "Bearer k1", "X-API-Key": "k2",
                                 "Content-Type": "application/json"})
        assert got.status_code == 200
        assert got.json() == {"worker": wid, "method": "POST", "path": f"/v1/sessions/{sid}/append",
                              "query": "x=1&y=two", "body": '{"text": "hi"}',
                              "authorization": "Bearer k1", "x-api-key": "k2",
                              "content-type": "application/json"}
        assert http.delete(f"/v1/sessions/{sid}/x").json()["worker"] == wid

    # an unknown id goes to some worker, which answers 404 itself
    r = http.get("/v1/sessions/sess_nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"

    # the list is every worker's, merged; an error from one is the answer
    listed = http.get("/v1/sessions").json()
    assert listed["object"] == "list"
    assert [d["id"] for d in listed["data"]] == sorted(r.json()["id"] for r in made)
    assert http.get("/v1/sessions", headers={"Authorization": "Bearer bad"}).status_code == 401
    packed = http.get("/v1/sessions", headers={"Accept": "application/msgpack"})
    assert packed.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(packed.content) == listed

    # admin calls reach every worker: the first error, else the first answer
    assert http.post("/v1/engine/pause").json()["ok"]
    assert all(w.calls[-1] == {"path": "/v1/engine/pause"} for w in workers.values())
    workers["w2"].admin_error = True
    r = http.post("/v1/engine/resume")
    assert r.status_code == 403 and r.json()["error"]["message"] == "w2"

    # other routes: a live worker; internal routes are not reachable through the gateway
    r = http.post("/v1/tokenize", json={"text": "a"})
    assert r.status_code == 200 and r.json()["worker"] in workers
    assert http.get("/v1/slow").headers["retry-after"] == "1"
    assert http.post("/v1/internal/adopt", json={"ids": []}).status_code == 404

    health = http.get("/health").json()
    assert health["live"] == 2 and {w["id"] for w in health["workers"]} == {"w1", "w2"}


def test_gateway_streams_events_as_they_come(cluster):
    http, workers, _ = cluster
    sid = http.post("/v1/sessions", json={}).json()["id"]
    t0 = time.monotonic()
    with http.stream("POST", f"/v1/sessions/{sid}/generate", json={"stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        t_first = time.monotonic() - t0
        rest = [line for line in lines if line]
    assert first == 'data: {"token": 1}' and rest == ['data: {"token": 2}']
    assert t_first < 0.45, f"the first event took {t_first:.2f} s: buffered"
    assert http.post(f"/v1/sessions/{sid}/generate", json={}).json()["tokens"] == [1, 2]


def test_gateway_rehomes_a_dead_worker(cluster, redis_url, ns):
    http, workers, gateway = cluster
    client = redis.Redis.from_url(redis_url)
    made = [http.post("/v1/sessions", json={}).json() for _ in range(6)]
    dead = workers["w1"]
    moved = sorted(m["id"] for m in made if m["worker"] == "w1")
    client.hset(f"{ns[1]}:dir", "snap_x", msgpack.packb(["w1", "default", "p"]))
    dead.sessions.add("snap_x")
    dead.kill()

    # the next request to a session of the dead worker succeeds: its lease lapses, its
    # records move, the request goes on
    r = http.post(f"/v1/sessions/{moved[0]}/append", json={})
    assert r.status_code == 200 and r.json()["worker"] == "w2"
    entries = dir_entries(client, ns[1])
    assert all(entries[i][0] == "w2" for i in [*moved, "snap_x"])
    assert sorted(workers["w2"].adopted) == sorted([*moved, "snap_x"])
    assert "w1" not in WorkerRegistry(client, ns[1]).workers()
    assert http.get("/v1/snapshots/snap_x").json()["worker"] == "w2"
    assert not dead.heartbeat.beat() and dead.heartbeat.fenced  # should it come back
    assert http.get("/health").json()["live"] == 1

    # new sessions go to the survivor; once it is gone too, 503
    assert http.post("/v1/sessions", json={}).json()["worker"] == "w2"
    workers["w2"].kill()
    wait_for(lambda: http.get("/health").status_code == 503, what="no live workers")
    r = http.post("/v1/sessions", json={})
    assert r.status_code == 503
    assert r.json()["error"] == {"type": "capacity_error", "message": "no live workers", "code": 503}


def test_background_rehome_without_traffic(cluster, redis_url, ns):
    http, workers, gateway = cluster
    client = redis.Redis.from_url(redis_url)
    made = [http.post("/v1/sessions", json={}).json() for _ in range(4)]
    workers["w2"].kill()
    wait_for(lambda: "w2" not in WorkerRegistry(client, ns[1]).workers(), 5, "the re-home")
    assert all(e[0] == "w1" for e in dir_entries(client, ns[1]).values())
    assert len(workers["w1"].sessions) == len(made)


async def test_two_gateways_rehome_once(redis_url, ns):
    workers = [FakeWorker(redis_url, ns[1], w).start() for w in ("w1", "w2", "w3")]
    gateways = []
    try:
        client = redis.Redis.from_url(redis_url)
        ids = [f"sess_{i}" for i in range(12)]
        for i, sid in enumerate(ids):
            client.hset(f"{ns[1]}:dir", sid, msgpack.packb(["w1", f"owner{i % 4}", "s"]))
        await asyncio.to_thread(workers[0].kill)
        gateways = [Gateway(redis_url, ns[0], worker_timeout_s=0.3) for _ in range(2)]
        for g in gateways:
            await g.start()
        for _ in range(50):
            await gateways[0].refresh()
            if not gateways[0].workers["w1"].alive:
                break
            await asyncio.sleep(0.05)
        done = await asyncio.gather(*(g.rehome("w1") for g in gateways for _ in range(3)))
        assert all(done)
        adopted = workers[1].adopted + workers[2].adopted
        assert sorted(adopted) == sorted(ids)  # each record once
        assert workers[1].adopted and workers[2].adopted  # spread by owner
        assert sum(g.rehomed for g in gateways) == len(ids)
    finally:
        for g in gateways:
            await g.close()
        for w in workers:
            await asyncio.to_thread(w.close)


# -- the worker side: internal route, fence, heartbeat --------------------------------


class _EngineStub:
    """What the app's worker wiring calls on an engine (given an import limit, the app
    does not size one from the engine's KV)."""

    def __init__(self):
        self.adopted: list[str] = []

    async def adopt(self, ids):
        self.adopted += ids
        return [{"id": i, "kind": "session" if i.startswith("sess_") else "snapshot",
                 "owner": "alice"} for i in ids]

    async def list_sessions(self, ids=None):
        return [{"id": "sess_1", "num_tokens": 10}, {"id": "sess_2", "num_tokens": 5}]

    async def stats(self):
        return {}


def test_worker_internal_route_fence_and_heartbeat(redis_url, ns):
    from fastapi.testclient import TestClient

    from agentos.api.app import ServerSettings, create_app
    from agentos.api.tenants import Tenants
    from agentos.kernel.config import Config

    settings = ServerSettings(Config(store=redis_url, deployment=ns[0]), worker=True,
                              port=free_port(), heartbeat_s=0.1, max_import_bytes=1 << 20)
    engine = _EngineStub()
    tenants = Tenants({"sk-a": "alice"})
    app = create_app(settings, engine=engine, tenants=tenants)
    reg = WorkerRegistry(redis.Redis.from_url(redis_url), ns[1])
    with TestClient(app) as http:
        wid = settings.resolved_worker_id
        wait_for(lambda: reg.workers()[wid].sessions == 2, what="the worker's load")
        assert reg.workers()[wid].tokens == 15 and reg.workers()[wid].url == settings.url

        body = {"ids": ["sess_9", "snap_9"]}
        assert http.post("/v1/internal/adopt", json=body).status_code == 403
        assert http.post("/v1/internal/adopt", json=body, headers={"Authorization": "Bearer sk-a"}
                         ).status_code == 403  # a tenant key is not the secret
        r = http.post("/v1/internal/adopt", json=body, headers={SECRET_HEADER: "wrong"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
        r = http.post("/v1/internal/adopt", json=body, headers={SECRET_HEADER: reg.secret()})
        assert r.status_code == 200 and [i["id"] for i in r.json()["data"]] == body["ids"]
        assert engine.adopted == body["ids"]  # loaded with their owners: the engine's record

        # re-homed by a gateway: fenced, every request refused
        reg.remove(wid, reg.workers()[wid].registration)
        wait_for(lambda: app.state.heartbeat.fenced, what="the fence")
        r = http.get("/v1/sessions/sess_9", headers={"Authorization": "Bearer sk-a"})
        assert r.status_code == 503 and "fenced" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 503
    assert wid not in reg.workers()


def test_worker_stop_ends_its_lease(redis_url, ns):
    from fastapi.testclient import TestClient

    from agentos.api.app import ServerSettings, create_app
    from agentos.kernel.config import Config

    settings = ServerSettings(Config(store=redis_url, deployment=ns[0], worker_id="wx"),
                              worker=True, heartbeat_s=5.0, max_import_bytes=1 << 20)
    reg = WorkerRegistry(redis.Redis.from_url(redis_url), ns[1])
    with TestClient(create_app(settings, engine=_EngineStub())):
        assert reg.workers()["wx"].alive
    assert not reg.workers()["wx"].alive  # a clean stop: its records move at once


# -- end to end: two workers behind the gateway, one killed ---------------------------


def _has_adopt() -> bool:
    try:
        from agentos.engine import AsyncEngine
    except ImportError:
        return False
    return hasattr(AsyncEngine, "adopt")


@pytest.mark.slow
@pytest.mark.skipif(not _has_adopt(), reason="needs AsyncEngine.adopt (the journal's recovery)")
def test_sessions_survive_a_killed_worker(redis_url, ns):
    from agentos import Client, Engine
    from agentos.snapshot.durable.store import RedisStore

    deployment, key_ns = ns
    store = RedisStore(redis_url, deployment)
    gen = {"max_tokens": 6, "temperature": 0.8, "ignore_eos": True}
    with ExitStack() as stack:
        procs = {}
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            procs[f"127.0.0.1:{port}"] = stack.enter_context(run_agentos(
                ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis_url,
                 "--deployment", deployment, "--worker", "--kv-blocks", "2048",
                 "--heartbeat-s", "0.3", "--log-level", "warning"], url))
        gport = free_port()
        gurl = f"http://127.0.0.1:{gport}"
        stack.enter_context(run_agentos(
            ["gateway", "--redis", redis_url, "--deployment", deployment, "--port", str(gport),
             "--worker-timeout", "1", "--log-level", "warning"], gurl))
        c = stack.enter_context(Client(gurl, max_retries=6, timeout=60))
        ref = stack.enter_context(Engine(model="tiny", kv_blocks=2048))

        # the same history through the gateway and on a reference engine
        sessions, refs = [], []
        for i in range(8):
            s = c.create_session(prompt=f"agent {i} starts", seed=i)
            r = ref.create_session(prompt=f"agent {i} starts", seed=i)
            assert s.generate(**gen, seed=100 + i).tokens == r.generate(**gen, seed=100 + i).tokens
            sessions.append(s)
            refs.append(r)
        where = store.directory()
        assert {where[s.id][0] for s in sessions} == set(procs), "sessions did not spread"

        kids = []
        for s in sessions[:3]:
            for k in s.fork(n=2):
                kids.append(k)
                assert store.directory()[k.id][0] == where[s.id][0], "a fork left its parent's worker"
        for j, k in enumerate(kids):
            k.generate(**gen, seed=200 + j)
        snaps = {}
        for s, r in zip(sessions[3:6], refs[3:6]):
            snap = s.snapshot()
            snaps[snap.id] = (snap, s.tokens)
            s.append(text=" tool output")
            r.append(text=" tool output")
            assert s.generate(**gen, seed=300).tokens == r.generate(**gen, seed=300).tokens
        everything = [*sessions, *kids]
        tokens = {s.id: s.tokens for s in everything}
        where = store.directory()
        assert {where[sid][0] for sid in snaps} <= set(procs)

        # the gateway's /v1/system sums the workers'; top and the dashboard work through it
        system = httpx.get(f"{gurl}/v1/system", timeout=30).json()
        assert system["stats"]["sessions"]["total"] == len(everything) == sum(
            w["stats"]["sessions"]["total"] for w in system["workers"])
        assert {w["id"] for w in system["workers"]} == set(procs)
        assert system["stats"]["kv"]["block_size"] == 16  # per-worker facts are not summed
        top = subprocess.run([sys.executable, "-m", "agentos.cli", "top", "--once", "--url", gurl],
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0 and all(x.id in top.stdout for x in everything), top.stdout
        page = httpx.get(f"{gurl}/dashboard", timeout=30)
        assert page.status_code == 200 and "<svg" in page.text.lower()

        victim = where[sessions[0].id][0]
        survivor = next(w for w in procs if w != victim)
        on_victim = [sid for sid, e in where.items() if e[0] == victim]
        procs[victim].kill()
        procs[victim].wait()

        t0 = time.monotonic()
        for s in everything:  # every session answers, unchanged
            assert s.tokens == tokens[s.id], s.id
        assert time.monotonic() - t0 < 15
        where = store.directory()
        assert all(where[sid][0] == survivor for sid in on_victim)
        assert victim not in WorkerRegistry(store.client, key_ns).workers()
        for snap, snap_tokens in snaps.values():  # snapshots too
            restored = c.restore(snap)
            assert restored.tokens == snap_tokens
            restored.close()

        # a moved session generates like its reference and like a twin that never moved
        moved = next(s for s in sessions if s.id in on_victim)
        twin = c.create_session(tokens=moved.tokens)
        ref_twin = refs[sessions.index(moved)]
        out = moved.generate(**gen, seed=7).tokens
        assert out == twin.generate(**gen, seed=7).tokens
        assert out == ref_twin.generate(**gen, seed=7).tokens

        listed = {i["id"] for i in c.list_sessions()}
        assert {s.id for s in everything} | {twin.id} <= listed
        for s in [*everything, twin]:
            s.close()
        for snap, _ in snaps.values():
            snap.delete()
        assert c.list_sessions() == []
        assert json.loads(httpx.get(f"{gurl}/health", trust_env=False).text)["live"] == 1
