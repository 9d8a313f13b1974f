"""Records, stores, the journal and recovery, in-process (MemoryStore and a real Redis):
the codec refuses corrupted and other-version records; an engine opened on the store of a
closed one has every session and snapshot, with the RNG where it was; export/import moves
a session between engines (with its KV when the weights match)."""

from __future__ import annotations

import zlib

import msgpack
import pytest
from fastapi.testclient import TestClient

import agentos
from agentos import Engine
from agentos.api.app import ServerSettings, create_app
from agentos.bench.redis_server import RedisServer
from agentos.engine import AsyncEngine
from agentos.snapshot import codec
from agentos.snapshot.durable.journal import LOG_LIMIT
from agentos.snapshot.durable.store import MemoryStore


def history(e):
    """A fixed sequence of every kind of change; returns the sessions and a snapshot."""
    s = e.create_session(prompt="The agent", seed=3)
    s.generate(max_tokens=12, temperature=0.9, ignore_eos=True)
    s.append(text=" tool output")
    snap = s.snapshot()
    kids = s.fork(n=2)
    for k in kids:
        k.generate(max_tokens=5, temperature=1.0, ignore_eos=True)
    s.generate(max_tokens=4, temperature=0.0, seed=7)
    kids[0].rollback(snap)
    gone = s.fork(n=1)[0]
    gone.close()
    return [s, *kids], snap


def continuation(sessions):
    return [x.generate(max_tokens=6, temperature=1.0, ignore_eos=True).tokens for x in sessions]


# -- codec --------------------------------------------------------------------------------


def test_codec_round_trip_and_refusals():
    rec = codec.Record(id="sess_x", kind="session", owner="alice",
                       token_ids=codec.tokens_from_bytes(codec.tokens_to_bytes(codec.array("i", [1, 2, 3]))),
                       mask=codec.array("b", [0, 0, 1]), rng_state=bytes(5056), rng_device="cpu",
                       created_at=1.5, parent_id="sess_p", weight_runs=[[2, 4]])
    blob = rec.pack()
    back = codec.Record.unpack(blob)
    assert back == rec
    env = msgpack.unpackb(blob)
    bad = bytearray(env[4])
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(agentos.CodecError, match="checksum"):
        codec.Record.unpack(msgpack.packb([env[0], env[1], env[2], env[3], bytes(bad)]))
    with pytest.raises(agentos.CodecError, match="version 99"):
        codec.Record.unpack(msgpack.packb([env[0], 99, env[2], env[3], env[4]]))
    with pytest.raises(agentos.CodecError, match="not an AgentOS record"):
        codec.Record.unpack(b"\x93\x01\x02")
    with pytest.raises(agentos.CodecError):
        codec.Record.unpack(blob[:-7])  # truncated
    body = msgpack.packb({"id": "x"})  # a valid envelope around a body missing fields
    with pytest.raises(agentos.CodecError, match="missing"):
        codec.Record.unpack(msgpack.packb(["agentos", 1, "record", zlib.crc32(body), body]))
    # entries are numbered: replaying one twice (a retried write) changes nothing
    gen = codec.entry(1, "gen", t=codec.tokens_to_bytes(codec.array("i", [9])), s=1, w=0)
    twice = codec.replay(blob, [gen, gen])
    assert twice.token_ids.tolist() == [1, 2, 3, 9] and twice.draws == 1 and twice.n == 1


# -- recovery -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as r:
        yield r.url


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_recovery_equals_uninterrupted_run(kind, redis_url, request):
    ref = Engine(kv_blocks=1024)
    ref_sessions, ref_snap = history(ref)
    ref_tokens = [x.tokens for x in ref_sessions]
    ref_masks = [x.get_mask() for x in ref_sessions]
    ref_next = continuation(ref_sessions)
    ref_forked = continuation(ref_sessions[0].fork(n=2))
    store = MemoryStore() if kind == "memory" else redis_url
    opts = dict(kv_blocks=1024, store=store, deployment=f"test-{request.node.name}")
    e = Engine(**opts)
    sessions, snap = history(e)
    assert [x.tokens for x in sessions] == ref_tokens
    ids = sorted(x.id for x in sessions)
    e.close()

    e2 = Engine(**opts)
    try:
        assert sorted(i["id"] for i in e2.list_sessions()) == ids
        assert [i["state"] for i in e2.list_sessions()] == ["swapped"] * 3  # KV rebuilt lazily
        got = [e2.session(x.id) for x in sessions]
        assert [x.tokens for x in got] == ref_tokens
        assert [x.get_mask() for x in got] == ref_masks
        assert [x.id for x in e2.session(sessions[0].id).snapshots()] == [snap.id]
        # the RNG of each session continues where it was: unseeded sampling matches
        assert continuation(got) == ref_next
        # children's random streams come from the session's own state: forks match too
        assert continuation(got[0].fork(n=2)) == ref_forked
        t, rt = e2.restore(snap), ref.restore(ref_snap)
        assert t.tokens == rt.tokens
        assert (t.generate(max_tokens=5, temperature=1.0).tokens
                == rt.generate(max_tokens=5, temperature=1.0).tokens)
        e2.check()
        assert e2.stats()["store"]["up"]
    finally:
        e2.close()
        ref.close()


def test_long_generation_folds_the_log_and_recovers():
    store = MemoryStore()
    e = Engine(kv_blocks=1024, store=store)
    s = e.create_session(tokens=[5, 6, 7], seed=1)
    s.generate(max_tokens=LOG_LIMIT + 40, temperature=0.8, ignore_eos=True)
    want = s.tokens
    log_key = store.key("default", s.id, "log")
    assert 0 < len(store.data[log_key]) < LOG_LIMIT  # folded into a new base, then went on
    nxt = s.generate(max_tokens=4, temperature=0.8, ignore_eos=True).tokens
    e.close()
    e2 = Engine(kv_blocks=1024, store=store)
    s2 = e2.session(s.id)
    assert s2.tokens == want + nxt
    e2.close()


def test_corrupted_record_is_refused_others_load():
    store = MemoryStore()
    e = Engine(kv_blocks=256, store=store)
    good, bad = e.create_session(tokens=[1, 2]), e.create_session(tokens=[3, 4])
    e.close()
    key = store.key("default", bad.id, "base")
    blob = bytearray(store.data[key])
    blob[-3] ^= 0x55
    store.data[key] = bytes(blob)
    e2 = Engine(kv_blocks=256, store=store)
    try:
        assert [i["id"] for i in e2.list_sessions()] == [good.id]
        assert "checksum" in e2.journal.errors[bad.id]
        assert e2.stats()["store"]["refused_records"] == 1
        with pytest.raises(agentos.NotFoundError):
            e2.session(bad.id)
        assert key in store.data  # left for an operator to inspect
    finally:
        e2.close()


def test_failed_generate_is_undone_in_the_journal():
    store = MemoryStore()
    e = Engine(kv_blocks=256, store=store)
    s = e.create_session(tokens=[1, 2, 3], seed=4)
    s.generate(max_tokens=3, temperature=1.0, ignore_eos=True)
    before = s.tokens

    def boom(token, delta, logprob, top):
        raise RuntimeError("client callback failed")

    fut = e.kernel.call(e.kernel.sys_generate, s.id, agentos.SamplingParams(max_tokens=5, temperature=1.0,
                                                                              ignore_eos=True), boom)
    with pytest.raises(RuntimeError):
        fut.result().result()
    assert s.tokens == before
    nxt = s.generate(max_tokens=4, temperature=1.0, ignore_eos=True).tokens
    e.close()
    e2 = Engine(kv_blocks=256, store=store)
    assert e2.session(s.id).tokens == before + nxt
    e2.close()


# -- export / import ----------------------------------------------------------------------


def test_export_import_between_engines():
    a, b = Engine(kv_blocks=512), Engine(kv_blocks=512)
    try:
        s = a.create_session(prompt="Move me" * 8, seed=2)
        s.generate(max_tokens=9, temperature=0.9, ignore_eos=True)
        plain, with_kv = s.export(), s.export(kv=True)
        assert len(with_kv) > len(plain)
        want = s.generate(max_tokens=6, temperature=0.9, ignore_eos=True).tokens

        for data, kv in ((plain, False), (with_kv, True)):
            before = b.stats()["tokens_prefilled"]
            t = b.import_session(data)
            assert t.tokens == s.tokens[: -len(want)] and t.get_mask() == s.get_mask()[: -len(want)]
            assert t.generate(max_tokens=6, temperature=0.9, ignore_eos=True).tokens == want
            prefilled = b.stats()["tokens_prefilled"] - before
            assert (prefilled < 16) if kv else (prefilled >= len(t.tokens) - 16)
            t.close()
        b.check()
        with pytest.raises(agentos.CodecError):
            b.import_session(with_kv[:-1])
    finally:
        a.close()
        b.close()


def test_export_import_over_rest():
    engine = AsyncEngine("tiny", kv_blocks=512, store=MemoryStore())
    app = create_app(ServerSettings(), engine=engine)
    try:
        with TestClient(app) as c:
            sid = c.post("/v1/sessions", json={"tokens": [1, 2, 3, 4], "seed": 5}).json()["id"]
            c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "ignore_eos": True})
            r = c.get(f"/v1/sessions/{sid}/export", params={"kv": "true"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
            new = c.post("/v1/sessions/import", content=r.content,
                         headers={"Content-Type": "application/msgpack"})
            assert new.status_code == 201, new.text
            nid = new.json()["id"]
            assert nid != sid and new.json()["num_cached"] > 0
            assert c.get(f"/v1/sessions/{nid}/tokens").json()["tokens"] == c.get(
                f"/v1/sessions/{sid}/tokens").json()["tokens"]
            env = msgpack.unpackb(r.content)
            other_version = msgpack.packb([env[0], 2, *env[2:]])
            for blob, needle in ((r.content[:-5], "record"), (other_version, "version 2"), (b"", "record")):
                bad = c.post("/v1/sessions/import", content=blob,
                             headers={"Content-Type": "application/msgpack"})
                assert bad.status_code == 400 and needle in bad.json()["error"]["message"], bad.text
            assert c.get("/v1/sessions/sess_nope/export").status_code == 404
            assert len(c.get("/v1/sessions").json()["data"]) == 2  # nothing half-made
    finally:
        engine.kernel.shutdown()
        engine.journal.close()


def test_rollback_onto_another_workers_snapshot():
    store = MemoryStore()
    a = Engine(kv_blocks=256, store=store, worker_id="a")
    b = Engine(kv_blocks=256, store=store, worker_id="b")
    try:
        s = a.create_session(tokens=[1, 2, 3], seed=1)
        other = b.create_session(tokens=[7, 8, 9, 10], seed=2)
        other.generate(max_tokens=4, temperature=1.0, ignore_eos=True)
        snap = other.snapshot()
        want = other.generate(max_tokens=3, temperature=1.0, ignore_eos=True).tokens
        assert s.rollback(snap.id) == snap.num_tokens  # read from the store: b holds it
        snapped = other.tokens[: snap.num_tokens]
        assert s.tokens == snapped
        assert s.generate(max_tokens=3, temperature=1.0, ignore_eos=True).tokens == want
        assert store.directory()[s.id][:3] == ("a", "default", "s")
        assert store.directory()[snap.id][0] == "b"
        a.check()
        with pytest.raises(agentos.NotFoundError):
            s.rollback("snap_nope")
    finally:
        a.close()
        b.close()
    a2 = Engine(kv_blocks=256, store=store, worker_id="a")  # a's records only
    try:
        assert [i["id"] for i in a2.list_sessions()] == [s.id]
        assert a2.session(s.id).tokens[: snap.num_tokens] == snapped
    finally:
        a2.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_fenced_worker_never_writes_again(kind, redis_url, request):
    store = MemoryStore() if kind == "memory" else redis_url
    e = Engine(kv_blocks=256, store=store, deployment=f"fence-{request.node.name}", worker_id="w1")
    try:
        key = f"{e.store.ns}:workers"
        e.store.write([("hset", key, "w1", b"reg-1")])
        e.journal.guard = (key, "w1", b"reg-1")
        s = e.create_session(tokens=[1, 2, 3])
        s.append(tokens=[4])  # the guard holds: durable
        e.store.write([("hset", key, "w1", b"reg-2")])  # a gateway re-homed w1, another took over
        with pytest.raises(agentos.StoreUnavailableError, match="fenced"):
            s.append(tokens=[5])
        with pytest.raises(agentos.StoreUnavailableError, match="fenced"):
            e.create_session(tokens=[6])
        base, log = e.store.read_records([(e.store.key("default", s.id, "base"),
                                           e.store.key("default", s.id, "log"))])[0]
        assert codec.replay(base, log).token_ids.tolist() == [1, 2, 3, 4]  # nothing after
    finally:
        e.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_open_constraint_survives_recovery_export_and_snapshots(kind, redis_url, request):
    """A session cut mid-JSON is recovered with its constraint (grammar and start): the
    next call with the same schema ends valid JSON, exactly as the uninterrupted engine's;
    a stored snapshot, an export and another worker's rollback carry it too."""
    import json

    schema = {"type": "object", "properties": {"k": {"enum": ["alpha", "beta"]},
                                               "n": {"type": "integer"}},
              "required": ["k", "n"], "additionalProperties": False}
    gen = dict(max_tokens=64, temperature=0.9, json_schema=schema)
    store = MemoryStore() if kind == "memory" else redis_url
    opts = dict(kv_blocks=512, store=store, deployment=f"gram-{request.node.name}")
    e = Engine(**opts)
    s = e.create_session(tokens=[5, 6, 7], seed=3)
    head = s.generate(max_tokens=4, temperature=0.9, json_schema=schema)
    assert head.finish_reason == "length"
    snap = s.snapshot()
    blob = e.export_session(s.id)
    want = s.generate(**gen)  # what the uninterrupted engine does next
    done = s.tokens
    e.close()
    e2 = Engine(**opts)
    try:
        s2 = e2.session(s.id)
        assert s2.tokens == done
        s2.rollback(snap.id)  # back to the cut: the snapshot's constraint, replayed
        again = s2.generate(**gen)
        assert again.tokens == want.tokens
        assert json.loads(head.text + again.text)["k"] in ("alpha", "beta")
        imported = e2.import_session(blob)
        assert json.loads(head.text + imported.generate(**gen).text)["k"] in ("alpha", "beta")
        # an imported record's constraint is user input: one that does not compile is a 400
        bad = codec.Record.unpack(blob)
        bad.grammar = '{"grammars": [{"lark_grammar": "start: ("}]}'
        n = len(e2.list_sessions())
        with pytest.raises(agentos.InvalidRequestError, match="does not compile"):
            e2.import_session(bad.pack())
        assert len(e2.list_sessions()) == n
    finally:
        e2.close()
