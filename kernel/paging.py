"""Memory for the scheduler (the MemoryView it sees): mapping prefix-cache pages,
reserving the pages a chunk will write, and making room by evicting cached pages and then
swapping out or dropping victims. A part of the Kernel (a base class of it); it runs in the
loop thread while a step is formed.
"""

from __future__ import annotations

import numpy as np

from agentos.kernel.kalloc import DEVICE, ROOT_DIGEST, block_digest
from agentos.kernel.process import Process, ProcState, ScoreCall
from agentos.kernel.sched import victim_order


class Paging:
    def match_prefix(self, p: Process) -> bool:
        """Maps prefix-cache pages for p's next full blocks of tokens (see MemoryView)."""
        bs, table = self.block_size, p.table
        i = table.num_blocks
        if p.num_cached != i * bs or not self.kalloc.cached or not self.config.prefix_cache:
            return True
        prev = ROOT_DIGEST if i == 0 else self.kalloc.digest.get(int(table.block_ids[-1]))
        if prev is None:
            return True
        hits: list[int] = []
        wait = False
        tokens = p.token_ids
        # a score call needs the logits of every position from the one before its first
        # scored token, so those are computed, never taken from the cache
        end = p.call.start - 1 if isinstance(p.call, ScoreCall) else len(tokens)
        while (i + 1) * bs <= end:
            digest = block_digest(prev, tokens[i * bs : (i + 1) * bs])
            page = self.kalloc.lookup(digest)
            if page is None:
                wait = digest in self._inflight
                break
            hits.append(page)
            prev = digest
            i += 1
        if hits:
            if p.num_cached == 0:  # the cache holds pages of the current weights only
                p.kv_version = self.weight_version
            for page in hits:
                self.kalloc.revive(page)
            table.push(hits)
            cached = min(i * bs, p.num_tokens - 1 if p.call is not None else p.num_tokens)
            self.stats["prefix_hit_tokens"] += cached - p.num_cached
            p.num_cached = cached
            if not p.has_work():
                self._satisfied.append(p)
        return not wait

    def reserve(self, p: Process, start: int, end: int) -> bool:
        """Makes [start, end) of p writable with all its pages on the device (see
        MemoryView): frees room by evicting cached pages, then swapping out or dropping
        victims; swaps p's host pages in; copies shared pages it will write."""
        need = self.vm.blocks_needed(p.table, start, end)
        if need > self.kalloc.num_free:
            self._pin_batch()
            self._pin(p.table.block_ids, 1)
            # NOTE: only the first chunk of a step may evict sessions that have work
            # queued; later ones would push out sessions that need their pages back a
            # step later (thrashing), so they wait until a session sleeps
            made = self._make_room(need, evict_queued=not self._batch)
            self._pin(p.table.block_ids, -1)
            if not made:
                return False
        if need:
            host = self.vm.nonresident(p.table)
            if len(host):
                self._copy("in", self.kalloc.swap_in(host.tolist()))
                self.stats["swap_in_blocks"] += len(host)
        copies = self.vm.prepare_write(p.table, start, end)
        assert copies is not None, "room was made"
        self._batch.append(p)
        if self._pinned:
            self._pin(p.table.block_ids, 1)  # with its new pages, not the ones it copied
        if copies:
            slot = self.kalloc.slot
            self._copy("cow", [(int(slot[s]), int(slot[d])) for s, d in copies])
            self.stats["cow_copies"] += len(copies)
        if end - start > 1:  # a prefill: later prompts with the same blocks wait for these
            self._inflight.update(self._digests(p, start // self.block_size, end // self.block_size))
        return True

    def _pin_batch(self) -> None:
        """Pins the pages of the step's chunks so far (they are never victims); from now
        on until the step ends, reserve pins each new chunk's pages too."""
        if not self._pinned:
            self._pinned = True
            self._pins.fill(0)
            for q in self._batch:
                self._pin(q.table.block_ids, 1)

    def _pin(self, pages: np.ndarray, delta: int) -> None:
        self._pins[pages] += delta  # page table ids are distinct

    def _copy(self, kind: str, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        if self._copies and self._copies[-1][0] == kind:
            self._copies[-1][1].extend(pairs)
        else:
            self._copies.append((kind, pairs))

    def _make_room(self, need: int, evict_queued: bool) -> bool:
        """Frees device pages until `need` can be allocated: victims' unpinned pages are
        swapped to the host tier while it has room, then victims are dropped (their KV is
        recomputed from tokens when they next run). Sessions with queued work are victims
        only with `evict_queued`."""
        k = self.kalloc
        if k.num_free >= need:
            return True
        if self._victims is None:
            self._victims = self._victim_list()
        for drop in (False, True):
            for holder in self._victims:
                if k.num_free >= need:
                    return True
                if not evict_queued and isinstance(holder, Process) and holder.has_work():
                    break  # victim_order puts queued sessions last
                self._evict(holder, drop)
        return k.num_free >= need

    def _victim_list(self) -> list:
        """Holders of pages in eviction order: snapshots first (their pages that no live
        session maps, oldest snapshot first), then sessions by `victim_order`."""
        snaps = []
        if self.snapshots is not None and self.snapshots.records:
            snaps = sorted(self.snapshots.records.values(), key=lambda r: r.created_at)
            self._live = np.zeros(len(self.kalloc.refcount), dtype=bool)
            for p in self.procs.values():
                self._live[p.table.block_ids] = True
        procs = victim_order(p for p in self.procs.values() if p.state is not ProcState.RUNNING)
        return snaps + procs

    def _evict(self, holder, drop: bool) -> None:
        """Moves holder's unpinned device pages to the host tier (as many as fit), or with
        drop, releases its pages and leaves its tokens to be recomputed."""
        k = self.kalloc
        pages = holder.table.block_ids
        if not isinstance(holder, Process) and not drop:
            pages = pages[~self._live[pages]]  # a snapshot's pages that only snapshots hold
        movable = pages[(k.tier[pages] == DEVICE) & (self._pins[pages] == 0)]
        if not len(movable):
            return
        if drop:
            # NOTE: a page shared with other holders is freed once the last of them is
            # dropped; shared pages that stay (a running fork's prefix) come back through
            # the prefix cache when this holder runs again
            self.stats["dropped_blocks"] += self.vm.free(holder.table)
            holder.num_cached = 0
        else:
            room = min(len(movable), k.host.num_free)
            if not room:
                return
            self._copy("out", k.swap_out(movable[:room].tolist()))
            self.stats["swap_out_blocks"] += room
        if isinstance(holder, Process):
            holder.state = ProcState.SWAPPED

    def _digests(self, p: Process, lo: int, hi: int) -> list[bytes]:
        """Chained digests of p's token blocks lo..hi-1 (page lo-1 must be hashed)."""
        if hi <= lo:
            return []
        bs = self.block_size
        prev = ROOT_DIGEST if lo == 0 else self.kalloc.digest.get(int(p.table.block_ids[lo - 1]))
        out = []
        for i in range(lo, hi):
            if prev is None:
                break
            prev = block_digest(prev, p.token_ids[i * bs : (i + 1) * bs])
            out.append(prev)
        return out

    def _register_full(self, p: Process, start: int, end: int) -> None:
        """Enters the pages that [start, end) completed into the prefix cache."""
        if not self.config.prefix_cache:
            return
        lo, hi = start // self.block_size, end // self.block_size
        for i, digest in enumerate(self._digests(p, lo, hi), lo):
            self.kalloc.register(int(p.table.block_ids[i]), digest)
