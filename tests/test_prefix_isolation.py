"""The prefix cache across tenants: scoped per tenant (a tenant's pages are never mapped by
another unless both opted in to one `cache_scope`), imported KV never trusted into a cache
another session can map (poisoning), and no counter a tenant can read that tells whether
another tenant sent a prompt (probing). Kernel behaviour on the in-process Engine; the
keys file, /v1/system and /metrics on a real `agentos serve`."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest

from agentos import Engine
from agentos.bench.api import run_server
from agentos.snapshot.codec import Record

BS = 16  # the tiny model's default block size
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
KEYS = {"sk-alice": "alice", "sk-bob": "bob", "sk-carol": "carol", "sk-dave": "dave",
        "sk-ops": "ops"}
TENANTS = {"carol": {"cache_scope": "common"}, "dave": {"cache_scope": "common"},
           "ops": {"admin": True}}


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 250) for _ in range(n)]


def poisoned(record: bytes, seed: int = 0) -> bytes:
    """The record with its KV bytes replaced by garbage of the same layout."""
    rec = Record.unpack(record)
    assert rec.kv is not None and rec.kv["layout"]["dtype"] == "float32"
    n = len(rec.kv["data"]) // 4
    rec.kv = {**rec.kv, "data": (np.random.default_rng(seed).standard_normal(n) * 8)
              .astype(np.float32).tobytes()}
    return rec.pack()


def exported(tokens: list[int]) -> bytes:
    """A record of a session of `tokens` with its KV, made by a separate engine (so no
    clean copy of those pages is cached where the record is imported)."""
    with Engine("tiny", kv_blocks=64) as engine:
        s = engine.create_session(tokens=tokens)
        s.generate(max_tokens=1, temperature=0.0)
        return s.export(kv=True)


def clean_generate(tokens: list[int]) -> list[int]:
    with Engine("tiny", kv_blocks=64) as engine:
        return engine.create_session(tokens=tokens).generate(**GREEDY).tokens


# -- the kernel (in-process Engine) ------------------------------------------------------


def test_imported_kv_is_never_mapped_by_another_session():
    """Garbage KV imported under a common prefix, full blocks and a partial one that its
    session completes later (its later pages are computed over untrusted KV): a new
    session of the same tenant with that prefix generates as on a clean engine."""
    common = prompt(1, 3 * BS)
    partial = prompt(2, BS // 2)
    record, record_partial = poisoned(exported(common)), poisoned(exported(partial), 1)
    with Engine("tiny", kv_blocks=256) as engine:
        imp = engine.import_session(record)
        imp_partial = engine.import_session(record_partial)
        assert imp.info()["num_cached"] > 0 and imp_partial.info()["num_cached"] > 0
        imp_partial.append(tokens=prompt(3, 2 * BS))  # completes the imported partial block
        completed = imp_partial.tokens
        imp_partial.generate(max_tokens=1, temperature=0.0)
        kid = imp.fork(n=1)[0]  # forks share the imported pages by reference
        assert kid.info()["num_cached"] == imp.info()["num_cached"]
        for tokens in (common + prompt(4, 5), completed + prompt(5, 5)):
            s = engine.create_session(tokens=tokens)
            assert s.generate(**GREEDY).tokens == clean_generate(tokens)
        engine.check()


def test_restores_and_rollbacks_keep_imported_kv_private():
    """A snapshot of a session holding imported KV (a partial block), restored or rolled
    back onto by a clean session and then completed: a new session with those tokens
    generates as on a clean engine."""
    partial = prompt(6, BS // 2)
    record = poisoned(exported(partial), 2)
    with Engine("tiny", kv_blocks=256) as engine:
        snap = engine.import_session(record).snapshot()
        restored = engine.restore(snap)
        rolled = engine.create_session(tokens=prompt(7, 3))
        rolled.rollback(snap)
        for s, seed in ((restored, 8), (rolled, 9)):
            s.append(tokens=prompt(seed, 2 * BS))
            completed = s.tokens
            s.generate(max_tokens=1, temperature=0.0)
            tokens = completed + prompt(seed + 10, 5)
            assert engine.create_session(tokens=tokens).generate(**GREEDY).tokens == \
                clean_generate(tokens)
        engine.check()


def test_score_calls_on_imported_kv_keep_it_private():
    """Scoring a continuation of a session holding an imported partial block computes
    pages over that KV: a new session with those tokens generates as on a clean engine."""
    partial = prompt(12, BS // 2)
    record = poisoned(exported(partial), 3)
    with Engine("tiny", kv_blocks=256) as engine:
        imp = engine.import_session(record)
        more = prompt(13, 2 * BS)
        imp.score(tokens=more)
        tokens = imp.tokens + more + prompt(14, 5)
        assert engine.create_session(tokens=tokens).generate(**GREEDY).tokens == \
            clean_generate(tokens)
        engine.check()


def test_cache_is_scoped_per_owner_unless_shared():
    """A prompt sent by one owner gives another no prefix hits; owners that share a scope
    (MemoryManager.share_cache) do; an owner always hits its own pages."""
    with Engine("tiny", kv_blocks=256) as engine:
        k = engine.kernel

        def hits(owner: str) -> int:
            return engine.stats()["prefix_hit_tokens_by_owner"].get(owner, 0)

        def send(owner: str, tokens: list[int]) -> None:
            engine.create_session(tokens=tokens, owner=owner).generate(max_tokens=1)

        p = prompt(10, 4 * BS)
        send("a", p)
        send("b", p + [7])
        assert hits("b") == 0
        send("a", p + [8])
        assert hits("a") == 4 * BS
        k.call(k.memory.share_cache, {"a": "team", "b": "team"}).result()
        q = prompt(11, 2 * BS)
        send("a", q)
        send("b", q + [9])
        assert hits("b") == 2 * BS
        assert engine.stats()["prefix_hit_tokens"] == 6 * BS


# -- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": KEYS, "tenants": TENANTS}))
    with run_server(["--api-keys", str(path), "--kv-blocks", "1024", "--log-level", "warning"]) as u:
        yield u


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def run(http: httpx.Client, key: str, tokens: list[int], gen: dict | None = None) -> dict:
    """Creates a session of `tokens` as `key`'s tenant and generates; returns its info
    and what it generated."""
    r = http.post("/v1/sessions", json={"tokens": tokens}, headers=as_(key))
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    g = http.post(f"/v1/sessions/{sid}/generate", json=gen or {"max_tokens": 1}, headers=as_(key))
    assert g.status_code == 200, g.text
    return {**http.get(f"/v1/sessions/{sid}", headers=as_(key)).json(), "out": g.json()["tokens"]}


def own_hits(http: httpx.Client, key: str) -> int:
    return http.get("/v1/system", headers=as_(key)).json()["stats"]["prefix_hit_tokens"]


def test_imported_garbage_kv_does_not_poison_another_tenant(url):
    common = prompt(20, 4 * BS)
    record = poisoned(exported(common))
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.post("/v1/sessions/import", content=record, headers={
            **as_("sk-bob"), "Content-Type": "application/msgpack"})
        assert r.status_code == 201 and r.json()["num_cached"] > 0, r.text
        tokens = common + prompt(21, 5)
        assert run(http, "sk-alice", tokens, GREEDY)["out"] == clean_generate(tokens)


def _seen_by(http: httpx.Client, key: str) -> dict:
    """Every number tenant `key` can read of the engine: its /v1/system stats (times left
    out) and whether /metrics answers it."""
    stats = http.get("/v1/system", headers=as_(key)).json()["stats"]

    def flat(d: dict, at: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{at}{k}."))
            elif isinstance(v, (int, float)) and not k.endswith("_s"):
                out[at + k] = v
        return out

    return {**flat(stats), "metrics": http.get("/metrics", headers=as_(key)).status_code}


def test_a_tenant_cannot_probe_what_another_sent(url):
    """Bob sends a prompt after Alice sent the same one, then after she sent another:
    nothing Bob can read (its /v1/system, /metrics, its session's info) differs."""
    with httpx.Client(base_url=url, timeout=120) as http:
        seen = []
        for round_, alice_sent_it in enumerate((True, False)):
            p = prompt(30 + round_, 4 * BS)
            run(http, "sk-alice", p if alice_sent_it else prompt(40 + round_, 4 * BS))
            before = _seen_by(http, "sk-bob")
            info = run(http, "sk-bob", p)
            after = _seen_by(http, "sk-bob")
            delta = {k: after[k] - before.get(k, 0) for k in after}
            seen.append((delta, {k: info[k] for k in ("state", "num_tokens", "num_cached",
                                                      "device_blocks", "host_blocks")}))
        assert seen[0] == seen[1]
        assert http.get("/metrics", headers=as_("sk-bob")).status_code == 403
        assert http.get("/metrics").status_code == 401
        admin = http.get("/v1/system", headers=as_("sk-ops")).json()["stats"]
        assert admin["prefix_hit_tokens_by_owner"].get("bob", 0) == 0
        assert "kv" in admin
        metrics = http.get("/metrics", headers=as_("sk-ops"))
        assert metrics.status_code == 200 and "agentos_prefix_hit_tokens_by_tenant" in metrics.text


def test_same_tenant_still_hits_its_own_prefix(url):
    """A tenant's second prompt over its first one's prefix is a hit, and the hits it
    reads are its own (not another tenant's, counted alongside)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        p, q = prompt(50, 3 * BS), prompt(52, 3 * BS)
        run(http, "sk-alice", p)
        run(http, "sk-bob", q)
        before = own_hits(http, "sk-alice")
        run(http, "sk-alice", p + prompt(51, 4))
        run(http, "sk-bob", q + prompt(53, 4))
        assert own_hits(http, "sk-alice") - before == 3 * BS


def test_tenants_sharing_a_cache_scope_share_hits(url):
    """Carol and Dave name one cache_scope: Dave hits what Carol sent; Alice does not."""
    with httpx.Client(base_url=url, timeout=120) as http:
        p = prompt(60, 2 * BS)
        run(http, "sk-carol", p)
        alice, dave = own_hits(http, "sk-alice"), own_hits(http, "sk-dave")
        run(http, "sk-alice", p + prompt(62, 4))
        assert own_hits(http, "sk-alice") == alice
        run(http, "sk-dave", p + prompt(61, 4))
        assert own_hits(http, "sk-dave") - dave == 2 * BS
