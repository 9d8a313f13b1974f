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
from typing import Any

import torch

from agentos.kernel.core import Kernel
from agentos.kernel.errors import InvalidRequestError, NotFoundError
from agentos.kernel.grammar import Constraint
from agentos.kernel.syscalls import Defer
from agentos.kernel.vm import PageTable
from agentos.snapshot.codec import Record
from agentos.snapshot.durable.journal import kv_layout, record_of, rng_from, tensor_bytes, tensor_from


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
    owner: str = "default"
    weight_runs: list[tuple[int, int]] = field(default_factory=list)
    num_generated: int = 0
    cache_scope: str | None = None  # its session's (Process.cache_scope): its pages' scope
    # its session's open constraint, at rest (grammar.Constraint: the grammar and where it
    # began; a rollback replays the tokens since into a fresh matcher)
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def info(self, kalloc) -> dict:
        host = kalloc.num_host(self.table.block_ids)
        return {"id": self.id, "session_id": self.session_id, "num_tokens": self.num_tokens,
                "device_blocks": self.table.num_blocks - host, "host_blocks": host,
                "created_at": self.created_at, "owner": self.owner}


class SnapshotTable:
    """All live snapshots of one kernel, by id. The kernel sees them through its hooks
    (`Hooks.snapshots`): under memory pressure, pages only snapshots hold go first."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.records: dict[str, SnapshotRecord] = {}
        self.journal = None  # set with the kernel's, when the engine has a store

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
            rng_state=p.rng.get_state(), kv_version=p.kv_version, owner=p.owner,
            weight_runs=p.weight_runs[:], num_generated=p.num_generated,
            cache_scope=p.cache_scope, grammar=p.grammar.at_rest() if p.grammar else None,
        )
        self.records[rec.id] = rec
        if self.journal is not None:
            self.journal.snapshotted(p, rec)
        return rec.info(k.kalloc)

    def sys_rollback(self, pid: str, snap_id: str) -> int:
        """Makes the session equal to the snapshot (tokens, masks, pages, RNG).

        The snapshot may come from any session (rolling a session onto another's state is
        allowed). Returns the session's token count.
        """
        k = self.kernel
        p = k.idle_proc(pid)
        fetched = snap_id not in self.records and self.journal is not None
        rec = self._fetch(snap_id) if fetched else self.get(snap_id)
        k.vm.remap(p.table, rec.table)
        p.token_ids = rec.token_ids[:]
        p.mask = rec.mask[:]
        p.num_cached = rec.num_cached
        p.kv_version = rec.kv_version
        p.rng.set_state(rec.rng_state)
        p.weight_runs = rec.weight_runs[:]
        p.cache_scope = rec.cache_scope  # its pages are the snapshot's now
        p.grammar = rec.grammar.at_rest() if rec.grammar else None
        k.policy.remove(p)
        k.wake(p)
        if self.journal is not None:
            self.journal.rolled_back(p, rec)
            if fetched:
                self.journal.release(snap_id)
        return p.num_tokens

    def _fetch(self, snap_id: str) -> SnapshotRecord:
        """Another worker's snapshot from the store, without KV (its tokens are prefilled
        after the rollback). Raises NotFoundError."""
        rec = self.journal.fetch_snapshot(snap_id)
        if rec is None:
            raise NotFoundError(f"no snapshot {snap_id!r}")
        k = self.kernel
        rng = rng_from(rec.rng_state, rec.rng_device, rec.draws, k.config.device, k.vocab_size)
        return SnapshotRecord(id=snap_id, session_id=rec.session_id or "", token_ids=rec.token_ids,
                              mask=rec.mask, num_cached=0, table=PageTable(), rng_state=rng.get_state(),
                              kv_version=k.weight_version, created_at=rec.created_at, owner=rec.owner,
                              weight_runs=[tuple(r) for r in rec.weight_runs],
                              num_generated=rec.num_generated,
                              grammar=k.grammars.restore(rec.grammar, rec.grammar_start))

    def sys_restore(self, snap_id: str) -> str:
        """Creates a new session equal to the snapshot; returns its id."""
        k = self.kernel
        rec = self.get(snap_id)
        rng = torch.Generator(device=k.config.device)
        rng.set_state(rec.rng_state)
        p = k.new_process(rec.token_ids[:], rec.mask[:], k.vm.fork(rec.table),
                          rec.num_cached, rng, rec.session_id, rec.kv_version, rec.owner)
        p.weight_runs = rec.weight_runs[:]
        p.cache_scope = rec.cache_scope
        p.grammar = rec.grammar.at_rest() if rec.grammar else None
        if self.journal is not None:
            self.journal.restored(rec, p)
        return p.pid

    def sys_delete(self, snap_id: str) -> None:
        """Releases the snapshot's hold on its blocks."""
        rec = self.get(snap_id)
        self.kernel.vm.free(rec.table)
        del self.records[snap_id]
        if self.journal is not None:
            self.journal.deleted(rec)

    def sys_info(self, snap_id: str) -> dict:
        return self.get(snap_id).info(self.kernel.kalloc)

    def sys_list(self, pid: str | None = None, owner: str | None = None) -> list[dict]:
        """Info of every live snapshot, or of those taken of session `pid`; only those of
        the tenant `owner` when it is given."""
        kalloc = self.kernel.kalloc
        return [r.info(kalloc) for r in self.records.values()
                if (pid is None or r.session_id == pid) and (owner is None or r.owner == owner)]

    def install(self, rec: Record, rng_state: torch.Tensor) -> None:
        """Adds a recovered snapshot (no KV: its tokens are prefilled when it is used)."""
        self.records[rec.id] = SnapshotRecord(
            id=rec.id, session_id=rec.session_id or "", token_ids=rec.token_ids, mask=rec.mask,
            num_cached=0, table=PageTable(), rng_state=rng_state,
            kv_version=self.kernel.weight_version, created_at=rec.created_at, owner=rec.owner,
            weight_runs=[tuple(r) for r in rec.weight_runs], num_generated=rec.num_generated,
            grammar=self.kernel.grammars.restore(rec.grammar, rec.grammar_start))

    def sys_export(self, pid: str, kv: bool = False) -> bytes:
        """The session as a record blob (snapshot/codec.py), with the KV bytes of its cached
        tokens when `kv` (and the pool is not asleep). Raises NotFoundError / ConflictError
        (generating)."""
        k = self.kernel
        p = k.idle_proc(pid)
        rec = record_of(p)
        if kv and p.num_cached and not k.asleep:
            blocks = k.read_kv(p.table.block_ids[: -(-p.num_cached // k.block_size)])
            rec.kv = {"layout": kv_layout(k), "num_tokens": p.num_cached, "data": tensor_bytes(blocks)}
        return rec.pack()

    def sys_import(self, rec: Record, owner: str, compiled: Any = None) -> tuple[str, bool]:
        """A new session from a record (of a session or a snapshot), owned by `owner`,
        with the record's KV when it was made by the same weights, dtype and block layout
        and there is room (else its tokens are prefilled). Returns (session id, whether
        the KV was used). Raises InvalidRequestError / ContextLengthError; changes nothing.

        Imported KV is not trusted: a session given it has a cache scope of its own, so
        its pages (and those computed over them) are shared only with its forks and
        snapshots, never mapped by another session through the prefix cache. `compiled`:
        the record's constraint compiled by the caller (else it is compiled here)."""
        k = self.kernel
        k.check_tokens(rec.token_ids.tolist())
        if not rec.token_ids:
            raise InvalidRequestError("the record holds no tokens")
        rng = rng_from(rec.rng_state, rec.rng_device, rec.draws, k.config.device, k.vocab_size)
        table, num_cached = PageTable(), 0
        kv = rec.kv
        if kv and not k.asleep and kv.get("layout") == kv_layout(k):
            n = min(int(kv["num_tokens"]), len(rec.token_ids))
            nb = -(-n // k.block_size)
            if 0 < nb <= k.kalloc.num_free:
                blocks = tensor_from(kv["data"], k.kv_dtype, [-1, *k.kv_block_shape])
                if len(blocks) >= nb:
                    table.push(k.write_kv(blocks[:nb]))
                    num_cached = n
        p = k.new_process(rec.token_ids, rec.mask, table, num_cached, rng, None, None, owner)
        p.num_generated, p.num_forks = rec.num_generated, rec.num_forks
        p.weight_runs = [tuple(r) for r in rec.weight_runs]
        p.grammar = (Constraint(rec.grammar, rec.grammar_start, compiled) if compiled is not None
                     else k.grammars.restore(rec.grammar, rec.grammar_start))
        if num_cached:
            p.cache_scope = "import:" + p.pid
            k.memory.register_full(p, 0, num_cached - num_cached % k.block_size)
        if k.journal is not None:
            k.journal.created(p)
        return p.pid, num_cached > 0

    def sys_check(self) -> None:
        """Asserts refcounts equal mapped entries of live sessions plus snapshot holds."""
        k = self.kernel
        k.vm.check(k.page_tables() + [r.table for r in self.records.values()])
