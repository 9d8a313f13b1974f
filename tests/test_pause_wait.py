"""pause(wait=True), vLLM's pause mode "wait": the calls in flight run to their end, generate
calls that arrive meanwhile are held (they start at resume, or end at an abort), and the
pause returns once the engine is paused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agentos import Engine, SamplingParams
from agentos.bench.api import run_server

LONG = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def _running(engine: Engine) -> None:
    _until(lambda: engine.stats()["queue"]["runnable"] >= 1)


def _until(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture()
def engine():
    with Engine("tiny", kv_blocks=256) as e:
        yield e


def test_calls_in_flight_finish_new_ones_wait_for_resume(engine):
    a = engine.create_session(tokens=list(range(3, 20)))
    b = engine.create_session(tokens=list(range(30, 40)))
    with ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(a.generate, params=LONG)
            _running(engine)
            paused = pool.submit(engine.pause, wait=True)
            time.sleep(0.05)
            second = pool.submit(b.generate, params=SHORT)  # arrives while draining: held
            paused.result(timeout=60)
            # the pause returned only after the call in flight ended, whole (a call still
            # in flight would now be frozen by the pause, and this would time out)
            done = first.result(timeout=10)
            assert done.finish_reason == "length" and len(done.tokens) == 60
            assert engine.stats()["paused"]
            time.sleep(0.1)
            assert not second.done()  # held: no step runs while paused
        finally:
            engine.resume()  # never leave a held call waiting (the pool joins it)
        out = second.result(timeout=60)
    assert out.finish_reason == "length" and len(out.tokens) == 3
    with Engine("tiny", kv_blocks=256) as fresh:  # the held call ran as it would have alone
        assert out.tokens == fresh.create_session(tokens=list(range(30, 40))).generate(
            params=SHORT).tokens
    engine.check()


def test_nothing_in_flight_pauses_at_once_and_abort_ends_held_calls(engine):
    engine.pause(wait=True)
    assert engine.stats()["paused"]
    engine.resume()
    a = engine.create_session(tokens=list(range(3, 20)))
    b = engine.create_session(tokens=list(range(30, 40)))
    with ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(a.generate, params=LONG)
            _running(engine)
            engine.pause()  # keep: the call in flight is frozen, so a wait-pause cannot finish
            waiting = pool.submit(engine.pause, wait=True)
            _until(lambda: engine.kernel._drains)  # the wait-pause is draining
            held = pool.submit(b.generate, params=SHORT)
            _until(lambda: engine.kernel._held)  # and b's generate is held by it
            time.sleep(0.1)
            assert not waiting.done() and not held.done()
            assert engine.abort() == 2  # the frozen call and the held one
            waiting.result(timeout=60)  # nothing left in flight: paused
            assert first.result(timeout=10).finish_reason == "abort"
            out = held.result(timeout=10)
            assert out.finish_reason == "abort" and out.tokens == []
        finally:
            engine.resume()  # never leave a call waiting (the pool joins it)
    assert b.tokens == list(range(30, 40))  # the held call changed nothing
    assert len(b.generate(params=SHORT).tokens) == 3
    engine.check()


def test_pause_wait_over_http():
    with run_server(["--allow-open-admin", "--kv-blocks", "256"]) as url:
        # NOTE: long enough (a few hundred ms) that the poll below sees it running: a
        # 60-token call could end before the first poll came back, and the wait never end
        body = {"token_ids": list(range(3, 20)),
                "sampling_params": {"max_tokens": 400, "temperature": 0, "ignore_eos": True}}
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=httpx.post(url + "/inference/v1/generate", json=body, timeout=120)))
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/v1/system").json()["stats"]["queue"]["runnable"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        r = httpx.post(url + "/pause", params={"mode": "wait"}, timeout=120)
        assert r.status_code == 200 and r.json()["aborted"] == 0
        t.join(60)
        choice = result["r"].json()["choices"][0]
        assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 400
        assert httpx.get(url + "/v1/system").json()["stats"]["paused"]
        assert httpx.post(url + "/resume").status_code == 200
        assert httpx.post(url + "/v1/engine/pause", json={"wait": True}).status_code == 200
        assert httpx.post(url + "/v1/engine/resume").status_code == 200
