"""Scheduling: which processes run in the next step, and how many tokens each.

A policy orders the runnable processes (FCFS, or MLFQ over sessions); `form_batch` walks
that order and fills one step under a token budget and a batch-size cap, mixing
single-token decodes and chunked prefills. Memory is asked for through `MemoryView`
(which swaps and evicts as needed), so the scheduler never sees blocks; `victim_order`
says whose pages leave the device first when it runs short. Plain Python over processes.
"""

from __future__ import annotations

from collections.abc import Iterable
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
        """Makes [start, end) writable for proc, swapping its pages in and others out as
        needed; False (changing nothing of proc's) if the memory cannot be had."""


class Policy(Protocol):
    """Orders runnable processes. Implementations hold no blocks and touch no tensors."""

    name: str

    def add(self, proc: Process) -> None:
        """Queues proc; a proc already queued keeps its place."""

    def remove(self, proc: Process) -> None: ...

    def order(self) -> Iterable[Process]: ...

    def has_work(self) -> bool: ...

    def __contains__(self, proc: Process) -> bool: ...

    def on_step(self, chunks: list[Chunk]) -> None:
        """Accounts a finished step's chunks (quanta, rotation)."""


class FCFS:
    """First come, first served: processes run in the order their work arrived."""

    name = "fcfs"

    def __init__(self):
        self._queue: dict[str, Process] = {}  # insertion-ordered

    def add(self, proc: Process) -> None:
        self._queue.setdefault(proc.pid, proc)

    def remove(self, proc: Process) -> None:
        self._queue.pop(proc.pid, None)

    def order(self) -> Iterable[Process]:
        return list(self._queue.values())

    def has_work(self) -> bool:
        return bool(self._queue)

    def __contains__(self, proc: Process) -> bool:
        return proc.pid in self._queue

    def on_step(self, chunks: list[Chunk]) -> None:
        pass


class MLFQ:
    """Multi-level feedback queue over sessions, with quanta measured in tokens.

    Level 0 is the highest priority; level i's quantum is `quantum * growth**i` tokens
    (the last level's is spent only to rotate). A process arriving with new work (a
    create, or a generate after sleeping on a tool call) joins the first level whose
    quantum covers its prefill cost (skip-join: a long prompt does not take the top level
    only to be demoted at once). A process that spends its quantum is demoted and goes to
    the back of the next level (round robin at the last). Every `boost_steps` steps, the
    processes that have not run for that long return to level 0, so none starves. (Only
    those: boosting everyone would put every long job ahead of the next short turns at
    once, which is the head-of-line blocking MLFQ exists to avoid.)

    Cost of a chunk: decode tokens count 1 each, prefill tokens `prefill_weight` each (a
    prefill token costs a fraction of a decode step's time).
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
        self._used: dict[str, float] = {}  # tokens spent at the current level
        self._ran: dict[str, int] = {}  # step a process last ran (or was queued)
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
        proc.level = self.skip_join_level(proc.num_tokens - proc.num_cached)
        self._levels[proc.level][proc.pid] = proc
        self._used[proc.pid] = 0.0
        self._ran[proc.pid] = self._steps

    def remove(self, proc: Process) -> None:
        if self._used.pop(proc.pid, None) is not None:
            del self._levels[proc.level][proc.pid]
            del self._ran[proc.pid]

    def order(self) -> Iterable[Process]:
        return [p for level in self._levels for p in level.values()]

    def has_work(self) -> bool:
        return bool(self._used)

    def __contains__(self, proc: Process) -> bool:
        return proc.pid in self._used

    def on_step(self, chunks: list[Chunk]) -> None:
        last = len(self.quanta) - 1
        for c in chunks:
            p = c.proc
            if p.pid not in self._used:  # finished in this step
                continue
            self._ran[p.pid] = self._steps
            cost = c.num_tokens if c.num_tokens == 1 else c.num_tokens * self.prefill_weight
            used = self._used[p.pid] + cost
            if used >= self.quanta[p.level]:
                del self._levels[p.level][p.pid]
                p.level = min(p.level + 1, last)
                self._levels[p.level][p.pid] = p  # back of the (next) level
                used = 0.0
            self._used[p.pid] = used
        self._steps += 1
        if self._steps % self.boost_steps == 0:
            self.boost()

    def boost(self) -> None:
        """Moves the processes that waited `boost_steps` steps without running to the back
        of the top level, in their priority order."""
        starved = [p for p in self.order() if self._steps - self._ran[p.pid] >= self.boost_steps]
        for p in starved:
            del self._levels[p.level][p.pid]
            p.level = 0
            self._levels[0][p.pid] = p
            self._used[p.pid] = 0.0
            self._ran[p.pid] = self._steps


def make_policy(name: str) -> Policy:
    if name == "mlfq":
        return MLFQ()
    if name == "fcfs":
        return FCFS()
    raise ValueError(f"unknown scheduler {name!r} (mlfq or fcfs)")


def victim_order(procs: Iterable[Process]) -> list[Process]:
    """Processes in the order their pages should leave the device: idle ones before those
    with queued work, then the lowest priority (highest level), then the longest idle."""
    return sorted(procs, key=lambda p: (p.has_work(), -p.level, p.last_active))


def _is_decode(p: Process) -> bool:
    return p.call is not None and p.num_tokens - p.num_cached == 1


def form_batch(policy: Policy, memory: MemoryView, max_tokens: int, max_seqs: int) -> tuple[
        list[Chunk], list[Process]]:
    """Picks the next step's chunks. Returns (chunks, processes blocked on memory).

    Seats go in the policy's order. Every decode (one token) that will get a seat is
    counted before any prefill takes tokens, so a long prompt cannot starve the decodes
    of the same step; prefills are chunked to what remains of the budget.
    """
    candidates = [p for p in policy.order() if p.has_work()]
    owed = sum(1 for p in candidates[:max_seqs] if _is_decode(p))  # tokens kept for decodes
    decodes: list[Chunk] = []
    prefills: list[Chunk] = []
    blocked: list[Process] = []
    budget = max_tokens
    for p in candidates:
        if len(decodes) + len(prefills) >= max_seqs or budget == 0:
            break
        if _is_decode(p):
            owed -= 1
            if memory.reserve(p, p.num_cached, p.num_cached + 1):
                decodes.append(Chunk(p, p.num_cached, p.num_cached + 1, sample=True))
                budget -= 1
            else:
                blocked.append(p)
            continue
        if not memory.match_prefix(p) or not p.has_work():
            continue  # waits for pages another chunk computes now; or fully cached
        if _is_decode(p):  # the prefix cache held all but its last token
            n = 1
        else:
            n = min(p.prefill_target() - p.num_cached, budget - max(owed, 0))
        if n <= 0:
            continue
        end = p.num_cached + n
        if memory.reserve(p, p.num_cached, end):
            sample = end == p.num_tokens and p.call is not None
            prefills.append(Chunk(p, p.num_cached, end, sample))
            budget -= n
        else:
            blocked.append(p)
    for c in decodes + prefills:
        c.proc.state = ProcState.RUNNING
    return decodes + prefills, blocked
