"""Host overhead: the loop's work per decode step does not grow with idle sessions; the
syscalls that only edit tables run in the caller's thread when the loop is free and queue
otherwise; `agentos bench overhead` reports a breakdown whose phases add up."""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path

import pytest

from agentos import Engine
from agentos.bench import overhead

ROOT = str(Path(__file__).resolve().parents[1])


class LineCounter:
    """Counts the lines the engine's own code executes in the threads started while it is
    installed (the loop thread): a measure of host work that machine noise cannot move."""

    def __init__(self):
        self.on, self.lines = False, 0

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
        return self._local

    def __call__(self, frame, event, arg):
        if self.on and frame.f_code.co_filename.startswith(ROOT):
            return self._local
        return None


def _lines_per_step(engine: Engine, counter: LineCounter, prompt: list[int]) -> float:
    s = engine.create_session(tokens=prompt)
    s.generate(max_tokens=1, temperature=0.0)
    steps0, counter.lines, counter.on = engine.kernel.stats["steps"], 0, True
    s.generate(max_tokens=16, temperature=0.0, ignore_eos=True)
    counter.on = False
    steps = engine.kernel.stats["steps"] - steps0
    s.close()
    return counter.lines / steps


def test_a_decode_steps_host_work_does_not_grow_with_idle_sessions():
    counter = LineCounter()
    threading.settrace(counter)
    try:
        engine = Engine("tiny", kv_blocks=8192)
    finally:
        threading.settrace(None)  # only the loop thread, started above, is traced
    rng = random.Random(0)
    prompt = [rng.randrange(3, 250) for _ in range(64)]
    with engine:
        alone = _lines_per_step(engine, counter, prompt)
        idle = [engine.create_session(tokens=[rng.randrange(3, 250) for _ in range(8)])
                for _ in range(3000)]
        while engine.kernel.policy.has_work():  # their prefills; then they sleep
            engine.session(idle[-1].id)
        beside = _lines_per_step(engine, counter, prompt)
        assert len(engine.list_sessions()) == 3000
    # the same code runs per step; a loop over every session would multiply it
    assert beside <= 1.2 * alone, (alone, beside)
    assert alone > 50  # the counter saw the step


def test_quick_syscalls_run_in_the_callers_thread_only_when_the_loop_is_free():
    with Engine("tiny") as engine:
        s = engine.create_session(tokens=list(range(3, 60)))
        s.generate(max_tokens=1, temperature=0.0)
        kernel = engine.kernel
        seen = []
        orig = kernel.sys_fork

        def fork(pid, n):
            seen.append(threading.current_thread() is threading.main_thread())
            return orig(pid, n)

        kernel.sys_fork = fork
        (a,) = s.fork(1)
        assert seen == [True]  # the loop was between steps: done here, no handoff
        # while the loop holds the mutex (a step), a caller that may not wait (the event
        # loop of AsyncEngine) is told to queue; with a call queued before, every caller is
        with kernel.syscalls.mutex:
            assert kernel.call_now(kernel.sys_info, a.id, block=False) == (False, None)
            fut = kernel.call(lambda: None)
            assert kernel.call_now(kernel.sys_info, a.id) == (False, None)
        fut.result()
        (b,) = s.fork(1)
        assert seen == [True, True]
        # a busy loop lets a waiting caller in between two steps: it is not starved
        busy = engine.create_session(tokens=list(range(3, 40)))
        worker = threading.Thread(target=busy.generate, kwargs=dict(
            max_tokens=300, temperature=0.0, ignore_eos=True))
        worker.start()
        while busy.info()["num_generated"] < 2:
            pass
        for _ in range(20):
            s.fork(1)[0].close()
        assert busy.info()["num_generated"] < 300, "the forks waited for the whole call"
        worker.join()
        assert seen == [True] * 22
        busy.close()
        kernel.sys_fork = orig
        # generating sessions fork after their call ends (ConflictError), as before
        assert {x.info()["parent_id"] for x in (a, b)} == {s.id}
        for x in (a, b, s):
            x.close()
        assert engine.stats()["kv"]["device_blocks_used"] == 0


def test_a_queued_call_and_a_direct_one_see_one_order():
    # a direct call never overtakes one queued before it: with calls queued it queues too
    with Engine("tiny") as engine:
        kernel = engine.kernel
        order = []
        with kernel.syscalls.mutex:
            kernel.call(order.append, "queued")
            assert kernel.call_now(order.append, "direct") == (False, None)
        engine.list_sessions()  # a round trip: the queued call has run
        assert order == ["queued"]


def test_bench_overhead_breakdown_adds_up():
    result = overhead.run(overhead.OverheadBench(
        sessions=[1, 3], prompt_len=24, new_tokens=6, idle=20, syscall_len=40, op_repeats=5,
        repeats=1, llama_cpp=False))
    assert result["bench"] == "overhead"
    for case in result["decode"]:
        assert case["steps"] == 5  # one step per decode token after the first
        parts = sum(case[p] for p in overhead.PHASES)
        assert parts == pytest.approx(case["wall"], rel=1e-6)
        assert min(case[p] for p in overhead.PHASES) >= 0
        assert case["forward"] > 0 and case["host_overhead"] == pytest.approx(
            case["wall"] - case["forward"])
    assert result["idle"]["idle_sessions"] == 20 and result["idle"]["ratio"] > 0
    ops = result["syscalls"]["ops"]
    assert set(ops) == {"fork + close", "snapshot", "rollback", "info"}
    assert all(op["work_us"] > 0 and op["queued_us"] > 0 for op in ops.values())
    # the peer decoded the same prompt to the same greedy tokens
    single = next(c for c in result["decode"] if c["sessions"] == 1)
    assert result["peer"]["tokens"][1:] == single["tokens"]
    assert any("transformers" in c["name"] for c in result["checks"])


def test_bench_overhead_cli(tmp_path):
    import json
    import subprocess

    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "-m", "agentos.cli", "bench", "overhead", "--sessions",
                           "1,2", "--prompt-len", "16", "--new-tokens", "4", "--idle", "0",
                           "--op-repeats", "3", "--repeats", "1", "--no-peer", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "host overhead" in proc.stdout and "handoff" in proc.stdout
    data = json.loads(out.read_text())
    assert [c["sessions"] for c in data["decode"]] == [1, 2] and data["idle"] is None


def test_llama_cpp_peer_is_skipped_with_a_reason_when_missing(monkeypatch):
    import asyncio

    from agentos.bench import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises
    assert "llama-cpp-python" in llamacpp.missing()
    bench = overhead.OverheadBench(sessions=[1], prompt_len=8, new_tokens=3, idle=0, repeats=1)
    got = asyncio.run(overhead._llama_cpp(bench, 1, random.Random(0)))
    assert set(got) == {"missing"}


def test_the_llama_cpp_checkpoint_loads_here_and_in_transformers(tmp_path):
    from agentos.bench import llamacpp
    from hf_models import hf_generate

    folder = llamacpp.make_checkpoint(str(tmp_path / "ck"), seed=3)
    prompt = [llamacpp.BOS] + [random.Random(1).randrange(3, 256) for _ in range(30)]
    with Engine(folder, dtype="float32") as engine:
        ours = engine.create_session(tokens=prompt).generate(
            max_tokens=12, temperature=0.0, ignore_eos=True).tokens
        assert engine.encode("ba ko") and engine.tokenizer.decode(engine.encode("ba ko")) == "ba ko"
    assert ours == hf_generate(folder, prompt, 12)


def test_a_stream_of_direct_calls_does_not_starve_the_loop():
    # four threads calling info() back to back: each turn of the loop lets in only those
    # waiting when it ended, so a generate call still runs to its end
    with Engine("tiny") as engine:
        s = engine.create_session(tokens=list(range(3, 60)))
        other = engine.create_session(tokens=list(range(3, 30)))
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                other.info()

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        done = threading.Event()
        worker = threading.Thread(target=lambda: (s.generate(
            max_tokens=50, temperature=0.0, ignore_eos=True), done.set()))
        worker.start()
        finished = done.wait(60)
        stop.set()
        for t in [*threads, worker]:
            t.join()
        assert finished, "the generate call was starved by the direct calls"


@pytest.mark.parametrize("sample", [False, True])
def test_decodes_index_arrays_built_at_once_equal_the_loop(monkeypatch, sample):
    """A step of many decodes builds its index arrays for all of them at once
    (model_runner.VECTOR_DECODES); the generations equal those of the per-session loop, for
    sessions of different lengths (different page-table widths) beside a prefill."""
    from agentos.kernel.runner import model_runner

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(rng.randrange(3, 60))]
               for _ in range(12)]
    late = [1] + [rng.randrange(3, 250) for _ in range(40)]
    params = dict(max_tokens=6, temperature=0.8 if sample else 0.0, ignore_eos=True,
                  logprobs=True)

    def run(vector_from: int):
        monkeypatch.setattr(model_runner, "VECTOR_DECODES", vector_from)
        # NOTE: batch-invariant, so that which step each token lands in changes nothing
        with Engine(model="tiny", kv_blocks=256, block_size=4, deterministic=True) as engine:
            sessions = [engine.create_session(tokens=p, seed=i) for i, p in enumerate(prompts)]
            for s in sessions:  # prefilled, with their first token
                s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)
            outs: list[list] = [[] for _ in sessions]
            calls = [threading.Thread(target=lambda s=s, out=out: out.append(s.generate(**params)))
                     for s, out in zip(sessions, outs)]
            for t in calls:
                t.start()
            engine.create_session(tokens=late)  # a prefill among the decode steps
            for t in calls:
                t.join()
            return [(o[0].tokens, o[0].logprobs) for o in outs]

    assert run(vector_from=1) == run(vector_from=10**9)


def test_an_agent_turn_is_timed_as_append_then_generate(tmp_path, monkeypatch):
    """bench overhead's turn against llama.cpp: the peer gets the engine's whole context
    (the prompt and the token generated before the snapshot) and the same fresh chunks,
    and each turn's first token (append after a rollback, then generate) is the one a
    fresh session of that context and chunk gives."""
    import asyncio

    from agentos import AsyncEngine
    from agentos.bench import llamacpp

    folder = llamacpp.make_checkpoint(str(tmp_path / "ck"), seed=3)
    calls = []

    def peer(gguf, context, chunks, threads):
        calls.append((context, chunks))
        with Engine(folder, dtype="float32") as e:
            tokens = [e.create_session(tokens=context + c).generate(
                max_tokens=1, temperature=0.0, ignore_eos=True).tokens[0] for c in chunks]
        return {"s": [0.002] * len(chunks), "tokens": tokens, "threads": threads}

    monkeypatch.setattr(llamacpp, "append_turn", peer)
    bench = overhead.OverheadBench(sessions=[1], prompt_len=8, new_tokens=3, idle=0, repeats=1,
                                   turn_context=40, turn_tokens=5)

    async def turns():
        async with AsyncEngine(model=folder, dtype="float32") as engine:
            return await overhead._turns(engine, bench, "m.gguf", 1, random.Random(0))

    got = asyncio.run(turns())
    ((context, chunks),) = calls
    assert len(context) == 41 and context[0] == llamacpp.BOS
    assert len(chunks) == 5 and all(len(c) == 5 for c in chunks) and len(set(map(tuple, chunks))) == 5
    assert got["tokens_equal"] and got["llama_cpp_ms"] == pytest.approx(2.0) and got["ours_ms"] > 0
    assert (got["context"], got["tokens"]) == (40, 5)
