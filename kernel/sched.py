"""Scheduling: which processes run in the next step, and how many tokens each.

A policy orders the runnable processes; `form_batch` walks that order and fills one
step under a token budget and a batch-size cap, mixing single-token decodes and chunked
prefills. Memory is checked through `MemoryView` before anything is committed, so the
scheduler never sees blocks, only counts.
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
    def reserve(self, proc: Process, start: int, end: int) -> bool:
        """Makes [start, end) writable for proc; False (changing nothing) if out of blocks."""


class Policy(Protocol):
    """Orders runnable processes. Implementations hold no blocks and touch no tensors."""

    name: str

    def add(self, proc: Process) -> None: ...

    def remove(self, proc: Process) -> None: ...

    def order(self) -> Iterable[Process]: ...

    def has_work(self) -> bool: ...

    def __contains__(self, proc: Process) -> bool: ...

    def on_step(self, chunks: list[Chunk]) -> None: ...


class FCFS:
    """First come, first served: processes run in the order they became runnable."""

    name = "fcfs"

    def __init__(self):
        self._queue: dict[str, Process] = {}  # insertion-ordered

    def add(self, proc: Process) -> None:
        self._queue.pop(proc.pid, None)
        self._queue[proc.pid] = proc

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


def form_batch(policy: Policy, memory: MemoryView, max_tokens: int, max_seqs: int) -> tuple[
        list[Chunk], list[Process]]:
    """Picks the next step's chunks. Returns (chunks, processes blocked on memory).

    Decodes are taken before prefill chunks of the same walk so one long prompt cannot
    starve many waiting decodes; prefills are chunked to the remaining budget.
    """
    decodes: list[Chunk] = []
    prefills: list[Chunk] = []
    blocked: list[Process] = []
    budget = max_tokens
    candidates = [p for p in policy.order() if p.has_work()]
    # decodes first: one token each
    for p in candidates:
        if len(decodes) >= max_seqs or budget == 0:
            break
        if p.prefill_target() - p.num_cached == 1 and p.call is not None:
            if memory.reserve(p, p.num_cached, p.num_cached + 1):
                decodes.append(Chunk(p, p.num_cached, p.num_cached + 1, sample=True))
                budget -= 1
            else:
                blocked.append(p)
    for p in candidates:
        if len(decodes) + len(prefills) >= max_seqs or budget == 0:
            break
        if p.prefill_target() - p.num_cached == 1 and p.call is not None:
            continue
        end = min(p.prefill_target(), p.num_cached + budget)
        if memory.reserve(p, p.num_cached, end):
            sample = end == p.num_tokens and p.call is not None
            prefills.append(Chunk(p, p.num_cached, end, sample))
            budget -= end - p.num_cached
        else:
            blocked.append(p)
    for c in decodes + prefills:
        c.proc.state = ProcState.RUNNING
    return decodes + prefills, blocked
