"""The REST app in-process (TestClient): bad input, tenants and limits, msgpack, streaming,
OpenAI-compatible routes. Every error is a 4xx with a JSON error body, and a bystander
session is untouched afterwards."""

from __future__ import annotations

import contextlib
import json
import time

import msgpack
import pytest
from fastapi.testclient import TestClient

from agentos.api.app import ServerSettings, create_app
from agentos.api.tenants import Tenants, load_tenants
from agentos.engine import AsyncEngine


@pytest.fixture(scope="module")
def engine():
    e = AsyncEngine("tiny", kv_blocks=4096)
    yield e
    e.kernel.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(ServerSettings(max_body_bytes=1 << 20, max_tokens_cap=64), engine=engine)
    with TestClient(app) as c:
        yield c


def create(c, headers=None, **body) -> str:
    r = c.post("/v1/sessions", json=body or {"prompt": "hello"}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def error_of(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] and err["message"] and err["code"] == status
    return err


def test_session_lifecycle(client):
    sid = create(client, tokens=[1, 2, 3, 4], seed=7)
    g = client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 5, "ignore_eos": True}).json()
    assert len(g["tokens"]) == 5 and g["finish_reason"] == "length" and len(g["logprobs"]) == 5
    snap = client.post(f"/v1/sessions/{sid}/snapshots").json()
    assert snap["num_tokens"] == 9 and snap["session_id"] == sid
    kids = client.post(f"/v1/sessions/{sid}/fork", json={"n": 3})
    assert kids.status_code == 201 and [k["parent_id"] for k in kids.json()["data"]] == [sid] * 3
    assert client.post(f"/v1/sessions/{sid}/append", json={"text": "ok"}).json()["num_tokens"] == 11
    assert client.post(f"/v1/sessions/{sid}/rollback", json={"snapshot_id": snap["id"]}).json() == {
        "id": sid, "num_tokens": 9}
    toks = client.get(f"/v1/sessions/{sid}/tokens").json()
    assert toks["tokens"][:4] == [1, 2, 3, 4] and toks["mask"] == [0] * 4 + [1] * 5
    restored = client.post(f"/v1/snapshots/{snap['id']}/restore")
    assert restored.status_code == 201 and restored.json()["num_tokens"] == 9
    listed = client.get(f"/v1/sessions/{sid}/snapshots").json()["data"]
    assert [s["id"] for s in listed] == [snap["id"]]
    ids = {s["id"] for s in client.get("/v1/sessions").json()["data"]}
    assert sid in ids and restored.json()["id"] in ids
    for k in [*kids.json()["data"], restored.json()]:
        assert client.delete(f"/v1/sessions/{k['id']}").json()["deleted"]
    assert client.delete(f"/v1/snapshots/{snap['id']}").status_code == 200
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    assert client.post("/v1/system/check").json() == {"ok": True}


def test_bad_input_gets_4xx_and_changes_nothing(client):
    by = create(client, prompt="bystander")
    client.post(f"/v1/sessions/{by}/generate", json={"max_tokens": 4, "temperature": 0})
    before = client.get(f"/v1/sessions/{by}/tokens").json()
    sid = create(client, prompt="victim")
    snap = client.post(f"/v1/sessions/{sid}/snapshots").json()["id"]
    client.delete(f"/v1/snapshots/{snap}")
    gen = f"/v1/sessions/{sid}/generate"
    json_headers = {"content-type": "application/json"}
    cases = [
        (client.post(gen, content=b'{"max_tokens": 3', headers=json_headers), 400),  # malformed
        (client.post(gen, json={"max_tokens": "three"}), 422),  # wrong type
        (client.post(gen, json={"max_tokens": 3.5}), 422),
        (client.post(gen, json={"max_tokens": -1}), 422),  # negative values
        (client.post(gen, json={"temperature": -0.5}), 422),
        (client.post(gen, json={"top_p": 1.5}), 422),
        (client.post(gen, json={"max_tokens": 10**12}), 400),  # over the server's cap
        (client.post(gen, json={"max_tokenz": 3}), 422),  # unknown field
        (client.post(gen, json={"stop_token_ids": [10**6]}), 400),  # outside the vocabulary
        (client.post(f"/v1/sessions/{sid}/fork", json={"n": 0}), 422),
        (client.post(f"/v1/sessions/{sid}/append", json={"tokens": [1, -2]}), 422),
        (client.post(f"/v1/sessions/{sid}/append", json={"tokens": [1], "text": "x"}), 422),
        (client.post(f"/v1/sessions/{sid}/append", json={"tokens": [999]}), 400),
        (client.post(f"/v1/sessions/{sid}/append", json={"tokens": [1] * 100_000}), 400),  # context
        (client.post("/v1/sessions", json={}), 422),
        (client.post("/v1/sessions", json=[1, 2]), 422),
        (client.post("/v1/sessions/sess_unknown/generate", json={}), 404),  # unknown ids
        (client.get("/v1/sessions/sess_unknown"), 404),
        (client.delete("/v1/snapshots/snap_unknown"), 404),
        (client.post(f"/v1/sessions/{sid}/rollback", json={"snapshot_id": snap}), 404),  # deleted
        (client.post(f"/v1/snapshots/{snap}/restore"), 404),
        (client.post("/v1/sessions", content=b"x" * (2 << 20), headers=json_headers), 413),
        (client.post(gen, content=b"\xc1\xc1", headers={"content-type": "application/msgpack"}), 400),
        (client.get("/v1/no-such-route"), 404),
        (client.put(f"/v1/sessions/{sid}"), 405),
    ]
    for r, status in cases:
        error_of(r, status)
    assert client.get(f"/v1/sessions/{sid}").json()["num_tokens"] == 7  # <bos> + "victim"
    assert client.get(f"/v1/sessions/{by}/tokens").json() == before
    g = client.post(f"/v1/sessions/{by}/generate", json={"max_tokens": 2}).json()
    assert len(g["tokens"]) == 2  # still serving
    assert client.post("/v1/system/check").json() == {"ok": True}
    for s in (sid, by):
        client.delete(f"/v1/sessions/{s}")


def test_generate_busy_is_409(client, engine):
    sid = create(client, tokens=[5, 6])
    import threading

    done = threading.Event()

    def long_generate():
        client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 64, "ignore_eos": True})
        done.set()

    t = threading.Thread(target=long_generate)
    t.start()
    conflicts = 0
    while not done.is_set():
        r = client.post(f"/v1/sessions/{sid}/append", json={"tokens": [1]})
        if r.status_code == 409:
            conflicts += 1
            error_of(r, 409)
            break
    t.join()
    assert conflicts == 1
    client.delete(f"/v1/sessions/{sid}")


def test_msgpack_matches_json(client):
    mp = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    results = []
    for wire in ("json", "msgpack"):
        body = {"tokens": list(range(1, 200)), "seed": 3}
        if wire == "json":
            sid = client.post("/v1/sessions", json=body).json()["id"]
            r = client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 6, "temperature": 0.9})
            assert r.headers["content-type"].startswith("application/json")
            results.append(r.json())
        else:
            r = client.post("/v1/sessions", content=msgpack.packb(body), headers=mp)
            assert r.status_code == 201 and r.headers["content-type"] == "application/msgpack"
            sid = msgpack.unpackb(r.content)["id"]
            r = client.post(f"/v1/sessions/{sid}/generate",
                            content=msgpack.packb({"max_tokens": 6, "temperature": 0.9}), headers=mp)
            results.append(msgpack.unpackb(r.content))
            err = client.get("/v1/sessions/sess_nope", headers=mp)
            assert err.status_code == 404 and msgpack.unpackb(err.content)["error"]["code"] == 404
            toks = client.get(f"/v1/sessions/{sid}/tokens", headers=mp)
            assert len(toks.content) < len(client.get(f"/v1/sessions/{sid}/tokens").content)
        client.delete(f"/v1/sessions/{sid}")
    # the second session reuses the first one's prompt pages (prefix cache), computed in
    # other chunks, so logprobs agree to float rounding; everything else exactly
    lp = [r.pop("logprobs") for r in results]
    assert results[0] == results[1] and lp[0] == pytest.approx(lp[1], abs=1e-5)


def test_stream_events(client):
    sid = create(client, tokens=[7, 8, 9], seed=1)
    snap = client.post(f"/v1/sessions/{sid}/snapshots").json()["id"]
    plain = client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 6, "ignore_eos": True}).json()
    client.post(f"/v1/sessions/{sid}/rollback", json={"snapshot_id": snap})
    with client.stream("POST", f"/v1/sessions/{sid}/generate",
                       json={"max_tokens": 6, "ignore_eos": True, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"] for e in events[:-1]] == plain["tokens"]
    assert "".join(e["text"] for e in events) == plain["text"]
    assert events[-1]["finish_reason"] == "length"
    client.delete(f"/v1/sessions/{sid}")
    client.delete(f"/v1/snapshots/{snap}")


def tenant_app(engine, **limits) -> TestClient:
    tenants = load_tenants(env="key-a=alice,key-b=bob", **limits)
    return TestClient(create_app(ServerSettings(), engine=engine, tenants=tenants))


def test_tenants_are_isolated(engine):
    a = {"authorization": "Bearer key-a"}
    b = {"x-api-key": "key-b"}
    with tenant_app(engine, max_sessions=2) as c:
        error_of(c.post("/v1/sessions", json={"prompt": "x"}), 401)  # missing key
        error_of(c.post("/v1/sessions", json={"prompt": "x"}, headers={"authorization": "Bearer no"}), 401)
        assert c.get("/health").status_code == 200  # open
        sid = create(c, a)
        snap = c.post(f"/v1/sessions/{sid}/snapshots", headers=a).json()["id"]
        for r in (c.get(f"/v1/sessions/{sid}", headers=b),
                  c.post(f"/v1/sessions/{sid}/generate", json={}, headers=b),
                  c.delete(f"/v1/sessions/{sid}", headers=b),
                  c.get(f"/v1/snapshots/{snap}", headers=b),
                  c.post(f"/v1/snapshots/{snap}/restore", headers=b)):
            error_of(r, 404)
        mine = create(c, b)
        error_of(c.post(f"/v1/sessions/{mine}/rollback", json={"snapshot_id": snap}, headers=b), 404)
        assert [s["id"] for s in c.get("/v1/sessions", headers=b).json()["data"]] == [mine]
        create(c, a)
        error_of(c.post("/v1/sessions", json={"prompt": "3rd"}, headers=a), 429)  # max_sessions
        error_of(c.post(f"/v1/sessions/{sid}/fork", json={"n": 1}, headers=a), 429)
        assert c.get(f"/v1/sessions/{sid}", headers=a).status_code == 200  # untouched
        for h in (a, b):
            for s in c.get("/v1/sessions", headers=h).json()["data"]:
                c.delete(f"/v1/sessions/{s['id']}", headers=h)
        c.delete(f"/v1/snapshots/{snap}", headers=a)


def test_tenant_token_limit(engine):
    a = {"authorization": "Bearer key-a"}
    with tenant_app(engine, max_tokens=100) as c:
        sid = create(c, a, tokens=[1] * 60)
        error_of(c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 50}, headers=a), 429)
        error_of(c.post("/v1/sessions", json={"tokens": [1] * 50}, headers=a), 429)
        g = c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 30}, headers=a)
        assert g.status_code == 200
        assert c.get(f"/v1/sessions/{sid}", headers=a).json()["num_tokens"] <= 90
        c.delete(f"/v1/sessions/{sid}", headers=a)


def test_tenant_rates_refuse_before_the_body_is_read(engine):
    """Past its request rate (or body bytes a second) a tenant gets 429 with Retry-After,
    before its body is read; the other tenant is served as before, and the rate refills."""
    a = {"authorization": "Bearer key-a"}
    b = {"authorization": "Bearer key-b"}
    with tenant_app(engine, requests_per_s=5, body_bytes_per_s=4096) as c:
        statuses = [c.get("/v1/sessions", headers=a).status_code for _ in range(12)]
        assert statuses[:5] == [200] * 5 and 429 in statuses[5:], statuses
        r = c.get("/v1/sessions", headers=a)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert c.get("/v1/sessions", headers=b).status_code == 200  # b's own rate
        time.sleep(1.1)
        assert c.get("/v1/sessions", headers=a).status_code == 200  # refilled
        # one body larger than a second's worth passes on a full bucket, then the debt
        # holds the next ones off
        big = {"tokens": [1] * 6000}  # 18 kB: over 4 s of debt
        r = c.post("/v1/sessions", json=big, headers=b)
        assert r.status_code == 201, r.text
        error_of(c.post("/v1/sessions", json={"tokens": [1, 2]}, headers=b), 429)
        c.delete(f"/v1/sessions/{r.json()['id']}", headers=b)


def test_bad_tenant_rates_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    for rate in (0, -1, "fast", True):
        path.write_text(json.dumps({"keys": {"k": "t"}, "tenants": {"t": {"requests_per_s": rate}}}))
        with pytest.raises(ValueError, match="requests_per_s"):
            load_tenants(str(path), env="")


def test_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"k1": "t1"}, "tenants": {"t1": {"max_sessions": 3}}}))
    tenants = load_tenants(str(path), env="")
    assert tenants.authenticate("Bearer k1", "").max_sessions == 3
    path.write_text("not json")
    with pytest.raises(ValueError):
        load_tenants(str(path), env="")
    with pytest.raises(ValueError, match="refusing"):
        ServerSettings(host="0.0.0.0").tenants()
    assert Tenants().open


def test_openai_completions_and_session_continuation(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4, "n": 2,
                                             "logprobs": 1, "seed": 1, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200 and len(body["choices"]) == 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 4
    first = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
        "keep_session": True}).json()
    sid = first["session_id"]
    n1 = client.get(f"/v1/sessions/{sid}").json()["num_tokens"]
    nxt = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "more"}], "max_tokens": 3,
        "session": sid}).json()
    assert nxt["usage"]["prompt_tokens"] > n1  # the session's tokens plus the new turn
    error_of(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    error_of(client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 422)
    client.delete(f"/v1/sessions/{sid}")
    assert client.get("/v1/sessions").json()["data"] == []  # temporary sessions closed


async def test_client_gone_before_stream_starts_ends_the_call(engine):
    import asyncio

    import httpx

    app = create_app(ServerSettings(), engine=engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        sid = (await c.post("/v1/sessions", json={"tokens": [1, 2, 3]})).json()["id"]
    body = json.dumps({"max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        raise OSError("client went away")  # before even the response start

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": f"/v1/sessions/{sid}/generate",
             "raw_path": f"/v1/sessions/{sid}/generate".encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
             "client": ("127.0.0.1", 1), "server": ("t", 80), "state": {}}
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    s = await engine.session(sid)
    for _ in range(100):  # the abort lands at the next step
        info = await s.info()
        if info["state"] == "sleeping":
            break
        await asyncio.sleep(0.02)
    assert info["state"] == "sleeping" and info["num_tokens"] < 1000
    assert (await s.generate(max_tokens=1)).finish_reason == "length"  # not busy
    await s.close()


HISTORY = ("swap_count", "swapped_s", "queue_wait_s")  # a session's paging and scheduling history


def history(info: dict) -> dict:
    """The history fields of a session's info, checked: all there, numbers, none negative."""
    out = {k: info[k] for k in HISTORY}
    assert isinstance(out["swap_count"], int)
    assert all(isinstance(v, (int, float)) and v >= 0 for v in out.values()), out
    return out


def test_swapped_session_over_rest():
    """A pool too small for two sessions: the idle one is swapped to host memory, shows as
    such over REST (with its swap in its history), and comes back when it generates; the
    counters reach /v1/system and /metrics."""
    engine = AsyncEngine("tiny", kv_blocks=8, host_blocks=64)
    app = create_app(ServerSettings(), engine=engine)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.kernel.shutdown)
        c = stack.enter_context(TestClient(app))
        a = create(c, tokens=list(range(1, 100)))  # 7 blocks of 16
        fresh = history(c.get(f"/v1/sessions/{a}").json())
        assert fresh["swap_count"] == 0
        assert c.post(f"/v1/sessions/{a}/generate", json={"max_tokens": 1}).status_code == 200
        b = create(c, tokens=list(range(2, 101)))
        assert c.post(f"/v1/sessions/{b}/generate", json={"max_tokens": 1}).status_code == 200
        info = c.get(f"/v1/sessions/{a}").json()
        assert info["state"] == "swapped" and info["host_blocks"] > 0 and info["level"] >= 0
        swapped = history(info)
        assert swapped["swap_count"] >= 1
        later = history(c.get(f"/v1/sessions/{a}").json())  # the current stretch goes on
        assert later["swapped_s"] >= swapped["swapped_s"]
        system = c.get("/v1/system").json()["stats"]
        assert system["scheduler"] == "mlfq" and system["kv"]["host_blocks_used"] == info["host_blocks"]
        assert system["preemptions"] >= 1 and system["swapped_s"] >= 0 and system["sched_s"] >= 0
        assert c.post(f"/v1/sessions/{a}/generate", json={"max_tokens": 1}).status_code == 200
        info = c.get(f"/v1/sessions/{a}").json()
        assert info["state"] == "sleeping" and info["host_blocks"] == 0
        back = history(info)
        assert back["swap_count"] >= swapped["swap_count"] and back["swapped_s"] >= later["swapped_s"]
        for s in c.get("/v1/sessions").json()["data"]:
            history(s)
        metrics = c.get("/metrics").text
        assert "agentos_swap_out_blocks_total" in metrics and "agentos_swap_in_blocks_total" in metrics
        assert "agentos_preemptions_total" in metrics and "agentos_swapped_seconds_total" in metrics
        assert c.post("/v1/system/check").status_code == 200
