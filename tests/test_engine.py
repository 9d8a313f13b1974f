"""Engine end to end: batched parity with transformers, fork/snapshot/rollback semantics,
bad input that changes nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import agentos
from agentos import (
    AsyncEngine,
    ConflictError,
    ContextLengthError,
    Engine,
    InvalidRequestError,
    NotFoundError,
)
from hf_models import batched_greedy_matches_hf, hf_generate, make_hf_checkpoint


@pytest.fixture(scope="module")
def tiny():
    with Engine("tiny", kv_blocks=4096, block_size=16) as engine:
        yield engine


def _used(engine) -> int:
    return engine.stats()["kv"]["device_blocks_used"]


@pytest.mark.parametrize("kind,tie,extra", [
    ("llama", False, {}), ("qwen2", True, {}), ("qwen3", False, {}),
    # a sliding window shorter than every prompt and than the generation
    ("mistral", False, {"sliding_window": 9}),
    ("qwen2", False, {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
])
def test_batched_chunked_greedy_matches_transformers(tmp_path, kind, tie, extra):
    path = make_hf_checkpoint(tmp_path / kind, kind, tie=tie, num_kv_heads=2, **extra)
    for _, gen in batched_greedy_matches_hf(path, (5, 23, 40, 57), 64):
        assert gen.finish_reason == "length"

def test_sessions_fork_snapshot_rollback(tiny):
    base = _used(tiny)
    s = tiny.create_session(prompt="The agent thinks")
    first = s.generate(max_tokens=12, temperature=0.0, ignore_eos=True)
    snap = s.snapshot()
    assert snap.num_tokens == len(s.tokens)
    kids = s.fork(n=3)
    assert all(k.tokens == s.tokens for k in kids)
    assert [k.info()["parent_id"] for k in kids] == [s.id] * 3
    sampled = [k.generate(max_tokens=8, temperature=1.0).tokens for k in kids]
    assert len({tuple(t) for t in sampled}) > 1, "children must draw distinct streams"
    after = s.generate(max_tokens=8, temperature=0.9)
    s.rollback(snap)
    assert len(s.tokens) == snap.num_tokens
    again = s.generate(max_tokens=8, temperature=0.9)
    assert again.tokens == after.tokens and again.logprobs == after.logprobs
    mask = s.get_mask()
    assert mask[-8:] == [1] * 8 and mask[-8 - 12 - 1] == 0
    assert first.tokens == s.tokens[snap.num_tokens - 12 : snap.num_tokens]
    restored = tiny.restore(snap)
    assert restored.tokens == s.tokens[: snap.num_tokens]
    s.close()
    assert restored.generate(max_tokens=8, temperature=0.9).tokens == after.tokens
    tiny.check()
    for k in kids + [restored]:
        k.close()
    assert _used(tiny) > base  # the snapshot still holds its blocks
    snap.delete()
    assert _used(tiny) == base
    tiny.check()


def test_seed_reproduces_and_append_masks(tiny):
    s = tiny.create_session(tokens=[256, 1, 2, 3])
    a = s.generate(max_tokens=6, temperature=0.8, seed=7)
    n = s.append(text="tool: ok")
    assert n == 4 + 6 + len(b"tool: ok")
    assert s.get_mask() == [0] * 4 + [1] * 6 + [0] * 8
    t = tiny.create_session(tokens=[256, 1, 2, 3])
    assert t.generate(max_tokens=6, temperature=0.8, seed=7).tokens == a.tokens
    s.close()
    t.close()


def test_fork_of_long_session_adds_at_most_one_block_per_child(tiny):
    s = tiny.create_session(tokens=[i % 250 for i in range(2000)])
    s.generate(max_tokens=1, temperature=0.0)
    before = _used(tiny)
    kids = s.fork(n=16)
    assert _used(tiny) == before  # fork copies no KV
    for k in kids:
        k.generate(max_tokens=1, temperature=0.0)
    assert _used(tiny) - before <= 16  # each child copies at most its tail block
    for k in kids:
        k.close()
    s.close()
    tiny.check()


def test_stop_strings_and_tokens(tiny):
    def run(**kw):
        s = tiny.create_session(prompt="abc")
        g = s.generate(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, **kw)
        s.close()
        return g

    free = run()
    text = free.text
    i = next(i for i in range(3, len(text)) if text[i : i + 2].isascii()
             and text[i : i + 2].isprintable() and len(text[i : i + 2]) == 2)
    stop = text[i : i + 2]
    cut = run(stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert free.tokens[: len(cut.tokens)] == cut.tokens
    k = free.tokens.index(free.tokens[5])
    by_id = run(stop_token_ids=[free.tokens[5]])
    assert by_id.finish_reason == "stop" and by_id.tokens == free.tokens[: k + 1]


def test_bad_input_raises_and_changes_nothing(tiny):
    s = tiny.create_session(tokens=[256, 10, 11])
    s.generate(max_tokens=2, temperature=0.0)
    tokens, stats = s.tokens, tiny.stats()["kv"]
    bad_calls = [
        (InvalidRequestError, lambda: s.append(tokens=[5, 10_000])),
        (InvalidRequestError, lambda: s.append(tokens=[-1])),
        (InvalidRequestError, lambda: s.append(tokens="abc")),
        (InvalidRequestError, lambda: s.generate(max_tokens=0)),
        (InvalidRequestError, lambda: s.generate(temperature=-0.1)),
        (InvalidRequestError, lambda: s.generate(top_p=0.0)),
        (InvalidRequestError, lambda: s.generate(top_p=1.5)),
        (InvalidRequestError, lambda: s.generate(top_k=-2)),
        (InvalidRequestError, lambda: s.fork(n=0)),
        (InvalidRequestError, lambda: s.append()),
        (ContextLengthError, lambda: s.append(tokens=[1] * 40_000)),
        (InvalidRequestError, lambda: tiny.create_session(tokens=[300])),
        (InvalidRequestError, lambda: tiny.create_session(tokens=[])),
        (ContextLengthError, lambda: tiny.create_session(tokens=[1] * 40_000)),
        (NotFoundError, lambda: tiny.session("sess_nope")),
        (NotFoundError, lambda: s.rollback("snap_nope")),
        (NotFoundError, lambda: tiny.restore("snap_nope")),
    ]
    for err, call in bad_calls:
        with pytest.raises(err):
            call()
    assert s.tokens == tokens and tiny.stats()["kv"] == stats
    s.close()
    for call in (lambda: s.tokens, lambda: s.generate(max_tokens=1), lambda: s.snapshot(),
                 lambda: s.fork(), lambda: s.append(tokens=[1]), lambda: s.close()):
        with pytest.raises(NotFoundError):
            call()
    tiny.check()


def test_errors_carry_http_status():
    assert NotFoundError.status_code == 404 and ConflictError.status_code == 409
    assert issubclass(InvalidRequestError, ValueError)
    assert InvalidRequestError.status_code == 400


def test_generating_session_is_busy_and_close_aborts(tiny):
    s = tiny.create_session(tokens=[256] + [7] * 50)
    results = {}

    def run():
        results["gen"] = s.generate(max_tokens=30_000, temperature=0.0, ignore_eos=True)

    t = threading.Thread(target=run)
    t.start()
    while s.info()["num_generated"] < 3:
        pass
    with pytest.raises(ConflictError):
        s.fork()
    with pytest.raises(ConflictError):
        s.append(tokens=[1])
    s.close()
    t.join(timeout=30)
    assert results["gen"].finish_reason == "abort" and len(results["gen"].tokens) >= 3
    tiny.check()


def test_a_cancelled_call_does_not_stop_the_kernel(tiny):
    """A generate whose Future its caller cancelled still ends in the loop thread (here with
    an error: its session is closed), and the kernel keeps serving."""
    from agentos import SamplingParams

    k = tiny.kernel
    s = tiny.create_session(tokens=[256] + [7] * 20)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    fut = k.call(k.sys_generate, s.id, params).result(timeout=30)
    while s.info()["num_generated"] < 2:
        pass
    assert fut.cancel() or fut.done()
    s.close()
    other = tiny.create_session(tokens=[256, 5, 6])
    assert len(other.generate(max_tokens=4, temperature=0.0, ignore_eos=True).tokens) == 4
    tiny.check()


def test_context_limit_ends_generation_with_length():
    with Engine("tiny", kv_blocks=64, max_model_len=40) as engine:
        s = engine.create_session(tokens=[256] * 30)
        g = s.generate(max_tokens=100, temperature=0.0, ignore_eos=True)
        assert g.finish_reason == "length" and len(s.tokens) == 40
        with pytest.raises(ContextLengthError):
            s.generate(max_tokens=1)


def test_async_engine_batches_concurrent_generates():
    async def main():
        async with AsyncEngine("tiny", kv_blocks=1024) as engine:
            sessions = [await engine.create_session(tokens=[256, i + 1, i + 2]) for i in range(6)]
            gens = await asyncio.gather(*(s.generate(max_tokens=10, temperature=0.0,
                                                     ignore_eos=True) for s in sessions))
            assert all(len(g.tokens) == 10 for g in gens)
            steps = (await engine.stats())["steps"]
            assert steps < 6 * 10
            kids = await sessions[0].fork(n=2)
            snap = await kids[0].snapshot()
            await kids[0].rollback(snap)
            assert await kids[0].tokens == await sessions[0].tokens
            for s in sessions + kids:
                await s.close()
            await snap.delete()
            assert (await engine.stats())["kv"]["device_blocks_used"] == 0

    asyncio.run(main())


def test_import_agentos_does_not_import_torch():
    code = ("import sys, agentos; from agentos import Session, SamplingParams, NotFoundError; "
            "from agentos import Client, AsyncClient; Client('http://127.0.0.1:9').close(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'numpy' not in sys.modules, 'numpy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    for name in agentos.__all__:
        assert getattr(agentos, name) is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(dtype):
    with Engine("tiny", kv_blocks=64, dtype=dtype) as engine:
        s = engine.create_session(tokens=[256, 5, 6, 7])
        g = s.generate(max_tokens=8, temperature=0.0, ignore_eos=True)
        assert len(g.tokens) == 8 and all(lp <= 0 for lp in g.logprobs)
        assert engine.kernel.runner.kv.dtype == getattr(torch, dtype)


def test_stream_equals_plain_generate(tiny):
    s = tiny.create_session(prompt="stream me")
    snap = s.snapshot()
    plain = s.generate(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)
    s.rollback(snap)
    chunks = list(s.generate(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True, stream=True))
    assert [c.token for c in chunks[:-1]] == plain.tokens
    assert "".join(c.text for c in chunks) == plain.text
    assert [c.logprob for c in chunks[:-1]] == plain.logprobs
    assert chunks[-1].token is None and chunks[-1].finish_reason == "length"
    assert s.tokens == snap_tokens(tiny, snap) + plain.tokens
    with pytest.raises(InvalidRequestError):  # bad parameters raise at the call, not later
        s.generate(max_tokens=0, stream=True)
    s.close()


def test_stream_stopped_early_keeps_tokens(tiny):
    s = tiny.create_session(tokens=[1, 2, 3])
    it = s.generate(max_tokens=10_000, ignore_eos=True, stream=True)
    got = [next(it).token for _ in range(3)]
    it.close()  # the consumer walks away: the call ends, the tokens stay
    tokens = s.tokens
    assert tokens[:6] == [1, 2, 3, *got] and len(tokens) < 3 + 10_000
    assert s.generate(max_tokens=2, ignore_eos=True).finish_reason == "length"  # usable
    s.close()


async def test_async_stream():
    async with AsyncEngine("tiny", kv_blocks=256) as engine:
        s = await engine.create_session(tokens=[5, 6, 7])
        chunks = [c async for c in await s.generate(max_tokens=5, temperature=0, stream=True,
                                                       ignore_eos=True)]
        assert len(chunks) == 6 and chunks[-1].finish_reason == "length"
        assert (await s.tokens)[3:] == [c.token for c in chunks[:-1]]
        await s.close()


def snap_tokens(engine, snap):
    t = engine.restore(snap)
    tokens = t.tokens
    t.close()
    return tokens


def test_top_k_beyond_the_vocabulary_means_off(tiny):
    # a huge top_k once overflowed inside the step and failed every running call
    s = tiny.create_session(tokens=[1, 2, 3])
    snap = s.snapshot()
    off = s.generate(max_tokens=4, temperature=0.9, seed=5, top_k=0)
    s.rollback(snap)
    huge = s.generate(max_tokens=4, temperature=0.9, seed=5, top_k=2**63)
    assert huge.tokens == off.tokens
    s.close()
    snap.delete()


def test_sliding_window_in_deterministic_mode_matches_transformers(tmp_path):
    """The batch-invariant attention masks the window too: greedy equals transformers, and
    a session alone equals it inside a batch, token for token."""
    path = make_hf_checkpoint(tmp_path / "m", "mistral", num_kv_heads=2, sliding_window=5)
    prompts = [list(range(3, 20)), list(range(40, 51))]
    with Engine(str(path), kv_blocks=256, block_size=4, deterministic=True) as engine:
        sessions = [engine.create_session(tokens=p) for p in prompts]
        with ThreadPoolExecutor(2) as pool:
            gens = list(pool.map(lambda s: s.generate(max_tokens=20, temperature=0.0,
                                                      ignore_eos=True), sessions))
        alone = engine.create_session(tokens=prompts[0]).generate(
            max_tokens=20, temperature=0.0, ignore_eos=True)
    for p, gen in zip(prompts, gens):
        assert gen.tokens == hf_generate(path, p, 20)
    assert alone.tokens == gens[0].tokens and alone.logprobs == gens[0].logprobs


def test_sliding_window_forks_decoding_together_match_transformers(tmp_path):
    """Forks of one long session decode in one batch over their shared blocks; with a window
    wider than what follows the shared prefix, the window reaches into the shared blocks, so
    sliding layers must attend each row's whole table (no shared-prefix cascade)."""
    path = make_hf_checkpoint(tmp_path / "m", "mistral", num_kv_heads=2, sliding_window=30)
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with Engine(str(path), kv_blocks=512, block_size=4) as engine:
        s = engine.create_session(tokens=prompt)
        s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)
        kids = s.fork(n=4)
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda k: k.generate(max_tokens=20, temperature=0.0,
                                                      ignore_eos=True).tokens, kids))
        assert engine.stats()["steps"] < 4 * 20  # the forks really decoded together
        ref = hf_generate(path, s.tokens, 20)
    assert outs == [ref] * 4
