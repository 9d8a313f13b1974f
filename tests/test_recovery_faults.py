"""Faults around the store. Startup refuses each bad record alone (a garbage directory
entry, a key of the wrong type, a corrupt base or log, of a session, a snapshot or another
tenant's record) and loads the rest, in memory and in Redis. A change answered 503
while Redis is down is never applied twice: a retry carrying the same Idempotency-Key
gets the first answer once the change is durable."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import msgpack
import pytest
import redis as redis_py

from agentos import Client, Engine
from agentos.bench.api import free_port, run_agentos
from agentos.bench.redis_server import RedisServer
from agentos.snapshot.durable.store import MemoryStore, RedisStore


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as r:
        yield r


def poke(store, key: str, value) -> None:
    """Replaces `key` with `value`: bytes (a string), a list or a dict (a hash)."""
    if isinstance(store, MemoryStore):
        store.data[key] = value
        return
    c = store.client
    c.delete(key)
    if isinstance(value, bytes):
        c.set(key, value)
    elif isinstance(value, list):
        c.rpush(key, *value)
    else:
        c.hset(key, mapping=value)


def put_dir(store, field: str, value: bytes) -> None:
    if isinstance(store, MemoryStore):
        store.data[store.dir_key][field.encode()] = value
    else:
        store.client.hset(store.dir_key, field, value)


def make_store(kind: str, redis, name: str):
    return MemoryStore(name) if kind == "memory" else RedisStore(redis.url, name)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_startup_refuses_each_bad_record_and_loads_the_rest(kind, redis, request):
    store = make_store(kind, redis, f"faults-{kind}-{request.node.name}")
    e = Engine(kv_blocks=256, store=store)
    good = e.create_session(tokens=[1, 2, 3], seed=1)
    good.generate(max_tokens=3, temperature=0.8, ignore_eos=True)
    good_snap = good.snapshot()
    bad = [e.create_session(tokens=[4, 5]) for _ in range(3)]
    bad_snap = bad[0].snapshot()
    acme_good = e.create_session(tokens=[6], owner="acme")
    acme_bad = e.create_session(tokens=[7], owner="acme")
    want = {good.id: good.tokens, acme_good.id: acme_good.tokens}
    e.close()

    poke(store, store.key("default", bad[0].id, "base"), [b"not", b"a string"])  # WRONGTYPE on GET
    poke(store, store.key("default", bad[1].id, "log"), b"not a list")  # WRONGTYPE on LRANGE
    poke(store, store.key("default", bad[2].id, "log"), [b"\xc1garbage"])  # a garbage entry
    poke(store, store.key("default", bad_snap.id, "base"), b"\x93garbage")  # a garbage snapshot
    poke(store, store.key("acme", acme_bad.id, "base"), {"a": "hash"})  # another tenant's record
    put_dir(store, "extra-data", msgpack.packb(["w", "default", "s"]) + b"x")  # msgpack ExtraData
    put_dir(store, "not-a-list", msgpack.packb({"worker": "x"}))
    put_dir(store, "wrong-kind", msgpack.packb(["default", "default", "z", "f"]))
    refused = {bad[0].id, bad[1].id, bad[2].id, bad_snap.id, acme_bad.id}

    e2 = Engine(kv_blocks=256, store=store)
    try:
        assert {i["id"]: e2.session(i["id"]).tokens for i in e2.list_sessions()} == want
        assert [s.id for s in e2.session(good.id).snapshots()] == [good_snap.id]
        assert refused <= set(e2.journal.errors)
        assert sum("extra-data" in k or "not-a-list" in k or "wrong-kind" in k
                   for k in e2.journal.errors) == 3
        assert e2.stats()["store"]["refused_records"] == len(refused) + 3
        assert e2.restore(good_snap.id).tokens == want[good.id]
        # the good records still take changes, durably
        e2.session(good.id).append(tokens=[9])
        e2.check()
    finally:
        e2.close()
    e3 = Engine(kv_blocks=256, store=store)
    try:
        assert e3.session(good.id).tokens == want[good.id] + [9]
    finally:
        e3.close()
        store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_directory_of_the_wrong_type_is_refused_not_fatal(kind, redis, request, caplog):
    store = make_store(kind, redis, f"faults-dir-{kind}-{request.node.name}")
    e = Engine(kv_blocks=128, store=store)
    e.create_session(tokens=[1, 2])
    e.close()
    poke(store, store.dir_key, b"a string, not a hash")
    e2 = Engine(kv_blocks=128, store=store)
    try:
        assert e2.list_sessions() == []
        assert list(e2.journal.errors) == [store.dir_key]
        assert e2.stats()["store"]["refused_records"] == 1
        assert any(store.dir_key in r.getMessage() for r in caplog.records)
    finally:
        e2.close()
        store.close()


def test_gateway_directory_skips_bad_entries(redis):
    from agentos.snapshot.durable.cluster import WorkerRegistry

    store = RedisStore(redis.url, "faults-gateway")
    put_dir(store, "ok", msgpack.packb(["w1", "acme", "s", "ok"]))
    put_dir(store, "junk", b"\xc1")
    reg = WorkerRegistry(redis_py.Redis.from_url(redis.url), store.ns)
    assert reg.records("w1") == {"ok": ("acme", "s", "ok")}
    store.close()


# -- a change answered 503 is applied once --------------------------------------------------


def serve(redis_url: str, deployment: str, keys_file):
    """`agentos serve --redis` with API keys: a context manager yielding (Popen, URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis_url,
            "--deployment", deployment, "--kv-blocks", "512", "--log-level", "warning",
            "--api-keys", str(keys_file)]
    return run_agentos(args, url), url


def outage(r: RedisServer, seconds: float) -> threading.Thread:
    """Stops Redis now and starts it again after `seconds`, in a thread."""
    r.stop()
    t = threading.Thread(target=lambda: (time.sleep(seconds), r.start()))
    t.start()
    return t


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"key-a": "acme", "key-b": "globex"}}))
    return path


def test_retried_change_after_redis_goes_down_is_applied_once(keys_file):
    dep = "retry-" + uuid.uuid4().hex[:8]
    with RedisServer() as r:
        ctx, url = serve(r.url, dep, keys_file)
        auth = {"Authorization": "Bearer key-a"}
        with ctx as proc, httpx.Client(base_url=url, timeout=30, headers=auth) as h:
            sid = h.post("/v1/sessions", json={"prompt": "hello"}).json()["id"]
            thread = outage(r, 1.5)
            # a client that retries on 503 with the same key, as the OpenAI SDK does
            key, statuses = uuid.uuid4().hex, []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                resp = h.post(f"/v1/sessions/{sid}/append", json={"text": "RETRY"},
                              headers={"Idempotency-Key": key})
                statuses.append(resp.status_code)
                if resp.status_code != 503:
                    break
                time.sleep(0.3)
            thread.join()
            tokens = h.get(f"/v1/sessions/{sid}/tokens").json()["tokens"]
            text = h.post("/v1/detokenize", json={"tokens": tokens}).json()["text"]
            assert text.count("RETRY") == 1, text
            assert statuses[0] == 503 and statuses[-1] == 200, statuses
            assert resp.headers.get("idempotent-replayed") == "true"
            # the same key for another request is refused, not applied
            other = h.post(f"/v1/sessions/{sid}/append", json={"text": "OTHER"},
                           headers={"Idempotency-Key": key})
            assert other.status_code == 422
            proc.kill()
            proc.wait()
        ctx, url = serve(r.url, dep, keys_file)
        with ctx, httpx.Client(base_url=url, timeout=30, headers=auth) as h:
            assert h.get(f"/v1/sessions/{sid}/tokens").json()["tokens"] == tokens


def test_sdk_create_in_an_outage_succeeds_once_and_visibly(keys_file):
    dep = "retry-sdk-" + uuid.uuid4().hex[:8]
    with RedisServer() as r:
        ctx, url = serve(r.url, dep, keys_file)
        with ctx, Client(url, api_key="key-a", max_retries=10) as c, \
                Client(url, api_key="key-b") as other:
            s = c.create_session(prompt="base", seed=1)
            thread = outage(r, 1.5)
            made = c.create_session(prompt="in the outage", seed=2)  # retried until durable
            thread.join()
            s.append(text=" RETRY")
            assert sorted(i["id"] for i in c.list_sessions()) == sorted([s.id, made.id])
            assert made.tokens == c.encode("in the outage", add_special_tokens=True)
            assert other.list_sessions() == []
            thread = outage(r, 1.5)
            s.append(text=" AGAIN")
            thread.join()
            assert c.decode(s.tokens).count("AGAIN") == 1


def test_idempotency_keys_replay_per_tenant_and_are_bounded():
    from fastapi.testclient import TestClient

    from agentos.api.app import ServerSettings, create_app
    from agentos.api.idempotency import Answer, IdempotencyKeys
    from agentos.api.tenants import load_tenants
    from agentos.engine import AsyncEngine

    engine = AsyncEngine("tiny", kv_blocks=256)
    tenants = load_tenants(env="key-a=acme,key-b=globex")
    app = create_app(ServerSettings(), engine=engine, tenants=tenants)
    try:
        with TestClient(app) as c:
            a = {"Authorization": "Bearer key-a", "Idempotency-Key": "k1"}
            b = {"Authorization": "Bearer key-b", "Idempotency-Key": "k1"}
            first = c.post("/v1/sessions", json={"tokens": [1, 2]}, headers=a)
            again = c.post("/v1/sessions", json={"tokens": [1, 2]}, headers=a)
            assert first.status_code == again.status_code == 201
            assert again.json()["id"] == first.json()["id"]
            assert again.headers["idempotent-replayed"] == "true"
            # another tenant's same key is its own: a new session, nothing of acme's
            theirs = c.post("/v1/sessions", json={"tokens": [1, 2]}, headers=b)
            assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
            assert len(c.get("/v1/sessions", headers=a).json()["data"]) == 1
            # a refusal is not remembered: the retry runs again
            gone = {"Authorization": "Bearer key-a", "Idempotency-Key": "k2"}
            assert c.post("/v1/sessions/nope/append", json={"text": "x"}, headers=gone).status_code == 404
            assert c.post(f"/v1/sessions/{first.json()['id']}/append", json={"text": "x"},
                          headers=gone).status_code == 200
            # a remembered key used for another request is refused, not applied
            other = c.post(f"/v1/sessions/{first.json()['id']}/append", json={"text": "y"},
                           headers=gone)
            assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]["message"]
    finally:
        engine.kernel.shutdown()
    keys = IdempotencyKeys(max_keys=2, ttl_s=60)
    for k in ("x", "y", "z"):
        keys.put("t", k, Answer(b"", time.monotonic()))
    assert list(keys.tenants["t"]) == ["y", "z"]  # at most max_keys per tenant
    keys.put("t", "old", Answer(b"", time.monotonic() - 61))
    assert keys.get("t", "old") is None and keys.get("t", "z") is not None  # at most ttl_s
