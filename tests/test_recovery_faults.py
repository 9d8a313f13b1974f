"""Faults around the store. Startup refuses each bad record alone (a garbage directory
entry, a key of the wrong type, a corrupt base or log, of a session, a snapshot or another
tenant's record) and loads the rest, in memory and in Redis. A change answered 503
while Redis is down is never applied twice: a retry carrying the same Idempotency-Key
gets the first answer once the change is durable."""

from __future__ import annotations

import msgpack
import pytest
import redis as redis_py

from agentos import Engine
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
