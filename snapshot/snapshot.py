"""Snapshots: immutable captures of a session, and rollback to them.

A snapshot holds a copy of the session's tokens and masks, a forked page table (so its
blocks stay alive, shared copy-on-write with the session) and the sampler's RNG state.
Rollback makes the session equal to the snapshot; restore makes a new session from it.
Both cost O(number of blocks) in metadata and move no KV bytes.

Every function here runs in the kernel's loop thread (submitted with `Kernel.call`).
"""

from __future__ import annotations

import time
import uuid
from array import array
from dataclasses import dataclass, field

import torch

from agentos.kernel.core import Defer, Kernel
from agentos.kernel.errors import NotFoundError
from agentos.kernel.kalloc import HOST
from agentos.kernel.vm import PageTable


@dataclass(slots=True, eq=False)
class SnapshotRecord:
    id: str
    session_id: str
    token_ids: array  # array("i"), a private copy
    mask: array  # array("b")
    num_cached: int  # leading tokens with KV in the table (0 once the pages were dropped)
    table: PageTable  # holds one reference on each of its pages (on either tier)
    rng_state: torch.Tensor
    kv_version: int = 0  # the weights its KV was computed with
    created_at: float = field(default_factory=time.time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def info(self, kalloc) -> dict:
        host = int((kalloc.tier[self.table.block_ids] == HOST).sum())
        return {"id": self.id, "session_id": self.session_id, "num_tokens": self.num_tokens,
                "device_blocks": self.table.num_blocks - host, "host_blocks": host,
                "created_at": self.created_at}


class SnapshotTable:
    """All live snapshots of one kernel, by id."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.records: dict[str, SnapshotRecord] = {}
        kernel.snapshots = self  # under memory pressure, pages only snapshots hold go first

    def get(self, snap_id: str) -> SnapshotRecord:
        rec = self.records.get(snap_id)
        if rec is None:
            raise NotFoundError(f"no snapshot {snap_id!r}")
        return rec

    def sys_snapshot(self, pid: str) -> dict:
        """Captures the session. Waits (Defer) for a running prefill so the snapshot holds
        its pages. Raises NotFoundError / ConflictError (generating); changes nothing then."""
        k = self.kernel
        p = k.idle_proc(pid)
        if p.has_work() and p in k.policy:
            raise Defer
        rec = SnapshotRecord(
            id="snap_" + uuid.uuid4().hex[:16], session_id=pid, token_ids=p.token_ids[:],
            mask=p.mask[:], num_cached=p.num_cached, table=k.vm.fork(p.table),
            rng_state=p.rng.get_state(), kv_version=p.kv_version,
        )
        self.records[rec.id] = rec
        return rec.info(k.kalloc)

    def sys_rollback(self, pid: str, snap_id: str) -> int:
        """Makes the session equal to the snapshot (tokens, masks, pages, RNG).

        The snapshot may come from any session (rolling a session onto another's state is
        allowed). Returns the session's token count.
        """
        k = self.kernel
        p = k.idle_proc(pid)
        rec = self.get(snap_id)
        k.vm.remap(p.table, rec.table)
        p.token_ids = rec.token_ids[:]
        p.mask = rec.mask[:]
        p.num_cached = rec.num_cached
        p.kv_version = rec.kv_version
        p.rng.set_state(rec.rng_state)
        k.policy.remove(p)
        k.wake(p)
        return p.num_tokens

    def sys_restore(self, snap_id: str) -> str:
        """Creates a new session equal to the snapshot; returns its id."""
        k = self.kernel
        rec = self.get(snap_id)
        rng = torch.Generator(device=k.config.device)
        rng.set_state(rec.rng_state)
        p = k.new_process(rec.token_ids[:], rec.mask[:], k.vm.fork(rec.table),
                          rec.num_cached, rng, rec.session_id, rec.kv_version)
        return p.pid

    def sys_delete(self, snap_id: str) -> None:
        """Releases the snapshot's hold on its blocks."""
        rec = self.get(snap_id)
        self.kernel.vm.free(rec.table)
        del self.records[snap_id]

    def sys_info(self, snap_id: str) -> dict:
        return self.get(snap_id).info(self.kernel.kalloc)

    def sys_list(self, pid: str | None = None) -> list[dict]:
        kalloc = self.kernel.kalloc
        return [r.info(kalloc) for r in self.records.values() if pid is None or r.session_id == pid]

    def sys_check(self) -> None:
        """Asserts refcounts equal mapped entries of live sessions plus snapshot holds."""
        k = self.kernel
        k.vm.check(k.page_tables() + [r.table for r in self.records.values()])
