"""A real server: `agentos serve` under uvicorn in a subprocess on a free loopback port,
driven through raw HTTP, the SDK (JSON and msgpack), the official openai client, and 64
concurrent clients."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest

import agentos
from agentos import AsyncClient, Client, Engine
from agentos.bench.api import free_port, run_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def serve(*args: str):
    """Runs `agentos serve` on a free loopback port; yields its base URL."""
    return run_server([*args, "--log-level", "warning"])


@pytest.fixture(scope="module")
def url():
    with serve("--kv-blocks", "8192", "--max-tokens-cap", "512") as u:
        yield u


def scenario(backend):
    """One agent's work; returns everything it observed. Runs unchanged on an Engine or a
    Client."""
    s = backend.create_session(prompt="The agent", seed=1)
    g = s.generate(max_tokens=8, temperature=0.8, ignore_eos=True)
    s.append(text=" tool says ok")
    snap = s.snapshot()
    kids = s.fork(n=2)
    kid_tokens = [k.generate(max_tokens=4, temperature=0).tokens for k in kids]
    chunks = list(s.generate(max_tokens=5, temperature=0.5, stream=True, ignore_eos=True))
    n = s.rollback(snap)
    t = backend.restore(snap)
    seen = [g, n, s.tokens, s.get_mask(), kid_tokens, chunks, t.tokens, s.info()["state"],
            snap.num_tokens, [x.id for x in s.snapshots()] == [snap.id]]
    for call in (lambda: backend.session("sess_nope"), lambda: s.rollback("snap_nope")):
        try:
            call()
        except agentos.NotFoundError as e:
            seen.append((type(e).__name__, e.status_code))
    try:
        s.generate(max_tokens=0)
    except agentos.InvalidRequestError as e:
        seen.append(type(e).__name__)
    for x in [s, t, *kids]:
        x.close()
    snap.delete()
    return seen


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_sdk_runs_the_same_agent_code_as_the_engine(url, wire):
    with Engine("tiny", kv_blocks=1024) as engine:
        local = scenario(engine)
    with Client(url, wire=wire) as client:
        remote = scenario(client)
        assert client.stats()["kv"]["device_blocks_used"] == 0
    assert remote == local
    assert len(local) == 13


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_raw_http(url, wire):
    def call(method, path, body=None, status=200):
        if wire == "json":
            r = httpx.request(method, url + path, json=body)
            data = r.json()
        else:
            h = {"accept": "application/msgpack", "content-type": "application/msgpack"}
            r = httpx.request(method, url + path, headers=h,
                              content=None if body is None else msgpack.packb(body))
            assert r.headers["content-type"] == "application/msgpack"
            data = msgpack.unpackb(r.content)
        assert r.status_code == status, data
        return data

    sid = call("POST", "/v1/sessions", {"prompt": "raw"}, 201)["id"]
    assert call("POST", f"/v1/sessions/{sid}/append", {"tokens": [40, 41]})["num_tokens"] == 6
    g = call("POST", f"/v1/sessions/{sid}/generate", {"max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert len(g["tokens"]) == 4
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/generate",
                      json={"max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
        events = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:")]
    assert len(events) == 4 and events[-1]["finish_reason"] == "length"
    snap = call("POST", f"/v1/sessions/{sid}/snapshots", None, 201)
    assert snap["num_tokens"] == 13
    kids = call("POST", f"/v1/sessions/{sid}/fork", {"n": 2}, 201)["data"]
    call("POST", f"/v1/sessions/{sid}/append", {"text": "more"})
    assert call("POST", f"/v1/sessions/{sid}/rollback", {"snapshot_id": snap["id"]})["num_tokens"] == 13
    restored = call("POST", f"/v1/snapshots/{snap['id']}/restore", None, 201)
    assert call("GET", f"/v1/sessions/{restored['id']}/tokens")["tokens"] == \
        call("GET", f"/v1/sessions/{sid}/tokens")["tokens"]
    for k in [*kids, restored, {"id": sid}]:
        call("DELETE", f"/v1/sessions/{k['id']}")
    call("DELETE", f"/v1/snapshots/{snap['id']}")
    call("GET", f"/v1/sessions/{sid}", status=404)
    call("POST", "/v1/system/check")


def test_client_disconnect_mid_stream_keeps_session_consistent(url):
    with Client(url) as client:
        s = client.create_session(tokens=[1, 2, 3])
        stream = s.generate(max_tokens=500, ignore_eos=True, stream=True)
        got = [next(stream).token for _ in range(5)]
        stream.close()  # drops the connection
        deadline = time.time() + 10
        while True:  # the server notices the disconnect and ends the call
            try:
                g = s.generate(max_tokens=2, ignore_eos=True)
                break
            except agentos.ConflictError:
                assert time.time() < deadline
                time.sleep(0.05)
        tokens = s.tokens
        assert tokens[:8] == [1, 2, 3, *got] and tokens[-2:] == g.tokens
        assert len(tokens) < 3 + 500 + 2
        assert s.get_mask() == [0, 0, 0] + [1] * (len(tokens) - 3)
        s.close()
        client.check()


def test_sdk_errors_and_retries(url):
    with Client(url) as client:
        with pytest.raises(agentos.APIStatusError) as e:
            client.session("sess_x")
        assert isinstance(e.value, agentos.NotFoundError) and e.value.status_code == 404
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=1) as dead:
        t0 = time.perf_counter()
        with pytest.raises(agentos.APIConnectionError):
            dead.stats()
        assert time.perf_counter() - t0 > 0.1  # backed off once before giving up


def test_official_openai_client(url):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    c = oai.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    parts = []
    for chunk in oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            last = chunk.choices[0].finish_reason
        else:
            usage = chunk.usage
    assert last == "length" and usage.completion_tokens == 6
    full = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    streamed = "".join(parts)
    assert full.choices[0].message.content == streamed or len(streamed) > 0
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="other", prompt="x", max_tokens=1)


async def one_agent(url: str, seed: int, until: float, errors: list, live: dict) -> None:
    """Mixed create/append/generate/fork/snapshot/rollback/delete; records what each of its
    sessions must hold."""
    rng = random.Random(seed)
    async with AsyncClient(url, wire=rng.choice(["json", "msgpack"])) as client:
        want: dict = {}  # session -> expected tokens
        snaps: dict = {}  # snapshot -> tokens
        s = await client.create_session(tokens=[rng.randrange(260) for _ in range(rng.randint(1, 40))])
        want[s] = await s.tokens
        while time.time() < until:
            op = rng.choice(["generate", "generate", "append", "fork", "snapshot", "rollback",
                             "delete", "create"])
            s = rng.choice(list(want)) if want else None
            try:
                if s is None or op == "create":
                    s = await client.create_session(prompt=f"agent {seed}")
                    want[s] = await s.tokens
                elif op == "generate":
                    g = await s.generate(max_tokens=rng.randint(1, 6), temperature=0.7)
                    want[s] = want[s] + g.tokens
                elif op == "append":
                    extra = [rng.randrange(260) for _ in range(rng.randint(1, 20))]
                    await s.append(tokens=extra)
                    want[s] = want[s] + extra
                elif op == "fork":
                    for k in await s.fork(n=rng.randint(1, 3)):
                        want[k] = list(want[s])
                elif op == "snapshot":
                    snap = await s.snapshot()
                    snaps[snap] = list(want[s])
                elif op == "rollback" and snaps:
                    snap = rng.choice(list(snaps))
                    await s.rollback(snap)
                    want[s] = list(snaps[snap])
                elif op == "delete" and len(want) > 1:
                    await s.close()
                    del want[s]
                    if snaps and rng.random() < 0.5:
                        snap = rng.choice(list(snaps))
                        await snap.delete()
                        del snaps[snap]
            except agentos.APIStatusError as e:
                errors.append((op, e.status_code, e.message))
        for s, tokens in want.items():
            if await s.tokens != tokens:
                errors.append(("consistency", s.id))
        live[seed] = ([x.id for x in want], [x.id for x in snaps])


async def test_64_concurrent_clients(url):
    errors: list = []
    live: dict = {}
    until = time.time() + 8
    await asyncio.gather(*(one_agent(url, i, until, errors, live) for i in range(64)))
    assert errors == []
    async with AsyncClient(url) as client:
        await client.check()
        for sessions, snaps in live.values():
            for sid in sessions:
                await (await client.session(sid)).close()
            for snap_id in snaps:
                await (await client.get_snapshot(snap_id)).delete()
        stats = await client.stats()
        assert stats["kv"]["device_blocks_used"] == 0 and stats["sessions"]["total"] == 0
        assert stats["tokens_generated"] > 0


def test_sdk_example_runs_against_the_server(url):
    out = subprocess.run([sys.executable, str(EXAMPLES / "sdk_quickstart.py"), url], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "KV blocks in use after closing: 0" in out.stdout


async def test_async_client_stream_and_early_close(url):
    async with AsyncClient(url, wire="msgpack") as client:
        s = await client.create_session(tokens=[9, 8, 7], seed=4)
        snap = await s.snapshot()
        chunks = [c async for c in await s.generate(max_tokens=6, temperature=0.9, stream=True)]
        await s.rollback(snap)
        plain = await s.generate(max_tokens=6, temperature=0.9)
        assert [c.token for c in chunks[:-1]] == plain.tokens
        assert chunks[-1].finish_reason == plain.finish_reason
        stream = await s.generate(max_tokens=500, ignore_eos=True, stream=True)
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            try:
                await s.append(tokens=[1])
                break
            except agentos.ConflictError:
                await asyncio.sleep(0.05)
        tokens = await s.tokens
        assert tokens[9] == first.token and tokens[-1] == 1 and len(tokens) < 9 + 500
        await s.close()
        await snap.delete()


def test_serve_flags_reach_the_engine():
    """--scheduler, --kv-blocks and --host-blocks configure the served engine: a pool of 8
    blocks swaps an idle session to its host tier."""
    with serve("--scheduler", "fcfs", "--kv-blocks", "8", "--host-blocks", "32") as u, Client(u) as c:
        stats = c.stats()
        assert stats["scheduler"] == "fcfs"
        assert (stats["kv"]["device_blocks_total"], stats["kv"]["host_blocks_total"]) == (8, 32)
        a = c.create_session(tokens=list(range(1, 100)))
        a.generate(max_tokens=1, temperature=0.0)
        b = c.create_session(tokens=list(range(2, 101)))
        b.generate(max_tokens=1, temperature=0.0)
        assert {i["id"]: i["state"] for i in c.list_sessions()}[a.id] == "swapped"
        assert len(a.generate(max_tokens=2, temperature=0.0).tokens) == 2  # swapped back in
        assert c.stats()["swap_in_blocks"] > 0
        c.check()
