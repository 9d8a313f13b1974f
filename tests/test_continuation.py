"""Continuing where a conversation left off: a request whose tokens start with what an
earlier (closed) session computed maps that KV, down to the token inside a page, and
computes only what is new; the outputs are those of a fresh run. (What is new includes
the last token the earlier call sampled: its KV was never computed.)"""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from agentos import Engine, SamplingParams
from agentos.api.app import ServerSettings, create_app
from agentos.chat import render_chat
from agentos.engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def turn(engine: Engine, tokens: list[int], owner: str | None = None) -> tuple[list[int], int]:
    """Creates a session of tokens, generates greedily, closes it: (tokens, computed)."""
    before = engine.stats()["tokens_prefilled"]
    kw = {} if owner is None else {"owner": owner}
    s = engine.create_session(tokens=tokens, **kw)
    out = s.generate(params=GREEDY).tokens
    s.close()
    return out, engine.stats()["tokens_prefilled"] - before


@pytest.fixture(scope="module")
def engines():
    with Engine("tiny") as cached, Engine("tiny", prefix_cache=False) as fresh:
        yield cached, fresh


def test_a_conversation_sent_again_computes_only_its_new_tokens(engines):
    cached, fresh = engines
    conv, seen = list(range(1, 38)), []
    for t in range(10):
        ours, computed = turn(cached, conv)
        theirs, _ = turn(fresh, conv)
        assert ours == theirs
        assert computed == len(conv) - common(conv, seen)  # to the token, inside a page
        seen = (conv + ours)[:-1]  # what has KV: not the last token sampled
        conv = conv + ours + [40 + t, 41, 42]
    cached.check()


def test_a_match_may_end_inside_a_cached_page_which_stays_whole(engines):
    cached, fresh = engines
    a = [7] * 5 + list(range(100, 140))  # 45 tokens: two full pages and a partial one
    turn(cached, a)
    b = a[:21] + [3, 4, 5]  # diverges inside the second page
    ours, computed = turn(cached, b)
    assert computed == len(b) - 21 and ours == turn(fresh, b)[0]
    # the page it matched was copied before being written: a's full prefix still matches
    ours, computed = turn(cached, a[:40] + [9])
    assert computed == 1 and ours == turn(fresh, a[:40] + [9])[0]
    cached.check()


def test_another_tenant_matches_nothing(engines):
    cached, _ = engines
    a = list(range(200, 240))
    turn(cached, a, owner="alice")
    _, computed = turn(cached, a + [1], owner="bob")
    assert computed == len(a) + 1
    _, computed = turn(cached, a + [1], owner="alice")
    assert computed == 1


def test_random_conversations_give_a_fresh_runs_outputs(engines):
    """Sessions that branch off, re-send, roll back and go on: every output equals the
    uncached engine's, and the page invariants hold throughout."""
    cached, fresh = engines
    rng = random.Random(0)
    history: list[list[int]] = [[rng.randrange(1, 250) for _ in range(rng.randrange(1, 40))]]
    for _ in range(40):
        base = rng.choice(history)
        cut = rng.randrange(1, len(base) + 1)
        tokens = base[:cut] + [rng.randrange(1, 250) for _ in range(rng.randrange(0, 20))]
        ours, _ = turn(cached, tokens)
        assert ours == turn(fresh, tokens)[0], tokens
        history.append(tokens + ours)
        if rng.random() < 0.3:  # a live session rolled back into a shared page, then on
            s = cached.create_session(tokens=tokens)
            snap = s.snapshot()
            s.generate(params=GREEDY)
            s.rollback(snap)
            s.append(tokens=[5, 6])
            out = s.generate(params=GREEDY).tokens
            ref = fresh.create_session(tokens=tokens + [5, 6])
            assert out == ref.generate(params=GREEDY).tokens
            ref.close()
            snap.delete()
            s.close()
        cached.check()


def test_chat_completions_sent_in_full_for_ten_turns():
    engine = AsyncEngine("tiny", kv_blocks=4096)
    reference = Engine("tiny", prefix_cache=False)
    try:
        app = create_app(ServerSettings(), engine=engine)
        with TestClient(app) as client:
            messages = [{"role": "user", "content": "Hello there, how are you?"}]
            seen: list[int] = []
            for t in range(10):
                prompt = reference.encode(render_chat(messages, reference.tokenizer),
                                          reference.tokenizer.chat_template is None)
                before = client.get("/v1/system").json()["stats"]["tokens_prefilled"]
                r = client.post("/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 8, "temperature": 0.0})
                assert r.status_code == 200, r.text
                computed = client.get("/v1/system").json()["stats"]["tokens_prefilled"] - before
                s = reference.create_session(tokens=prompt)
                g = s.generate(params=SamplingParams(max_tokens=8, temperature=0.0))
                s.close()
                reply = r.json()["choices"][0]["message"]["content"]
                assert reply == g.text  # a fresh run's output
                assert computed == len(prompt) - common(prompt, seen)  # only what is new
                seen = (prompt + g.tokens)[:-1]  # what has KV: not the last token sampled
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": f"And turn {t}?"}]
    finally:
        engine.kernel.shutdown()
        reference.close()


def test_reset_prefix_cache_forgets_every_cached_page_and_nothing_running(engines):
    cached, fresh = engines
    conv = list(range(200, 260))
    turn(cached, conv)
    live = cached.create_session(tokens=conv[:40])
    live.generate(params=GREEDY)
    assert cached.reset_prefix_cache() > 0
    assert cached.reset_prefix_cache() == 0  # nothing left to forget
    ours, computed = turn(cached, conv)
    assert computed == len(conv)  # no page was mapped: everything computed again
    assert ours == turn(fresh, conv)[0]
    # the live session keeps its KV and goes on as a fresh run of its tokens would
    assert live.generate(params=GREEDY).tokens == turn(fresh, live.tokens)[0]
    live.close()
    cached.check()
