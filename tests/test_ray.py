"""Engine pools on Ray: sticky routing, least-loaded placement, weights to every actor
through one object, rollouts and search over the pool, and what a dead actor costs."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'agentos[ray]'")

from agentos import Engine, SamplingParams  # noqa: E402
from agentos.kernel.runner.loader import load_model  # noqa: E402
from agentos.ray import EngineLostError, EnginePool  # noqa: E402
from agentos.rl import RolloutWorker  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture
def pool(cluster):
    p = EnginePool(num_engines=2, model="tiny", kv_blocks=512)
    yield p
    p.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_forks_snapshots_and_restores_stay_with_their_root(pool):
    async def go():
        a = await pool.create_session(tokens=[1, 2, 3, 4])
        b = await pool.create_session(tokens=[5, 6, 7])
        assert {pool.home[a.id], pool.home[b.id]} == {0, 1}  # least loaded: one each
        kids = await a.fork(3)
        snap = await a.snapshot()
        restored = await pool.restore(snap)
        assert {pool.home[x.id] for x in [*kids, snap, restored]} == {pool.home[a.id]}
        outs = [(await k.generate(params=GREEDY)).tokens for k in kids]
        assert outs[0] == outs[1] == outs[2]  # greedy from one prefix, on one engine
        with Engine("tiny") as local:
            assert outs[0] == local.create_session(tokens=[1, 2, 3, 4]).generate(
                params=GREEDY).tokens
        listed = await pool.list_sessions()
        assert len(listed) == 6  # from both engines
        for s in [a, b, *kids, restored]:
            await s.close()
        await snap.delete()
        assert pool.live == [0, 0] and await pool.list_sessions() == []
    run(go())


def test_group_rollouts_and_weights_on_every_engine(pool):
    model, _, _ = load_model("tiny", "cpu", torch.float32)
    weights = {k: v * 1.5 if k.endswith("norm.weight") else v
               for k, v in model.hf_named_tensors().items()}

    async def go():
        worker = RolloutWorker(pool)
        groups = await asyncio.gather(*(
            worker.generate_group([1 + i, 2, 3], n=4, sampling=SamplingParams(max_tokens=4))
            for i in range(4)))
        assert all(len(g) == 4 and all(len(t.response_ids) == 4 for t in g) for g in groups)
        assert await pool.update_weights(weights, version=7) == 7
        first = await pool.create_session(tokens=[9, 8, 7])
        second = await pool.create_session(tokens=[9, 8, 7])  # the other engine
        outs = [(pool.home[s.id], (await s.generate(params=GREEDY)).tokens)
                for s in (first, second)]
        for s in (first, second):
            await s.close()
        return outs

    outs = run(go())
    assert {i for i, _ in outs} == {0, 1}
    with Engine("tiny") as local:
        local.update_weights(weights)
        expected = local.create_session(tokens=[9, 8, 7]).generate(params=GREEDY).tokens
    assert outs[0][1] == outs[1][1] == expected  # the new weights, on both engines


def test_a_dead_engine_without_a_store_names_what_was_lost(cluster):
    pool = EnginePool(num_engines=2, model="tiny", kv_blocks=256)
    try:
        async def go():
            a = await pool.create_session(tokens=[1, 2, 3])
            b = await pool.create_session(tokens=[4, 5, 6])
            return a, b

        a, b = run(go())
        victim = pool.actors[pool.home[a.id]]
        os.kill(ray.get(victim.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
        with pytest.raises(EngineLostError, match=a.id):
            run(a.generate(params=GREEDY))
        assert a.id not in pool.home
        assert len(run(b.generate(params=GREEDY)).tokens) == 6  # the other engine serves on
    finally:
        pool.shutdown()


def test_a_dead_engine_with_a_store_comes_back_with_its_sessions(cluster):
    from agentos.bench.redis_server import RedisServer

    with RedisServer() as redis:
        pool = EnginePool(num_engines=2, model="tiny", kv_blocks=256, store=redis.url)
        try:
            async def before():
                a = await pool.create_session(tokens=[1, 2, 3])
                await pool.create_session(tokens=[4, 5, 6])
                await a.generate(params=GREEDY)  # acknowledged: journaled before it returns
                kids = await a.fork(2)
                return a, kids, await a.get_tokens()

            a, kids, tokens = run(before())
            victim = pool.actors[pool.home[a.id]]
            os.kill(ray.get(victim.__ray_call__.remote(lambda self: os.getpid())),
                    signal.SIGKILL)

            async def after():  # the first call waits for Ray's restart, then goes on
                assert await a.get_tokens() == tokens
                assert [await k.get_tokens() for k in kids] == [tokens, tokens]
                return (await kids[0].generate(params=GREEDY)).tokens

            ours = run(after())
            with Engine("tiny") as local:
                s = local.create_session(tokens=[1, 2, 3])
                s.generate(params=GREEDY)
                assert ours == s.generate(params=GREEDY).tokens
        finally:
            pool.shutdown()


def test_engine_control_reaches_every_actor(pool):
    async def go():
        a = await pool.create_session(tokens=[1, 2, 3])
        b = await pool.create_session(tokens=[4, 5, 6])
        await pool.pause()
        waiting = [asyncio.ensure_future(s.generate(max_tokens=4, temperature=0.0))
                   for s in (a, b)]
        await asyncio.sleep(0.5)
        assert not any(w.done() for w in waiting)  # both engines hold their calls
        await pool.resume()
        assert [len((await w).tokens) for w in waiting] == [4, 4]
        long = [asyncio.ensure_future(s.generate(max_tokens=4000, ignore_eos=True))
                for s in (a, b)]
        await asyncio.sleep(0.5)
        assert await pool.abort() == 2
        assert [(await w).finish_reason for w in long] == ["abort", "abort"]
        await pool.sleep()
        await pool.wake_up()
        assert len((await a.generate(max_tokens=2)).tokens) == 2
        engines = (await pool.stats())["engines"]
        assert len(engines) == 2 and all("kv" in e for e in engines)
        for s in (a, b):
            await s.close()
    run(go())


def test_streamed_generates_come_chunk_by_chunk_and_close_aborts(pool):
    async def go():
        s = await pool.create_session(tokens=[1, 2, 3, 4])
        chunks = [c async for c in await pool.generate(s.id, GREEDY, stream=True)]
        assert [c.finish_reason for c in chunks] == [None] * 6 + ["length"]
        tokens = [c.token for c in chunks[:-1]]
        with Engine("tiny") as local:
            assert tokens == local.create_session(tokens=[1, 2, 3, 4]).generate(
                params=GREEDY).tokens
        # closing a stream early aborts the call on the actor; the tokens stay
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = await pool.generate(s.id, long, stream=True)
        first = await stream.__anext__()
        await stream.aclose()
        deadline = asyncio.get_running_loop().time() + 30
        while (await pool.session_info(s.id))["state"] in ("runnable", "running"):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        got = await s.get_tokens()
        assert got[:10] == [1, 2, 3, 4, *tokens] and got[10] == first.token
        assert len(got) < 10 + 400  # aborted, not run to its end
        await s.close()
    run(go())
