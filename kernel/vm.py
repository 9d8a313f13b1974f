"""Virtual memory: page tables over the page allocator, fork and copy-on-write.

A page table maps a session's token positions to physical blocks: position p lives in
block `ids[p // block_size]` at offset `p % block_size`. Fork copies the table and adds a
reference to every block; no KV byte moves. A write into a block that another table also
maps copies that block first (copy-on-write). Only the partial tail block of a session is
ever written, so a fork costs at most one block copy per child, and only when it writes.
"""

from __future__ import annotations

import numpy as np

from agentos.kernel.kalloc import DEVICE, BlockAllocator


class PageTable:
    """A growable array of block ids (numpy-backed, so fork and free are vectorised)."""

    __slots__ = ("_ids", "num_blocks")

    def __init__(self, ids: np.ndarray | None = None):
        self._ids = np.zeros(8, dtype=np.int64) if ids is None else ids
        self.num_blocks = 0 if ids is None else len(ids)

    @property
    def block_ids(self) -> np.ndarray:
        """A view of the mapped block ids, head first."""
        return self._ids[: self.num_blocks]

    def copy(self) -> PageTable:
        return PageTable(self.block_ids.copy())

    def push(self, block_ids: list[int]) -> None:
        need = self.num_blocks + len(block_ids)
        if need > len(self._ids):
            grown = np.zeros(max(need, 2 * len(self._ids)), dtype=np.int64)
            grown[: self.num_blocks] = self.block_ids
            self._ids = grown
        self._ids[self.num_blocks : need] = block_ids
        self.num_blocks = need

    def pop_to(self, num_blocks: int) -> np.ndarray:
        """Unmaps the blocks past num_blocks; returns their ids (caller drops the refs)."""
        dropped = self._ids[num_blocks : self.num_blocks].copy()
        self.num_blocks = min(self.num_blocks, num_blocks)
        return dropped

    def __len__(self) -> int:
        return self.num_blocks


class VM:
    """Page-table operations over one tier's allocator. Plain Python over ids.

    Every operation either succeeds or changes nothing (check, then change).
    """

    def __init__(self, allocator: BlockAllocator, block_size: int):
        self.kalloc = allocator
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fork(self, table: PageTable) -> PageTable:
        """Returns a new table mapping the same blocks (each gains a reference)."""
        child = table.copy()
        self.kalloc.incref(child.block_ids)
        return child

    def remap(self, table: PageTable, source: PageTable) -> None:
        """Makes table map exactly the blocks of source (rollback).

        Only the entries past their common prefix change hands, so rolling back to a recent
        snapshot touches a few reference counts whatever the session's length.
        """
        old, new = table.block_ids, source.block_ids
        m = min(len(old), len(new))
        differ = np.flatnonzero(old[:m] != new[:m])
        k = int(differ[0]) if len(differ) else m
        self.kalloc.incref(new[k:])  # take the new references before dropping the old
        self.kalloc.decref(old[k:].copy())
        table.pop_to(k)
        table.push(new[k:])

    def free(self, table: PageTable) -> int:
        """Unmaps every block of the table; returns how many blocks became free."""
        freed = self.kalloc.decref(table.block_ids)
        table.pop_to(0)
        return freed

    def truncate(self, table: PageTable, num_tokens: int) -> None:
        """Unmaps blocks that hold no position below num_tokens."""
        keep = self.blocks_for(num_tokens)
        if keep < table.num_blocks:
            self.kalloc.decref(table.pop_to(keep))

    def nonresident(self, table: PageTable) -> np.ndarray:
        """The table's pages that are not on the device tier (to swap in before it runs)."""
        ids = table.block_ids
        if not self.kalloc.host.num_used:  # nothing is swapped out
            return ids[:0]
        return ids[self.kalloc.tier[ids] != DEVICE]

    def blocks_needed(self, table: PageTable, start: int, end: int) -> int:
        """Device pages that running the table over [start, end) would take: its pages on
        the host, new pages past its end and copies of shared pages in the range. Changes
        nothing."""
        need = len(self.nonresident(table))
        if end <= start:
            return need
        first = start // self.block_size
        new = max(0, self.blocks_for(end) - table.num_blocks)
        mapped = table.block_ids[first : min(table.num_blocks, self.blocks_for(end))]
        copied = sum(1 for page in mapped.tolist() if self._copied_on_write(page))
        return need + new + copied

    def _copied_on_write(self, page: int) -> bool:
        """Whether writing into the page takes a copy: it is shared, or it is the prefix
        cache's copy of its tokens (which must not change under its digest)."""
        return bool(self.kalloc.refcount[page] > 1) or page in self.kalloc.digest

    def prepare_write(self, table: PageTable, start: int, end: int) -> list[tuple[int, int]] | None:
        """Makes positions [start, end) writable by this table alone. Its pages must be on
        the device.

        Allocates missing pages and replaces shared ones, and the prefix cache's own, with
        private copies (a cached page never changes under its digest). Returns the (src, dst) page
        copies the caller must perform before writing, or None when there are not enough
        free pages (then nothing changed).
        """
        need = self.blocks_needed(table, start, end)
        if not self.kalloc.can_alloc(need):
            return None
        copies: list[tuple[int, int]] = []
        if end > start:
            ids = table.block_ids
            last_mapped = min(table.num_blocks, self.blocks_for(end))
            for i in range(start // self.block_size, last_mapped):
                src = int(ids[i])
                if self._copied_on_write(src):
                    (dst,) = self.kalloc.alloc(1)
                    self.kalloc.decref([src])
                    ids[i] = dst
                    copies.append((src, dst))
            missing = self.blocks_for(end) - table.num_blocks
            if missing > 0:
                table.push(self.kalloc.alloc(missing))
        return copies

    def check(self, tables: list[PageTable]) -> None:
        """Asserts the invariants: each page's count equals the number of tables mapping
        it, and both tiers' free lists agree with the pages that hold slots."""
        mapped = np.zeros(len(self.kalloc.refcount), dtype=np.int64)
        for t in tables:
            np.add.at(mapped, t.block_ids, 1)
        self.kalloc.check(mapped)
