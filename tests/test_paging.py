"""The pager under memory pressure, with the real model: no stalls, no thrash, exact tokens.

A property test runs random agent workloads (sessions of a few turns: a prompt, greedy
generates, tool outputs appended between them, sometimes a fork) on tiny device pools,
with a host tier and without one (drop and recompute), under both policies. Every call
must complete within a bound on the engine's steps counted from its submission, and every
session's tokens must equal those of the same workload on an unconstrained pool. A
deliberate stall (a scheduler that never seats one session) must make the check fail.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentos import Engine
from agentos.kernel import core as kernel_core
from agentos.kernel.process import ProcState

BS = 16


class Stalled(AssertionError):
    """A call did not complete within its bound of engine steps."""


def make_work(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(1, 256) for _ in range(rng.randint(1, 70))],
             "turns": [(rng.randint(1, 24), [rng.randrange(1, 256) for _ in range(rng.randint(1, 20))])
                       for _ in range(rng.randint(1, 3))],
             "fork": rng.random() < 0.3, "pause": rng.random() * 0.01}
            for _ in range(n)]


def total_tokens(work: list[dict]) -> int:
    return sum(len(w["prompt"]) + sum(g + len(t) for g, t in w["turns"]) for w in work)


def run_work(engine: Engine, work: list[dict], step_bound: int) -> list[list[int]]:
    """Runs every session concurrently; returns each session's final tokens (a fork's too).
    Raises Stalled when a call is not done within `step_bound` engine steps (scheduling
    attempts included, so a loop that spins without running anything counts) of its
    submission, or within 60 s."""
    kernel = engine.kernel

    def clock() -> int:
        return kernel.stats["steps"] + kernel.stats["idle_steps"]

    def wait(fut):
        t0, s0 = time.monotonic(), clock()
        while True:
            try:
                return fut.result(timeout=0.005)
            except TimeoutError:
                pass
            if clock() - s0 > step_bound or time.monotonic() - t0 > 60:
                raise Stalled(f"a call waited {clock() - s0} steps (bound {step_bound})")

    def agent(w: dict) -> list[list[int]]:
        pid = wait(kernel.call(kernel.sys_create, w["prompt"], 0, "default"))
        pids = [pid]
        for i, (gen, tool) in enumerate(w["turns"]):
            if i:
                time.sleep(w["pause"])
                for q in pids:
                    wait(kernel.call(kernel.sys_append, q, tool))
            params = engine_params(gen)
            futs = [wait(kernel.call(kernel.sys_generate, q, params)) for q in pids]
            for f in futs:
                wait(f)
            if i == 0 and w["fork"]:
                pids += wait(kernel.call(kernel.sys_fork, pid, 1))
        return [wait(kernel.call(kernel.sys_tokens, q))[0] for q in pids]

    with ThreadPoolExecutor(len(work)) as pool:
        out = list(pool.map(agent, work))
    return [t for tokens in out for t in tokens]


def engine_params(max_tokens: int):
    from agentos.kernel.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


_REFS: dict[int, list[list[int]]] = {}
_LOCK = threading.Lock()


def reference(seed: int, n: int) -> list[list[int]]:
    """The workload's tokens on a pool that holds everything (greedy, batch-invariant)."""
    with _LOCK:
        if (seed, n) not in _REFS:
            with Engine("tiny", block_size=BS, kv_blocks=512, host_blocks=0,
                        deterministic=True) as e:
                _REFS[seed, n] = run_work(e, make_work(seed, n), 10**6)
        return _REFS[seed, n]


def pool_for(work: list[dict], slack: int) -> int:
    """The smallest pool in which every session fits alone (plus a fork's copied tail
    block and a tail block being written), plus slack."""
    return max(-(-(len(w["prompt"]) + sum(g + len(t) for g, t in w["turns"])) // BS)
               for w in work) + 2 + slack


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10**6), n=st.integers(2, 6), slack=st.integers(0, 6),
       host=st.booleans(), scheduler=st.sampled_from(["mlfq", "fcfs"]))
def test_random_agent_workloads_on_tiny_pools_never_stall(seed, n, slack, host, scheduler):
    work = make_work(seed, n)
    expected = reference(seed, n)
    with Engine("tiny", block_size=BS, kv_blocks=pool_for(work, slack),
                host_blocks=512 if host else 0, scheduler=scheduler, deterministic=True) as e:
        got = run_work(e, work, step_bound=4 * total_tokens(work) + 64)
        assert got == expected
        for p in e.kernel.procs.values():
            assert p.state in (ProcState.SLEEPING, ProcState.SWAPPED)
        e.check()


def test_a_deliberate_stall_is_caught(monkeypatch):
    """A scheduler that never seats the session created second: its call never completes,
    and the check says so (the loop spins without running anything, or runs others)."""
    real = kernel_core.form_batch
    victim: list[str] = []

    def forgetful(policy, memory, max_tokens, max_seqs):
        chunks, blocked = real(policy, memory, max_tokens, max_seqs)
        if len(memory.procs) >= 2 and not victim:
            victim.append(list(memory.procs)[1])
        kept = [c for c in chunks if c.proc.pid not in victim]
        for c in chunks:
            if c.proc.pid in victim:
                c.proc.state = ProcState.RUNNABLE
        return kept, blocked

    monkeypatch.setattr(kernel_core, "form_batch", forgetful)
    work = make_work(7, 3)
    with Engine("tiny", block_size=BS, kv_blocks=pool_for(work, 4), host_blocks=512) as e:
        with pytest.raises(Stalled):
            run_work(e, work, step_bound=4 * total_tokens(work) + 64)
        e.kernel.call(e.kernel.sys_abort_all).result()


def test_pages_mapped_from_the_prefix_cache_stay_visible_to_eviction():
    """A dropped session that maps its old pages back from the prefix cache holds device
    pages before it is admitted; if it is then blocked on memory, those pages must still
    be eviction victims, or a full pool waits on them forever (a generate failed with
    "out of KV blocks" on a pool where every session fits alone)."""
    from agentos.bench.simulate import SimBench, _sim_kernel

    k, _ = _sim_kernel(SimBench(kv_blocks=16, host_blocks=0), "mlfq")
    pid = k.sys_create(list(range(3, 3 + 8 * BS)), 0, "default")
    while k.policy.has_work():
        k.step()
    p, mem = k.procs[pid], k.memory
    assert p.num_cached == 8 * BS and p.table.num_blocks == 8
    mem.begin_step()
    mem._evict(p)  # dropped (no host tier): its pages stay in the prefix cache
    assert p.num_cached == 0 and p.table.num_blocks == 0
    mem.begin_step()
    assert p not in mem._victim_list()  # nothing of it on the device
    mem.begin_step()
    assert mem.match_prefix(p)  # maps them back, not yet admitted
    assert p.table.num_blocks == 8
    assert p in mem._victim_list()
