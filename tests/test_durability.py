"""`agentos serve --redis` as a real process over a real redis-server (append-only): killed
with SIGKILL mid-generation and restarted, it has every acknowledged session and snapshot
with identical tokens, and continuations equal an uninterrupted in-process run; with Redis
stopped, changes get 503 and nothing acknowledged is lost; service resumes after."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from agentos import Client, Engine
from agentos.bench.api import free_port, run_agentos
from agentos.bench.redis_server import RedisServer

GEN = dict(max_tokens=80, temperature=0.8, ignore_eos=True)  # the calls the kill interrupts


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as r:
        yield r


def serve(redis_url: str, deployment: str, *extra: str):
    """`agentos serve --redis` on a free port: a context manager yielding (Popen, URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis_url,
            "--deployment", deployment, "--kv-blocks", "2048", "--log-level", "warning", *extra]
    return run_agentos(args, url), url


def script(b):
    """Sequential history over any backend: sessions (with forks) and snapshots."""
    sessions, snaps = [], []
    for i in range(6):
        s = b.create_session(prompt=f"agent {i} says", seed=i)
        s.generate(max_tokens=6, temperature=0.8, ignore_eos=True)
        sessions.append(s)
        if i % 2 == 0:
            snaps.append(s.snapshot())
            s.append(text=" tool result")
        if i % 3 == 0:
            sessions += s.fork(n=2)
    sessions[1].rollback(snaps[0])
    sessions[-1].generate(max_tokens=4, temperature=0.0)
    return sessions, snaps


def test_sigkill_mid_generation_then_restart(redis):
    dep = "crash-" + uuid.uuid4().hex[:8]
    with Engine(kv_blocks=2048, deterministic=True) as ref:
        ref_sessions, ref_snaps = script(ref)
        acked = [x.tokens for x in ref_sessions]
        running = [0, 3, 5]  # these are generating when the server dies
        full = {i: ref_sessions[i].tokens + ref_sessions[i].generate(**GEN).tokens for i in running}
        ref_snap_tokens = [ref.restore(sn).tokens for sn in ref_snaps]

        ctx, url = serve(redis.url, dep, "--deterministic")
        with ctx as proc, Client(url, max_retries=0) as c:
            sessions, snaps = script(c)
            assert [x.tokens for x in sessions] == acked
            streamed: list[int] = []

            def generate(i):
                try:
                    if i == running[0]:
                        for chunk in sessions[i].generate(**GEN, stream=True):
                            if chunk.token is not None:
                                streamed.append(chunk.token)
                    else:
                        sessions[i].generate(**GEN)
                except Exception:  # noqa: BLE001 - the server is killed under it
                    pass

            threads = [threading.Thread(target=generate, args=(i,)) for i in running]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                lengths = [d["num_tokens"] for d in c.list_sessions([sessions[i].id for i in running])]
                if len(streamed) >= 6 and all(n >= len(acked[i]) + 6 for n, i in zip(lengths, running)):
                    break
                time.sleep(0.05)
            proc.kill()  # SIGKILL: no shutdown handler runs
            proc.wait()
            for t in threads:
                t.join(30)
            assert len(streamed) >= 6

        ctx, url = serve(redis.url, dep, "--deterministic")
        with ctx, Client(url) as c:
            listed = {d["id"] for d in c.list_sessions()}
            assert listed == {x.id for x in sessions}
            for i, s in enumerate(sessions):
                got = c.session(s.id).tokens
                if i not in running:
                    assert got == acked[i]
                    continue
                # what was acknowledged, plus the journaled part of the interrupted call
                assert got[: len(acked[i])] == acked[i] and got == full[i][: len(got)]
                assert len(got) < len(full[i])
                if i == running[0]:  # every token the stream handed out was durable
                    assert got[len(acked[i]) : len(acked[i]) + len(streamed)] == streamed
                # the RNG was where the interrupted call left it: the rest matches exactly
                rest = c.session(s.id).generate(**{**GEN, "max_tokens": len(full[i]) - len(got)})
                assert got + rest.tokens == full[i]
            for sn, want in zip(snaps, ref_snap_tokens):
                assert c.restore(sn.id).tokens == want
            seeded = [c.session(s.id).generate(max_tokens=5, temperature=0.9, seed=11).tokens
                      for s in sessions]
            assert seeded == [s.generate(max_tokens=5, temperature=0.9, seed=11).tokens
                              for s in ref_sessions]
            c.check()


def test_redis_outage_503_then_recovers(redis):
    dep = "outage-" + uuid.uuid4().hex[:8]
    ctx, url = serve(redis.url, dep)
    with ctx as proc, httpx.Client(base_url=url, timeout=30) as h:
        sid = h.post("/v1/sessions", json={"tokens": [1, 2, 3], "seed": 1}).json()["id"]
        h.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "ignore_eos": True})
        acked = h.get(f"/v1/sessions/{sid}/tokens").json()["tokens"]
        assert len(acked) == 7
        redis.stop()
        try:
            r = h.post("/v1/sessions", json={"tokens": [9]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable"
            for call in (lambda: h.post(f"/v1/sessions/{sid}/append", json={"tokens": [5]}),
                         lambda: h.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 2}),
                         lambda: h.post(f"/v1/sessions/{sid}/fork", json={"n": 1}),
                         lambda: h.post(f"/v1/sessions/{sid}/snapshots")):
                r = call()
                assert r.status_code == 503, r.text
                assert "unavailable" in r.json()["error"]["message"]
            # refused before anything was done: the session is as acknowledged; reads work
            assert h.get(f"/v1/sessions/{sid}/tokens").json()["tokens"] == acked
            assert h.get("/health").status_code == 200
        finally:
            redis.start()
        deadline = time.monotonic() + 20
        while True:  # the journal retries, then takes changes again
            r = h.post(f"/v1/sessions/{sid}/append", json={"tokens": [5, 6]})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        g = h.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 3, "ignore_eos": True}).json()
        acked = acked + [5, 6] + g["tokens"]
        proc.kill()
        proc.wait()
    ctx, url = serve(redis.url, dep)
    with ctx, httpx.Client(base_url=url, timeout=30) as h:
        assert h.get(f"/v1/sessions/{sid}/tokens").json()["tokens"] == acked


def test_serve_refuses_to_start_without_redis():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "agentos.cli", "serve", "--redis",
                        f"redis://127.0.0.1:{free_port()}/0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unavailable" in r.stderr and "Traceback" not in r.stderr
