"""CUDA graphs for decode steps, the parts that run without a GPU: bucketing, padding, the
scratch block, and the graph path's bookkeeping with each "graph" run eagerly on CPU."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agentos import Engine
from agentos.kernel.runner.cuda_graphs import (
    BATCH_BUCKETS,
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    input_views,
    pad_decode,
    prefers_cascade,
    width_bucket,
)


def test_batch_buckets_end_at_max_batch_size():
    assert batch_buckets(256) == list(BATCH_BUCKETS)
    assert batch_buckets(1000) == list(BATCH_BUCKETS)  # larger batches run eagerly
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert batch_buckets(1) == [1]
    buckets = batch_buckets(100)
    assert [bucket_for(n, buckets) for n in (1, 3, 16, 17, 97, 100)] == [1, 4, 16, 24, 100, 100]
    assert bucket_for(101, buckets) is None


def test_width_bucket_is_the_next_power_of_two_capped():
    assert [width_bucket(n, 512) for n in (1, 2, 3, 4, 5, 200, 512)] == [1, 2, 4, 4, 8, 256, 512]
    assert width_bucket(300, 320) == 320  # max_model_len / block_size need not be a power of two
    assert width_bucket(321, 320) is None


def test_pad_decode_makes_padded_rows_harmless():
    batch, width, scratch = 4, 4, 99 * 16
    tables = [np.array([7]), np.array([3, 5, 8]), np.array([2, 6])]
    buf = np.full(4 * batch + batch * width, -1, dtype=np.int64)  # garbage from a last step
    pad_decode(buf, [11, 12, 13], np.array([4, 40, 17]), np.array([116, 136, 97]), tables,
               [5, 41, 18], batch, width, scratch)
    ids, pos, slots, lens, tab = input_views(buf, batch, width)
    assert ids.tolist() == [11, 12, 13, 0]
    assert pos.tolist() == [4, 40, 17, 0]
    assert slots.tolist() == [116, 136, 97, scratch]  # the padded row writes only the scratch slot
    assert lens.tolist() == [5, 41, 18, 1]  # and attends to one slot
    assert tab.tolist() == [[7, 0, 0, 0], [3, 5, 8, 0], [2, 6, 0, 0], [0, 0, 0, 0]]
    # the same layout over a torch buffer (the device's static inputs) is made of views
    t = torch.from_numpy(buf)
    storage = t.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == storage for v in input_views(t, batch, width))
    assert input_views(t, batch, width)[4].is_contiguous()


def test_prefers_cascade_when_it_skips_half_the_reads():
    tables = [np.arange(10), np.arange(10), np.arange(10)]
    assert prefers_cascade([([0, 1, 2], np.arange(8))], tables)  # saves 16 of 30 blocks
    assert not prefers_cascade([([0, 1], np.arange(4))], tables)  # saves 4 of 30


def test_scratch_block_is_never_allocated_and_full_pool_runs():
    with Engine("tiny", kv_blocks=8, block_size=16, max_model_len=128) as engine:
        k = engine.kernel
        assert k.kalloc.num_blocks == 8 and k.runner.scratch_block == 8
        assert k.runner.kv.shape[0] == 9
        s = engine.create_session(tokens=list(range(3, 103)))
        gen = s.generate(max_tokens=64, temperature=0.0, ignore_eos=True)
        assert gen.finish_reason == "length" and len(s.tokens) == 128
        assert engine.stats()["kv"]["device_blocks_used"] == 8  # every block the allocator has
        pages = k.procs[s.id].table.block_ids
        assert sorted(k.kalloc.slot[pages].tolist()) == list(range(8))
        assert not k.runner.kv[8].any()  # eager steps never touch the scratch block
        engine.check()


def _together(engine, sessions, n):
    """Greedy generations of the sessions, all queued before the first step runs (so the
    steps batch them together, padding included). Returns (tokens, logprobs) per session."""
    engine.pause()
    with ThreadPoolExecutor(len(sessions)) as pool:
        futs = [pool.submit(s.generate, max_tokens=n, temperature=0.0, ignore_eos=True)
                for s in sessions]
        while engine.stats()["queue"]["runnable"] < len(sessions):
            time.sleep(0.005)
        engine.resume()
        gens = [f.result() for f in futs]
    return [g.tokens for g in gens], [g.logprobs for g in gens]


def _greedy(engine, prompts, n=24):
    return _together(engine, [engine.create_session(tokens=p) for p in prompts], n)


PROMPTS = [list(range(3, 3 + n)) for n in (5, 23, 40)]


def test_cpu_runs_eagerly_with_the_same_results():
    with Engine("tiny", kv_blocks=256, cuda_graphs=False) as off:
        ref = _greedy(off, PROMPTS)
    with Engine("tiny", kv_blocks=256, cuda_graphs=True) as on:
        assert on.kernel.runner.graphs is None  # graphs exist only on CUDA
        assert _greedy(on, PROMPTS) == ref
        stats = on.kernel.runner.capture_stats
        assert stats["graphs_captured"] == stats["graph_replays"] == 0
        assert stats["eager_decode_steps"] > 0


def _eager_capture(self, batch, width, kv):
    # a "graph" that runs the recorded step eagerly: everything but the CUDA capture itself
    return SimpleNamespace(replay=self._forward(batch, width, kv))


def test_graph_path_on_cpu_equals_eager(monkeypatch):
    """The graph path with each capture replaced by an eager run of the same step over the
    static buffers: padding, bucketing and the logits' rows give the eager path's results."""
    with Engine("tiny", kv_blocks=256, cuda_graphs=False) as off:
        ref = _greedy(off, PROMPTS)
        fork_ref = _forks(off)
    monkeypatch.setattr(DecodeGraphs, "_capture", _eager_capture)
    with Engine("tiny", kv_blocks=256) as on:
        runner = on.kernel.runner
        max_blocks = -(-on.kernel.max_model_len // 16)
        runner.graphs = DecodeGraphs(runner.model, 8, max_blocks, runner.scratch_block * 16, "cpu")
        tokens, logprobs = _greedy(on, PROMPTS)
        assert tokens == ref[0]
        assert np.allclose(logprobs, ref[1], atol=1e-4)
        stats = runner.capture_stats
        assert stats["graph_replays"] > 0
        assert stats["graphs_captured"] == len(runner.graphs._graphs)
        assert {b for b, _ in runner.graphs._graphs} <= {1, 2, 4}  # 3 sessions: bucket 4
        assert runner.kv[runner.scratch_block].any()  # padded rows wrote there
        eager = stats["eager_decode_steps"]
        assert _forks(on) == fork_ref  # cascade skips 20 of 33 blocks: run eagerly
        assert runner.capture_stats["eager_decode_steps"] > eager
        on.sleep()  # the pool is released: the graphs go with it
        assert runner.graphs._graphs == {} and runner.graphs._inputs is None
        on.wake_up()
        assert _greedy(on, PROMPTS)[0] == ref[0]
        on.check()


def _forks(engine):
    s = engine.create_session(tokens=list(range(3, 163)))  # 10 full blocks, shared by 3 forks
    return _together(engine, s.fork(n=3), 8)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_results_equal_eager_on_gpu():
    # fp32: padding changes GEMM shapes, and bf16 rounding could flip a near tie
    with Engine("tiny", device="cuda", dtype="float32", kv_blocks=256, cuda_graphs=False) as off:
        ref = _greedy(off, PROMPTS)
    with Engine("tiny", device="cuda", dtype="float32", kv_blocks=256) as on:
        tokens, logprobs = _greedy(on, PROMPTS)
        assert tokens == ref[0]
        assert np.allclose(logprobs, ref[1], atol=1e-3)
        stats = on.kernel.runner.capture_stats
        assert stats["graph_replays"] > stats["graphs_captured"] > 0


def test_a_failed_capture_falls_back_to_eager_for_good():
    """An op that cannot be captured must not fail the step: it runs eagerly and graphs
    stay off (emulated on CPU: the capture raises)."""
    from agentos.kernel.runner.cuda_graphs import CaptureError

    with Engine(kv_blocks=64) as engine:
        runner = engine.kernel.runner

        class Broken:
            num_captured = num_replays = 0

            def run(self, *args):
                raise CaptureError("not permitted when stream is capturing")

            def clear(self):
                pass

        want = engine.create_session(tokens=[5, 6, 7]).generate(max_tokens=4, temperature=0.0).tokens
        runner.graphs = Broken()
        got = engine.create_session(tokens=[5, 6, 7]).generate(max_tokens=4, temperature=0.0).tokens
        assert got == want and runner.graphs is None
