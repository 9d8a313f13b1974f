"""The kernel's links to the layers above it, given at construction: the journal it
records every change in, the snapshots whose pages its pager may swap, and the observer
it tells each step's time. The kernel imports nothing from those layers; it sees them
through these protocols. Every hook is called in the kernel's loop thread.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agentos.kernel.process import Process
    from agentos.kernel.vm import PageTable


class KernelJournal(Protocol):
    """Where the kernel records each change of a session, in the order it applies them
    (snapshot/durable/journal.py); `commit` ends a batch of changes."""

    def created(self, p: Process) -> None: ...

    def appended(self, p: Process, token_ids: list[int]) -> None: ...

    def reseeded(self, p: Process) -> None: ...

    def constrained(self, p: Process) -> None: ...

    def generated(self, p: Process, token: int, sampled: bool, version: int) -> None: ...

    def call_ended(self, p: Process, sampled: bool, undone: bool) -> None: ...

    def forked(self, p: Process, children: list[Process]) -> None: ...

    def closed(self, p: Process) -> None: ...

    def commit(self) -> None: ...


class Observer(Protocol):
    """Told each step's time and size, and how long each process waited to run (metrics)."""

    def step(self, seconds: float, num_sessions: int, num_tokens: int) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...


class KVHolder(Protocol):
    """Something other than a process that maps pages: a snapshot. The pager swaps out or
    drops its pages (setting num_cached to 0 when it drops them)."""

    table: PageTable
    num_cached: int
    created_at: float


class SnapshotSource(Protocol):
    @property
    def records(self) -> Mapping[str, KVHolder]: ...


class KernelHooks(Protocol):
    """What the kernel is given at construction. A hook may be None (no journal, no
    observer); `snapshot_records` may be empty."""

    @property
    def journal(self) -> KernelJournal | None: ...

    @property
    def observer(self) -> Observer | None: ...

    def snapshot_records(self) -> Collection[KVHolder]:
        """The live snapshots: their pages count for the pager (victims, sleep, reloads)."""
        ...


@dataclass(slots=True)
class Hooks:
    """The plain KernelHooks: links that their owner (the engine) fills in. The engine sets
    `snapshots` right after making the kernel, before any session exists, and `journal` in
    the loop thread just before recovery, so every change from then on is journaled."""

    observer: Observer | None = None
    journal: KernelJournal | None = None
    snapshots: SnapshotSource | None = None

    def snapshot_records(self) -> Collection[KVHolder]:
        return () if self.snapshots is None else self.snapshots.records.values()
