"""generate(append=...): an agent's turn (a tool's output, then the model's answer) in one
call. The same tokens as append then generate; a short turn takes one engine step where
the two calls take two; a refused call appends nothing. Over the engine, REST (JSON and
the SDK's Client) and the rollout worker."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from agentos.api.app import ServerSettings, create_app
from agentos.api.tenants import Tenants
from agentos.client import Client
from agentos.engine import AsyncEngine, Engine
from agentos.kernel.errors import ConflictError, ContextLengthError, InvalidRequestError
from agentos.kernel.sampling_params import SamplingParams
from agentos.rl import RolloutWorker

PROMPT = [1] + list(range(10, 60))
TURN = list(range(70, 86))  # a tool's output: 16 tokens


@pytest.fixture(scope="module")
def engine():
    with Engine("tiny", kv_blocks=1024, max_model_len=128) as e:
        yield e


def _pair(engine, seed=5):
    return (engine.create_session(tokens=PROMPT, seed=seed),
            engine.create_session(tokens=PROMPT, seed=seed))


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0},
                                      {"temperature": 0.7, "seed": 11}])
def test_same_tokens_as_append_then_generate(engine, sampling):
    one, two = _pair(engine)
    g1 = one.generate(max_tokens=6, ignore_eos=True, append=TURN, **sampling)
    two.append(tokens=TURN)
    g2 = two.generate(max_tokens=6, ignore_eos=True, **sampling)
    assert g1.tokens == g2.tokens and g1.finish_reason == g2.finish_reason == "length"
    # the first logprob comes from a 16-row step here, a 1-row one there: the same up to
    # the last bits of a float32 sum
    assert g1.logprobs == pytest.approx(g2.logprobs, abs=1e-4)
    assert one.get_tokens_and_mask() == two.get_tokens_and_mask()
    assert one.get_mask() == [0] * (len(PROMPT) + len(TURN)) + [1] * 6
    one.close()
    two.close()


def test_text_is_tokenized_as_append_does(engine):
    one, two = _pair(engine)
    one.generate(max_tokens=2, temperature=0.0, append="tool says 42")
    two.append(text="tool says 42")
    two.generate(max_tokens=2, temperature=0.0)
    assert one.tokens == two.tokens
    one.close()
    two.close()


def _steps(engine) -> int:
    k = engine.kernel  # read in the loop thread: the step that answered a call has ended
    return k.call(lambda: k.stats["steps"]).result()


def test_a_short_turn_is_one_step(engine):
    s = engine.create_session(tokens=PROMPT)
    s.generate(max_tokens=1, temperature=0.0)  # the prompt prefilled
    steps = _steps(engine)
    g = s.generate(max_tokens=1, temperature=0.0, append=TURN)
    assert len(g.tokens) == 1
    # its 16 tokens' prefill gives the first token: one step (append, then generate, is two:
    # the generate arrives once the append's step has begun, and recomputes the last token)
    assert _steps(engine) - steps == 1
    s.close()


def test_a_refused_call_appends_nothing(engine):
    s = engine.create_session(tokens=PROMPT)
    before = s.get_tokens_and_mask()
    refusals = [
        ({"append": [1, 2, 10 ** 6]}, InvalidRequestError),  # outside the vocabulary
        ({"append": [5] * 200}, ContextLengthError),  # past the context
        ({"append": [5] * (128 - len(PROMPT))}, ContextLengthError),  # fills it: no room left
        ({"append": [5], "stop_token_ids": [10 ** 6]}, InvalidRequestError),
        ({"append": [5], "regex": "[0-9]+", "max_tokens": 0}, InvalidRequestError),
        ({"append": 7}, InvalidRequestError),  # neither text nor ids
    ]
    for kwargs, error in refusals:
        with pytest.raises(error):
            s.generate(**kwargs)
        assert s.get_tokens_and_mask() == before, kwargs
    s.close()


def test_an_open_constraint_the_append_breaks_is_refused_whole(engine):
    s = engine.create_session(tokens=PROMPT)
    g = s.generate(max_tokens=1, temperature=0.0, regex="[0-9]{5}")
    assert g.finish_reason == "length"  # the constraint stays open
    before = s.get_tokens_and_mask()
    letter = engine.encode("a")
    with pytest.raises(InvalidRequestError):
        s.generate(max_tokens=1, regex="[0-9]{5}", append=letter)
    assert s.get_tokens_and_mask() == before
    digit = engine.encode("7")
    g = s.generate(max_tokens=8, temperature=0.0, regex="[0-9]{5}", append=digit)
    assert g.finish_reason == "stop" and len(engine.decode(s.tokens[len(PROMPT):])) == 5
    s.close()


def test_busy_session_is_a_conflict_and_appends_nothing(engine):
    s = engine.create_session(tokens=PROMPT)
    stream = s.generate(max_tokens=60, ignore_eos=True, stream=True)
    next(iter(stream))
    with pytest.raises(ConflictError):
        s.generate(max_tokens=1, append=TURN)
    for _ in stream:
        pass
    assert s.get_mask()[len(PROMPT):] == [1] * 60  # generated only, nothing appended
    s.close()


def test_while_a_pause_drains_the_append_lands_and_the_generate_waits(engine):
    s = engine.create_session(tokens=PROMPT)
    s.generate(max_tokens=1, temperature=0.0)
    busy = engine.create_session(tokens=PROMPT)
    stream = iter(busy.generate(max_tokens=40, ignore_eos=True, stream=True))
    next(stream)
    k = engine.kernel
    with ThreadPoolExecutor(2) as pool:
        paused = pool.submit(engine.pause, True)  # drains: new generate calls are held
        deadline = time.monotonic() + 30
        while not k._drains:
            assert time.monotonic() < deadline and not paused.done()
            time.sleep(0.001)
        held = pool.submit(s.generate, max_tokens=1, temperature=0.0, append=TURN)
        while len(s.tokens) == len(PROMPT) + 1:  # the append lands at once
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert s.get_mask()[-len(TURN):] == [0] * len(TURN) and not held.done()
        for _ in stream:
            pass
        paused.result(timeout=30)
        assert not held.done()  # held until resume
        engine.resume()
        assert len(held.result(timeout=30).tokens) == 1
    busy.close()
    s.close()


@pytest.fixture(scope="module")
def app_engine():
    e = AsyncEngine("tiny", kv_blocks=1024)
    yield e
    e.kernel.shutdown()


def test_rest_json_and_sdk(app_engine):
    app = create_app(ServerSettings(), engine=app_engine)
    with TestClient(app) as c:
        sid = c.post("/v1/sessions", json={"tokens": PROMPT, "seed": 3}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/generate", json={
            "max_tokens": 3, "temperature": 0, "ignore_eos": True, "append": {"tokens": TURN}})
        assert r.status_code == 200 and len(r.json()["tokens"]) == 3
        toks = c.get(f"/v1/sessions/{sid}/tokens").json()
        assert toks["tokens"][len(PROMPT):len(PROMPT) + 16] == TURN
        assert toks["mask"] == [0] * (len(PROMPT) + 16) + [1] * 3
        r = c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 1, "append": {"text": "ok"}})
        assert r.status_code == 200
        n = c.get(f"/v1/sessions/{sid}").json()["num_tokens"]
        for bad in ({"append": {"text": "a", "tokens": [5]}}, {"append": {}},
                    {"append": {"tokens": [10 ** 6]}}, {"append": {"tokens": "x"}},
                    {"append": {"tokens": [5]}, "max_tokens": 0}):
            r = c.post(f"/v1/sessions/{sid}/generate", json=bad)
            assert r.status_code in (400, 422) and r.json()["error"]["message"], (bad, r.text)
        assert c.get(f"/v1/sessions/{sid}").json()["num_tokens"] == n
        # the SDK's HTTP client sends it the same way
        sdk = Client(base_url="http://testserver", http_client=c)  # TestClient: over the app
        g = sdk.session(sid).generate(max_tokens=2, temperature=0.0, append=[7, 8, 9])
        assert len(g.tokens) == 2 and sdk.session(sid).tokens[n:n + 3] == [7, 8, 9]
        c.delete(f"/v1/sessions/{sid}")


def test_rest_tenant_quota_counts_the_appended_tokens(app_engine):
    tenants = Tenants({"key-a": "a"}, max_tokens=100)
    app = create_app(ServerSettings(), engine=app_engine, tenants=tenants)
    a = {"authorization": "Bearer key-a"}
    with TestClient(app) as c:
        sid = c.post("/v1/sessions", json={"tokens": PROMPT}, headers=a).json()["id"]
        # 51 + 16 + 40 > 100, where 51 + 40 alone would be admitted
        body = {"max_tokens": 40, "append": {"tokens": TURN}}
        r = c.post(f"/v1/sessions/{sid}/generate", json=body, headers=a)
        assert r.status_code == 429, r.text
        assert c.get(f"/v1/sessions/{sid}", headers=a).json()["num_tokens"] == len(PROMPT)
        body["max_tokens"] = 30
        assert c.post(f"/v1/sessions/{sid}/generate", json=body, headers=a).status_code == 200
        c.delete(f"/v1/sessions/{sid}", headers=a)


def test_rollout_records_the_appended_tokens(app_engine):
    async def agent(rs):
        await rs.generate()
        await rs.generate(append=[40, 41, 42])
        await rs.generate(append="done")

    async def main():
        worker = RolloutWorker(app_engine)
        [t] = await worker.generate_group(PROMPT, n=1, sampling=SamplingParams(
            max_tokens=2, temperature=0.0, ignore_eos=True), agent_fn=agent)
        return t

    t = asyncio.run(main())
    done = app_engine.encode("done")
    assert t.response_mask == [1, 1, 0, 0, 0, 1, 1] + [0] * len(done) + [1, 1]
    assert t.response_ids[2:5] == [40, 41, 42] and t.num_turns == 3
    assert t.rollout_logprobs[2:5] == [0.0] * 3
