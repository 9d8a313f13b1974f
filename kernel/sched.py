"""Scheduling: which processes run in the next step, and how many tokens each.

A policy orders the runnable processes (FCFS, or MLFQ over sessions); `form_batch` walks
that order and fills one step under a token budget and a batch-size cap, mixing
single-token decodes and chunked prefills. Memory is asked for through `MemoryView`
(which swaps and evicts as needed), so the scheduler never sees blocks; `victim_order`
says whose pages leave the device first when it runs short. Plain Python over processes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agentos.kernel.process import Process, ProcState


@dataclass(slots=True)
class Chunk:
    """One process's share of a step: positions [start, end) of its tokens."""

    proc: Process
    start: int
    end: int
    sample: bool  # the chunk reaches the last token and a generate call waits for it

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class MemoryView(Protocol):
    def match_prefix(self, proc: Process) -> bool:
        """Maps cached pages for proc's next full blocks of tokens (advancing num_cached).
        False: its next block is being computed by another chunk of this step; wait."""

    def reserve(self, proc: Process, start: int, end: int) -> bool:
        """Makes [start, end) writable for proc, swapping its pages in and the pages of
        idle or lower-priority processes out as needed; False (changing nothing of proc's)
        if the memory cannot be had."""

    def residents(self) -> Iterable[Process]:
        """Queued processes whose pages are (or may be) on the device, in priority order:
        the ones that may still run once a higher-priority process is blocked on memory."""


class Policy(Protocol):
    """Orders runnable processes. Implementations hold no blocks and touch no tensors.

    Every method costs O(1) or O(what it returns) in the number of queued processes: a
    step's decisions must not grow with the number of sessions."""

    name: str

    def add(self, proc: Process) -> None:
        """Queues proc; a proc already queued keeps its place."""

    def remove(self, proc: Process) -> None: ...

    def order(self) -> Iterator[Process]:
        """Queued processes, highest priority first (lazily: callers stop early)."""

    def rank(self, proc: Process) -> tuple[int, int]:
        """A queued proc's priority as a sort key: smaller runs first. Total and stable
        between steps, so two processes never preempt each other in turn."""

    def has_work(self) -> bool: ...

    def __contains__(self, proc: Process) -> bool: ...

    def on_step(self, chunks: list[Chunk]) -> None:
        """Accounts a finished step's chunks (quanta, rotation)."""

    def charge(self, proc: Process, cost: float) -> None:
        """Adds cost (in decode tokens) to proc's use of its quantum: what its swap-in cost."""


class FCFS:
    """First come, first served: processes run in the order their work arrived."""

    name = "fcfs"

    def __init__(self):
        self._queue: dict[str, Process] = {}  # insertion-ordered
        self._seq: dict[str, int] = {}
        self._next = itertools.count()

    def add(self, proc: Process) -> None:
        if proc.pid not in self._queue:
            self._queue[proc.pid] = proc
            self._seq[proc.pid] = next(self._next)

    def remove(self, proc: Process) -> None:
        if self._queue.pop(proc.pid, None) is not None:
            del self._seq[proc.pid]

    def order(self) -> Iterator[Process]:
        return iter(self._queue.values())

    def rank(self, proc: Process) -> tuple[int, int]:
        return (0, self._seq[proc.pid])

    def has_work(self) -> bool:
        return bool(self._queue)

    def __contains__(self, proc: Process) -> bool:
        return proc.pid in self._queue

    def on_step(self, chunks: list[Chunk]) -> None:
        pass

    def charge(self, proc: Process, cost: float) -> None:
        pass


class MLFQ:
    """Multi-level feedback queue over sessions, with quanta measured in tokens.

    Level 0 is the highest priority; level i's quantum is `quantum * growth**i` tokens
    (the last level's is spent only to rotate). A process arriving with new work (a
    create, or a generate after sleeping on a tool call) joins the first level whose
    quantum covers its prefill cost (skip-join: a long prompt does not take the top level
    only to be demoted at once). A process that spends its quantum is demoted and goes to
    the back of the next level (round robin at the last). A process that has not run for
    `boost_steps` steps is boosted: it goes ahead of level 0 (a queue served first) with
    level 0's quantum, so none waits much more than `boost_steps` steps however many short
    turns arrive. (NOTE: with the quantum of the level it had reached, a boosted long
    answer ran hundreds of tokens ahead of every short turn, and the memory-bound mean
    latency fell to FCFS's.) Only those are boosted: boosting everyone would put every
    long job ahead of the next short turns at once, which is the head-of-line blocking
    MLFQ exists to avoid.

    Cost of a chunk: decode tokens count 1 each, prefill tokens `prefill_weight` each (a
    prefill token costs a fraction of a decode step's time); what a swap-in cost is
    charged too (`charge`).
    """

    name = "mlfq"

    def __init__(self, levels: int = 5, quantum: int = 32, growth: int = 2,
                 boost_steps: int = 256, prefill_weight: float = 1 / 16):
        if levels < 1 or quantum < 1 or growth < 1 or boost_steps < 1 or prefill_weight < 0:
            raise ValueError("bad MLFQ parameters")
        self.quanta = [quantum * growth**i for i in range(levels)]
        self.boost_steps = boost_steps
        self.prefill_weight = prefill_weight
        self._levels: list[dict[str, Process]] = [{} for _ in range(levels)]
        self._front: dict[str, Process] = {}  # boosted processes, served before level 0
        self._queue: dict[str, dict[str, Process]] = {}  # pid -> the queue that holds it
        self._used: dict[str, float] = {}  # tokens spent at the current level
        self._seq: dict[str, int] = {}  # order of entry into its level
        self._next = itertools.count()
        # queued pids by the step they last ran (or were queued), oldest first: boosting
        # looks at the head only
        self._ran: OrderedDict[str, int] = OrderedDict()
        self._steps = 0

    def skip_join_level(self, prefill_tokens: int) -> int:
        cost = prefill_tokens * self.prefill_weight
        for i, q in enumerate(self.quanta):
            if cost < q:
                return i
        return len(self.quanta) - 1

    def add(self, proc: Process) -> None:
        if proc.pid in self._used:
            return
        self._place(proc, self.skip_join_level(proc.num_tokens - proc.num_cached))
        self._ran[proc.pid] = self._steps

    def _place(self, proc: Process, level: int, front: bool = False) -> None:
        """Puts proc at the back of `level` (or of the boosted queue) with a fresh quantum."""
        queue = self._front if front else self._levels[level]
        proc.level = level
        queue[proc.pid] = proc
        self._queue[proc.pid] = queue
        self._seq[proc.pid] = next(self._next)
        self._used[proc.pid] = 0.0

    def _unplace(self, proc: Process) -> None:
        del self._queue.pop(proc.pid)[proc.pid]

    def remove(self, proc: Process) -> None:
        if self._used.pop(proc.pid, None) is not None:
            self._unplace(proc)
            del self._ran[proc.pid]
            del self._seq[proc.pid]

    def order(self) -> Iterator[Process]:
        # NOTE: no copies: callers stop early, and nothing changes the queue while a step
        # is formed (charges and demotions are applied after it)
        yield from self._front.values()
        for level in self._levels:
            yield from level.values()

    def rank(self, proc: Process) -> tuple[int, int]:
        front = self._queue[proc.pid] is self._front
        return (-1 if front else proc.level, self._seq[proc.pid])

    def has_work(self) -> bool:
        return bool(self._used)

    def __contains__(self, proc: Process) -> bool:
        return proc.pid in self._used

    def on_step(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            p = c.proc
            if p.pid not in self._used:  # finished in this step
                continue
            self._ran[p.pid] = self._steps
            self._ran.move_to_end(p.pid)
            self.charge(p, c.num_tokens if c.num_tokens == 1 else c.num_tokens * self.prefill_weight)
        self._steps += 1
        self.boost()

    def charge(self, proc: Process, cost: float) -> None:
        if proc.pid not in self._used:
            return
        used = self._used[proc.pid] + cost
        if used >= self.quanta[proc.level]:
            self._unplace(proc)
            self._place(proc, min(proc.level + 1, len(self.quanta) - 1))  # back of the next level
        else:
            self._used[proc.pid] = used

    def boost(self) -> None:
        """Moves the processes that waited `boost_steps` steps without running to the back
        of the boosted queue, longest waiting first."""
        while self._ran:
            pid, ran = next(iter(self._ran.items()))
            if self._steps - ran < self.boost_steps:
                break
            p = self._queue[pid][pid]
            self._unplace(p)
            self._place(p, 0, front=True)
            self._ran[pid] = self._steps
            self._ran.move_to_end(pid)



def make_policy(name: str) -> Policy:
    if name == "mlfq":
        return MLFQ()
    if name == "fcfs":
        return FCFS()
    raise ValueError(f"unknown scheduler {name!r} (mlfq or fcfs)")


def _is_decode(p: Process) -> bool:
    return p.call is not None and p.num_tokens - p.num_cached == 1


def form_batch(policy: Policy, memory: MemoryView, max_tokens: int, max_seqs: int) -> tuple[
        list[Chunk], list[Process]]:
    """Picks the next step's chunks. Returns (chunks, processes blocked on memory).

    Admission goes in the policy's order, and memory follows it: a process may take the
    pages of idle processes and of lower-priority ones (`memory.reserve`), never of those
    ahead of it. Once one is blocked on memory, only processes already holding their pages
    (`memory.residents`) are considered further, so the walk stops early whatever the
    number of queued sessions, and no process behind a blocked one takes the memory it
    waits for. Every decode (one token) among the first `max_seqs` queued is counted before
    any prefill takes tokens, so a long prompt cannot starve the decodes of the same step;
    prefills are chunked to what remains of the budget.
    """
    owed: int | None = None  # tokens kept for decodes, counted when a prefill needs to know
    decodes: list[Chunk] = []
    prefills: list[Chunk] = []
    blocked: list[Process] = []
    seen: set[str] = set()
    budget = max_tokens

    def admit(p: Process) -> None:
        nonlocal owed, budget
        seen.add(p.pid)
        if not p.has_work():
            return
        if _is_decode(p):
            if owed is not None:
                owed -= 1
            if memory.reserve(p, p.num_cached, p.num_cached + 1):
                decodes.append(Chunk(p, p.num_cached, p.num_cached + 1, sample=True))
                budget -= 1
            else:
                blocked.append(p)
            return
        if not memory.match_prefix(p) or not p.has_work():
            return  # waits for pages another chunk computes now; or fully cached
        if _is_decode(p):  # the prefix cache held all but its last token
            n = 1
        else:
            n = p.prefill_target() - p.num_cached
            if owed is None and n + max_seqs > budget:  # decodes behind may want the tokens
                owed = sum(1 for q in itertools.islice(policy.order(), max_seqs)
                           if q.pid not in seen and _is_decode(q))
            n = min(n, budget - max(owed or 0, 0))
        if n <= 0:
            return
        end = p.num_cached + n
        if memory.reserve(p, p.num_cached, end):
            sample = end == p.num_tokens and p.call is not None
            prefills.append(Chunk(p, p.num_cached, end, sample))
            budget -= n
        else:
            blocked.append(p)

    def full() -> bool:
        return len(decodes) + len(prefills) >= max_seqs or budget <= 0

    for p in policy.order():
        if full() or blocked:
            break
        admit(p)
    if blocked:
        for p in memory.residents():
            if full():
                break
            if p.pid not in seen:
                admit(p)
    for c in decodes + prefills:
        c.proc.set_state(ProcState.RUNNING)
    return decodes + prefills, blocked
