"""Virtual memory under pressure, end to end: oversubscription with swap and with drop,
snapshots whose pages left the device, the prefix cache, states in info and stats."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from agentos import Engine

BS = 16


def workload(seed: int, sessions: int, prompt_len: int, turns: int, new_tokens: int):
    """Per session: a prompt and the tool outputs appended before each later turn."""
    rng = random.Random(seed)
    return [([rng.randrange(1, 256) for _ in range(prompt_len + rng.randrange(BS))],
             [[rng.randrange(1, 256) for _ in range(rng.randrange(1, 24))] for _ in range(turns - 1)])
            for _ in range(sessions)]


def run_agents(engine: Engine, work, new_tokens: int) -> list[list[int]]:
    """Every session runs its turns (append, greedy generate) concurrently with the others;
    returns each session's final tokens."""
    def agent(item):
        prompt, tools = item
        s = engine.create_session(tokens=prompt)
        s.generate(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for tool in tools:
            s.append(tokens=tool)
            s.generate(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return s

    with ThreadPoolExecutor(len(work)) as pool:
        sessions = list(pool.map(agent, work))
    tokens = [s.tokens for s in sessions]
    engine.check()
    for s in sessions:
        s.close()
    engine.check()
    kv = engine.stats()["kv"]
    assert kv["device_blocks_used"] == 0 and kv["host_blocks_used"] == 0
    return tokens


@pytest.fixture(scope="module")
def reference_run():
    work = workload(0, sessions=12, prompt_len=40, turns=3, new_tokens=12)
    with Engine("tiny", block_size=BS, kv_blocks=1024, host_blocks=0) as engine:
        return work, run_agents(engine, work, 12)


def working_set_blocks(tokens: list[list[int]]) -> int:
    return sum(-(-len(t) // BS) for t in tokens)


@pytest.mark.parametrize("host_blocks", [64, 0], ids=["swap", "drop"])
def test_oversubscribed_pool_gives_identical_greedy_outputs(reference_run, host_blocks):
    """A device pool of a quarter of the live working set: sessions are swapped out (or
    dropped and recomputed) and back, and every one finishes with the tokens of the
    unconstrained run."""
    work, expected = reference_run
    pool = working_set_blocks(expected) // 4
    with Engine("tiny", block_size=BS, kv_blocks=pool, host_blocks=host_blocks) as engine:
        assert run_agents(engine, work, 12) == expected
        stats = engine.stats()
    if host_blocks:
        assert stats["swap_out_blocks"] > 0 and stats["swap_in_blocks"] > 0
    else:
        assert stats["dropped_blocks"] > 0 and stats["swap_out_blocks"] == 0


@pytest.mark.parametrize("host_blocks", [400, 24], ids=["swapped", "dropped"])
def test_rollback_to_snapshots_whose_pages_left_the_device(host_blocks):
    """100 snapshots of one growing session in a pool that cannot hold them: no failure,
    and rolling back to any of them gives exactly the state an unconstrained engine
    gives: tokens, the next greedy tokens with their logprobs, and the random stream."""
    results = []
    for kv_blocks, host in ((2048, 0), (72, host_blocks)):
        with Engine("tiny", block_size=BS, kv_blocks=kv_blocks, host_blocks=host) as engine:
            s = engine.create_session(tokens=list(range(1, 33)), seed=5)
            snaps = []
            for _ in range(100):
                s.generate(max_tokens=8, temperature=0.0, ignore_eos=True)
                snaps.append(s.snapshot())
            stats = engine.stats()
            observed = []
            for i in (0, 1, 37, 64, 98, 99, 3):
                s.rollback(snaps[i])
                greedy = s.generate(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
                s.rollback(snaps[i])
                sampled = s.generate(max_tokens=3, temperature=1.0, ignore_eos=True)
                observed.append((s.tokens, greedy.tokens, greedy.logprobs, sampled.tokens))
            engine.check()
            for snap in snaps:
                snap.delete()
            s.close()
            engine.check()
            results.append((observed, stats))
    (expected, _), (got, stats) = results
    assert stats["swap_out_blocks"] > 0, "the small pool was never under pressure"
    assert (stats["dropped_blocks"] > 0) == (host_blocks < 100), "the host tier filled up or not"
    for (tok_e, greedy_e, lp_e, samp_e), (tok_g, greedy_g, lp_g, samp_g) in zip(expected, got):
        assert tok_g == tok_e and greedy_g == greedy_e and samp_g == samp_e
        if stats["dropped_blocks"]:  # recomputed from tokens in other chunks: float rounding
            assert lp_g == pytest.approx(lp_e, abs=1e-4)
        else:  # swapped bytes come back bit for bit
            assert lp_g == lp_e


def test_prefix_cache_shares_one_prompt_among_32_sessions():
    """32 sessions created at once with the same 2k-token prompt hold one prompt's blocks,
    and the prompt is prefilled once; each then diverges on its own pages."""
    prompt = [random.Random(3).randrange(1, 256) for _ in range(2048)]
    with Engine("tiny", block_size=BS, kv_blocks=1024) as engine:
        sessions = [engine.create_session(tokens=prompt) for _ in range(32)]
        outs = [s.generate(max_tokens=2, temperature=0.0, ignore_eos=True).tokens for s in sessions[:1]]
        stats = engine.stats()
        assert stats["tokens_prefilled"] == 2048, "the prompt was prefilled more than once"
        assert stats["prefix_hit_tokens"] >= 31 * 2048 - 31
        assert stats["kv"]["device_blocks_used"] <= 2048 // BS + 2
        outs += [s.generate(max_tokens=2, temperature=0.0, ignore_eos=True).tokens for s in sessions[1:]]
        assert all(o == outs[0] for o in outs)
        # each generate copied the shared last block and wrote one new one
        assert engine.stats()["kv"]["device_blocks_used"] <= 2048 // BS + 2 * 32
        for s in sessions:
            s.close()
        kv = engine.stats()["kv"]
        assert kv["device_blocks_used"] == 0 and kv["device_blocks_cached"] > 0  # kept for reuse
        again = engine.create_session(tokens=prompt)  # from the LRU: no prefill at all
        assert again.generate(max_tokens=2, temperature=0.0, ignore_eos=True).tokens == outs[0]
        assert engine.stats()["tokens_prefilled"] == 2048
        again.close()
        engine.check()


def test_states_and_levels_are_reported():
    with Engine("tiny", block_size=BS, kv_blocks=8, host_blocks=64) as engine:
        a = engine.create_session(tokens=list(range(1, 100)))  # 7 blocks
        a.generate(max_tokens=1, temperature=0.0)
        b = engine.create_session(tokens=list(range(2, 101)))
        b.generate(max_tokens=1, temperature=0.0)  # a must leave the device for b
        info = {i["id"]: i for i in engine.list_sessions()}
        assert info[a.id]["state"] == "swapped" and info[a.id]["host_blocks"] > 0
        assert info[b.id]["state"] == "sleeping" and info[b.id]["host_blocks"] == 0
        assert all(isinstance(i["level"], int) for i in info.values())
        stats = engine.stats()
        assert stats["scheduler"] == "mlfq" and stats["sessions"]["by_state"] == {"swapped": 1, "sleeping": 1}
        assert stats["kv"]["host_blocks_used"] == info[a.id]["host_blocks"]
        a.generate(max_tokens=1, temperature=0.0)  # swapped back in to run
        info = {i["id"]: i for i in engine.list_sessions()}
        assert info[a.id]["state"] == "sleeping" and info[a.id]["host_blocks"] == 0
        a.close()
        b.close()
        engine.check()


@pytest.mark.parametrize("layout", ["both runs", "dst run", "src run", "scattered"])
def test_block_copies_match_a_reference_in_every_layout(layout):
    import torch

    from agentos.kernel.runner.model_runner import _copy_runs

    rng = random.Random(layout)
    src = torch.randn(32, 2, 3, 4)
    dst = torch.zeros(24, 2, 3, 4)
    n = 9
    runs = {"both runs": (range(5, 5 + n), range(2, 2 + n)),
            "dst run": (rng.sample(range(32), n), range(10, 10 + n)),
            "src run": (range(20, 20 + n), rng.sample(range(24), n)),
            "scattered": (rng.sample(range(32), n), rng.sample(range(24), n))}
    s_idx, d_idx = map(list, runs[layout])
    expected = dst.clone()
    expected[d_idx] = src[s_idx]
    _copy_runs(src, dst, list(zip(s_idx, d_idx)))
    assert torch.equal(dst, expected)
