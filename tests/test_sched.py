"""The scheduler as plain Python over processes: policies, batch formation, victims.

No model and no tensors: processes carry token ids only, and memory is a fake that
grants or refuses blocks by count.
"""

from array import array
from concurrent.futures import Future

import pytest

from agentos.kernel.process import GenerateCall, Process, ProcState
from agentos.kernel.sampling_params import SamplingParams
from agentos.kernel.sched import FCFS, MLFQ, Chunk, form_batch, make_policy
from agentos.kernel.vm import PageTable


def proc(pid: str, num_tokens: int, cached: int = 0, generating: bool = True, level: int = 0,
         last_active: float = 0.0) -> Process:
    p = Process(pid=pid, token_ids=array("i", [1] * num_tokens), mask=array("b", bytes(num_tokens)),
                table=PageTable(), rng=None, num_cached=cached, level=level,
                last_active=last_active)
    if generating:
        p.call = GenerateCall(params=SamplingParams(), future=Future(), stop_ids=frozenset(),
                              detok=None)
    return p


def decoding(pid: str, **kw) -> Process:
    """A process in the middle of a generate call: one token to compute."""
    return proc(pid, 10, cached=9, **kw)


class Memory:
    """Grants every request while `free` tokens last; records what was asked."""

    def __init__(self, free: int = 10**9, refuse: tuple[str, ...] = (), resident=()):
        self.free = free
        self.refuse = set(refuse)
        self.resident = list(resident)  # what residents() returns
        self.reserved: list[tuple[str, int, int]] = []

    def match_prefix(self, p):
        return True

    def reserve(self, p, start, end):
        if p.pid in self.refuse or end - start > self.free:
            return False
        self.free -= end - start
        self.reserved.append((p.pid, start, end))
        return True

    def residents(self):
        return self.resident


def pids(chunks):
    return [c.proc.pid for c in chunks]


# -- FCFS -------------------------------------------------------------------------------

def test_fcfs_runs_in_arrival_order_and_keeps_place_on_readd():
    f = FCFS()
    a, b, c = decoding("a"), decoding("b"), decoding("c")
    for p in (a, b, c):
        f.add(p)
    f.add(a)  # new work for a queued process does not move it
    assert [p.pid for p in f.order()] == ["a", "b", "c"]
    chunks, _ = form_batch(f, Memory(), max_tokens=100, max_seqs=2)
    assert pids(chunks) == ["a", "b"]
    assert all(p.state is ProcState.RUNNING for p in (a, b)) and c.state is not ProcState.RUNNING


# -- MLFQ -------------------------------------------------------------------------------

def test_mlfq_skip_join_picks_the_first_level_from_the_prefill_cost():
    m = MLFQ(levels=4, quantum=8, growth=2, prefill_weight=1 / 4)  # quanta 8, 16, 32, 64
    short, medium, huge = proc("s", 20), proc("m", 40), proc("h", 10_000)
    for p in (short, medium, huge):
        m.add(p)
    assert (short.level, medium.level, huge.level) == (0, 1, 3)  # costs 5, 10, 2500
    assert [p.pid for p in m.order()] == ["s", "m", "h"]


def test_mlfq_demotes_after_the_quantum_and_new_work_reenters_at_the_top():
    m = MLFQ(levels=3, quantum=2, growth=2, boost_steps=10**6)  # quanta 2, 4, 8
    long_job = decoding("long")
    m.add(long_job)
    mem = Memory()
    for _ in range(2):  # two decode tokens spend level 0's quantum
        chunks, _ = form_batch(m, mem, 100, 8)
        m.on_step(chunks)
    assert long_job.level == 1
    for _ in range(4):
        m.on_step(form_batch(m, mem, 100, 8)[0])
    assert long_job.level == 2
    # an interactive turn arrives: it runs before the demoted job
    turn = decoding("turn")
    m.add(turn)
    assert turn.level == 0
    chunks, _ = form_batch(m, mem, 100, max_seqs=1)
    assert pids(chunks) == ["turn"]
    # the long job sleeps (its call ended) and comes back with new work: top again
    m.remove(long_job)
    m.add(long_job)
    assert long_job.level == 0


def test_mlfq_round_robin_at_the_last_level():
    m = MLFQ(levels=1, quantum=1, boost_steps=10**6)
    a, b = decoding("a"), decoding("b")
    m.add(a)
    m.add(b)
    order = []
    for _ in range(4):
        chunks, _ = form_batch(m, Memory(), 100, max_seqs=1)
        order += pids(chunks)
        m.on_step(chunks)
    assert order == ["a", "b", "a", "b"]


def test_mlfq_boost_lifts_only_the_starved():
    m = MLFQ(levels=3, quantum=1, growth=1, boost_steps=4)
    a, b = decoding("a"), decoding("b")
    m.add(a)
    m.add(b)

    def ran(*procs):
        m.on_step([Chunk(p, 9, 10, sample=True) for p in procs])

    ran(a, b)  # both spend level 0's quantum
    assert (a.level, b.level) == (1, 1)
    ran(a)
    ran(a)
    ran(a)  # the fourth step boosts: b has not run for 4 steps, a ran just now
    assert (a.level, b.level) == (2, 0)
    assert [p.pid for p in m.order()] == ["b", "a"]


def test_mlfq_no_starvation_under_a_stream_of_short_turns():
    """A demoted long job keeps getting seats: a boost lifts it whenever it has waited
    `boost_steps` steps without running, so it never waits much more than twice that."""
    m = MLFQ(levels=3, quantum=1, boost_steps=20)
    long_job = decoding("long")
    m.add(long_job)
    runs = []
    for step in range(400):
        turn = decoding(f"t{step}")
        m.add(turn)  # a new short turn every step, always at the top
        chunks, _ = form_batch(m, Memory(), 100, max_seqs=1)
        m.on_step(chunks)
        for c in chunks:
            if c.proc is not long_job:
                m.remove(c.proc)  # a short turn finishes in one step
        if "long" in pids(chunks):
            runs.append(step)
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert len(runs) >= 400 // 40 - 1 and max(gaps) <= 2 * 20 + 1


def test_policy_names():
    assert make_policy("mlfq").name == "mlfq" and make_policy("fcfs").name == "fcfs"
    with pytest.raises(ValueError):
        make_policy("lottery")


# -- batch formation --------------------------------------------------------------------

def test_decodes_are_owed_tokens_before_prefills_take_the_budget():
    f = FCFS()
    prompt = proc("prompt", 1000)  # first in line, wants 1000 prefill tokens
    decs = [decoding(f"d{i}") for i in range(3)]
    for p in (prompt, *decs):
        f.add(p)
    chunks, _ = form_batch(f, Memory(), max_tokens=64, max_seqs=8)
    assert pids(chunks) == ["d0", "d1", "d2", "prompt"]  # decodes first in the step
    assert chunks[-1].num_tokens == 61 and not chunks[-1].sample
    assert sum(c.num_tokens for c in chunks) == 64


def test_seats_follow_priority_and_blocked_memory_is_reported():
    f = FCFS()
    a, b, c = decoding("a"), decoding("b"), decoding("c")
    for p in (a, b, c):
        f.add(p)
    chunks, blocked = form_batch(f, Memory(refuse=("a",), resident=(b, c)), max_tokens=100,
                                 max_seqs=2)
    assert pids(chunks) == ["b", "c"] and blocked == [a]
    assert a.state is not ProcState.RUNNING
    # once one is blocked, only sessions holding their pages may run behind it: the
    # others would take the memory it waits for
    for p in (a, b, c):
        p.state = ProcState.RUNNABLE
    chunks, blocked = form_batch(f, Memory(refuse=("a",), resident=(c,)), max_tokens=100,
                                 max_seqs=2)
    assert pids(chunks) == ["c"] and blocked == [a]


def test_prefill_chunks_resume_where_they_left_off_and_sample_at_the_end():
    f = FCFS()
    p = proc("p", 100)
    f.add(p)
    mem = Memory()
    ends = []
    while p.has_work():
        chunks, _ = form_batch(f, mem, max_tokens=40, max_seqs=4)
        (c,) = chunks
        ends.append((c.start, c.end, c.sample))
        p.num_cached = c.end
    assert ends == [(0, 40, False), (40, 80, False), (80, 100, True)]


def test_idle_process_without_a_call_leaves_a_sampled_last_token_uncached():
    p = proc("p", 10, cached=0, generating=False)
    assert p.prefill_target() == 10  # given tokens (a prompt) are cached eagerly
    p.mask[-1] = 1  # the last token was sampled: its KV waits for the next call
    assert p.prefill_target() == 9
