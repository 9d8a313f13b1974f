"""The memory manager: physical pages (the block allocator), page tables, the prefix cache,
swap and eviction. The kernel holds one; the scheduler sees it as a MemoryView (sched.py)
while a step is formed: mapping prefix-cache pages, reserving the pages a chunk will
write, and making room by evicting cached pages and then swapping out or dropping victims.

The pager follows the policy (the scheduler and the pager are one): a process may take the
pages of idle processes and of lower-priority ones, never of those ahead of it, so two
sessions never evict each other in turn. Idle sessions go first, those expected back last
first (a session's own history of pauses predicts its next); among queued ones, the lowest
priority. For each victim the cheaper of swap (out and back in, at the measured copy
bandwidth) and drop (recompute its tokens, at the measured prefill speed) is taken (the
costs come from a CostModel). A session brought back is kept on the device for a few steps
(hysteresis, enough to pay for its return) and what its swap-in cost is charged to its
quantum. A session woken by a new call (a tool result) has its pages swapped in at once
when memory is free, before the step that runs it.

Plain Python over ids: block copies are only decided here (`take_copies` hands them to the
runner, which moves the bytes). Everything runs in the kernel's loop thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from agentos.kernel.config import Config
from agentos.kernel.costs import CostModel
from agentos.kernel.hooks import KVHolder
from agentos.kernel.kalloc import DEVICE, BlockAllocator, block_digest, scope_root
from agentos.kernel.process import Process, ProcState, ScoreCall
from agentos.kernel.sched import Policy
from agentos.kernel.vm import VM

MIN_RESIDENT_STEPS = 4  # steps a session brought back runs before it may be evicted again
MAX_RESIDENT_STEPS = 64


@dataclass(slots=True)
class StepMemory:
    """What the pager knows of the step being formed (and, once formed, of the last one)."""

    batch: list[Process] = field(default_factory=list)  # granted memory, in order
    satisfied: list[Process] = field(default_factory=list)  # left no work by the prefix cache
    inflight: set[bytes] = field(default_factory=set)  # digests of blocks computed this step
    charges: list[tuple[Process, float]] = field(default_factory=list)  # swap-in costs, in steps
    pinned: bool = False  # whether pins are kept (memory ran short): the batch is never a victim
    victims: list | None = None  # holders of device pages in eviction order, once needed
    live: np.ndarray | None = None  # per page: whether a live session maps it (with victims)
    blocked: bool = False  # a session was left waiting for memory


class MemoryManager:
    def __init__(self, config: Config, num_blocks: int, host_blocks: int, block_bytes: int,
                 costs: CostModel, policy: Policy, procs: dict[str, Process],
                 snapshot_records: Callable[[], Collection[KVHolder]]):
        self.config = config
        self.block_size = config.block_size
        self.block_bytes = block_bytes
        self.kalloc = BlockAllocator(num_blocks, host_blocks)
        self.vm = VM(self.kalloc, config.block_size)
        self.costs = costs
        self.policy = policy  # the kernel's: victims are chosen in its order
        self.procs = procs  # the kernel's process table (read only): sessions, not score calls
        self.snapshot_records = snapshot_records
        self.cache_version = 0  # the weights the prefix cache's pages were computed with
        self.stats = {"cow_copies": 0, "swap_out_blocks": 0, "swap_in_blocks": 0,
                      "dropped_blocks": 0, "prefix_hit_tokens": 0, "preemptions": 0,
                      "prefetched_blocks": 0}
        self.hits_by_owner: dict[str, int] = {}  # prefix_hit_tokens per tenant (its own view)
        self.shared_scopes: dict[str, str] = {}  # owner -> the cache scope it opted in to share
        self.step = StepMemory()
        self._copies: list[tuple[str, list[tuple[int, int]]]] = []  # decided, not yet made
        self._pins = np.zeros(len(self.kalloc.refcount), dtype=np.int32)
        self._resident: dict[str, Process] = {}  # sessions that may hold device pages
        # sessions swapped out only because pages they share left with another's (their
        # state says so until those pages are back; see _settle_shared)
        self._shared_out: dict[str, Process] = {}

    # -- the kernel's side ----------------------------------------------------------------

    def begin_step(self) -> StepMemory:
        """Starts forming a step: nothing granted, pinned or in flight yet."""
        self.step = StepMemory()
        return self.step

    def take_copies(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """The block copies decided so far, in order (for the runner); forgets them."""
        copies, self._copies = self._copies, []
        return copies

    def rest_state(self, p: Process) -> ProcState:
        """The state of a process that is not running: EMBRYO until it first ran, SWAPPED
        while some of its KV is on the host or dropped, else RUNNABLE or SLEEPING."""
        if p.state is ProcState.EMBRYO and p.num_cached == 0:
            return ProcState.EMBRYO
        if p.num_cached == 0 or len(self.vm.nonresident(p.table)):
            return ProcState.SWAPPED
        return ProcState.RUNNABLE if p.has_work() else ProcState.SLEEPING

    def track(self, p: Process) -> None:
        """Adds session p to the resident set: it may map device pages (a fork's, a
        snapshot's, its own)."""
        self._resident[p.pid] = p

    def untrack(self, p: Process) -> None:
        """Forgets a closed session."""
        self._resident.pop(p.pid, None)
        self._shared_out.pop(p.pid, None)

    def kv_stats(self) -> dict[str, int]:
        """The pools' occupancy and the prefix cache's, as the engine's stats report them."""
        k = self.kalloc
        return {"device_blocks_total": k.num_blocks, "device_blocks_used": k.num_used,
                "device_blocks_cached": len(k.lru), "host_blocks_total": k.host.num_slots,
                "host_blocks_used": k.host.num_used, "block_size": self.block_size,
                "block_bytes": self.block_bytes, "prefix_cache_blocks": len(k.cached),
                "prefix_cache_evictions": k.evictions}

    def flush_cache(self, version: int) -> None:
        """Empties the prefix cache; pages cached from now on hold KV of weights `version`."""
        self.kalloc.flush_cache()
        self.cache_version = version

    def drop_all(self, holders: Collection[Process | KVHolder]) -> None:
        """Frees every page of the holders: their KV is recomputed from tokens when they
        next run. The caller sets the processes' states."""
        for h in holders:
            self.stats["dropped_blocks"] += self.vm.free(h.table)
            h.num_cached = 0
        self._shared_out.clear()

    def release(self, holders: Collection[Process | KVHolder]) -> list[Process | KVHolder]:
        """Empties the device tier (sleep): each holder's device pages go to the host tier
        while it has room, else are dropped (recomputed from tokens later). The copies are
        queued (take_copies). Returns the holders that had device pages; the caller sets
        the processes' states."""
        k = self.kalloc
        moved = []
        for h in holders:
            pages = h.table.block_ids
            pages = pages[k.tier[pages] == DEVICE]
            if not len(pages):
                continue
            if len(pages) <= k.host.num_free:
                self._copy("out", k.swap_out(pages.tolist()))
                self.stats["swap_out_blocks"] += len(pages)
            else:
                self.stats["dropped_blocks"] += self.vm.free(h.table)
                h.num_cached = 0
            moved.append(h)
            if isinstance(h, Process):  # its state is set anew by the caller
                self._shared_out.pop(h.pid, None)
        gone = {id(h) for h in moved}
        for h in holders:  # sessions whose pages all went with others' (forks)
            if isinstance(h, Process) and id(h) not in gone and h.pid in self.procs and \
                    h.state in (ProcState.SLEEPING, ProcState.RUNNABLE) and \
                    len(self.vm.nonresident(h.table)):
                h.set_state(ProcState.SWAPPED)
                self._shared_out[h.pid] = h
        return moved

    # -- the scheduler's side (MemoryView) --------------------------------------------------

    def match_prefix(self, p: Process) -> bool:
        """Maps prefix-cache pages for p's next full blocks of tokens (see MemoryView)."""
        bs, table = self.block_size, p.table
        i = table.num_blocks
        if p.num_cached != i * bs or not self.kalloc.cached or not self.config.prefix_cache:
            return True
        prev = self._digest_before(p, i)
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
                wait = digest in self.step.inflight
                break
            hits.append(page)
            prev = digest
            i += 1
        tail = 0
        if not wait and end > i * bs:  # the rest may match the head of a cached page
            page, tail = self.kalloc.longest_match(prev, tokens[i * bs : min(end, (i + 1) * bs)])
            if page is not None:
                hits.append(page)  # written only after a copy, or out of the cache (vm)
        if hits:
            self._map_hits(p, hits, i * bs + tail)
        return not wait

    def _map_hits(self, p: Process, hits: list[int], end: int) -> None:
        """Maps the cached pages `hits`, which hold p's tokens up to `end`."""
        if p.num_cached == 0:  # the cache holds pages of the current weights only
            p.kv_version = self.cache_version
        for page in hits:
            self.kalloc.revive(page)
        p.table.push(hits)
        if p.pid in self.procs:
            # NOTE: p now holds device pages: they must be visible to eviction even if p
            # is then blocked on memory, or a full pool can wait on them forever
            self.track(p)
        cached = min(end, p.num_tokens - 1 if p.call is not None else p.num_tokens)
        self.stats["prefix_hit_tokens"] += cached - p.num_cached
        self.hits_by_owner[p.owner] = self.hits_by_owner.get(p.owner, 0) + cached - p.num_cached
        p.num_cached = cached
        if p.state is ProcState.RUNNABLE and (self.kalloc.tier[hits] != DEVICE).any():
            p.set_state(ProcState.SWAPPED)  # the cached copy went out with its holder's pages
        if not p.has_work():
            self.step.satisfied.append(p)

    def reserve(self, p: Process, start: int, end: int) -> bool:
        """Makes [start, end) of p writable with all its pages on the device (see
        MemoryView): frees room by evicting cached pages, then swapping out or dropping
        idle and lower-priority victims; swaps p's host pages in; copies shared pages it
        will write."""
        if end - start == 1 and start % self.block_size and p.swapped_at is None:
            # the common decode: one token into its own partial tail block, all on device
            page = int(p.table.block_ids[start // self.block_size])
            if self.kalloc.refcount[page] == 1 and page not in self.kalloc.digest and \
                    not len(self.vm.nonresident(p.table)):
                self._admitted(p)
                return True
        need = self.vm.blocks_needed(p.table, start, end)
        if need > self.kalloc.num_free:
            self._pin_batch()
            self._pin(p.table.block_ids, 1)
            made = self._make_room(need, p)
            self._pin(p.table.block_ids, -1)
            if not made:
                return False
        cost = None
        if need:
            host = self.vm.nonresident(p.table)
            if len(host):
                self._swap_in(host)
                cost = self.costs.swap_s(len(host))
                self.step.charges.append((p, cost / self.costs.step_s))
        if p.swapped_at is not None:  # back from an eviction: stay a while (hysteresis)
            self._returned(p, cost if cost is not None
                           else self.costs.prefill_s(p.num_tokens - p.num_cached))
        copies = self.vm.prepare_write(p.table, start, end)
        assert copies is not None, "room was made"
        self._admitted(p)
        if copies:
            slot = self.kalloc.slot
            self._copy("cow", [(int(slot[s]), int(slot[d])) for s, d in copies])
            self.stats["cow_copies"] += len(copies)
        if end - start > 1:  # a prefill: later prompts with the same blocks wait for these
            self.step.inflight.update(self._digests(p, start // self.block_size, end // self.block_size))
        return True

    def residents(self) -> list[Process]:
        """Queued sessions not evicted since they last ran, in priority order."""
        out = [q for q in self._resident.values()
               if q.swapped_at is None and q in self.policy and q.has_work()]
        out.sort(key=self.policy.rank)
        return out

    def _admitted(self, p: Process) -> None:
        """Records p in the step being formed: its pages (with any new ones, not the ones
        it copied) are pinned while memory is short, and a session joins the resident set."""
        self.step.batch.append(p)
        if p.pid in self.procs:
            self._resident[p.pid] = p
        if self.step.pinned:
            self._pin(p.table.block_ids, 1)

    def _returned(self, p: Process, cost_s: float) -> None:
        """p's pages are back (or being recomputed): it runs long enough to pay for that."""
        now = time.monotonic()
        p.swapped_s += now - p.swapped_at
        p.swapped_at = None
        steps = math.ceil(2 * cost_s / self.costs.step_s)
        p.resident_steps = min(MAX_RESIDENT_STEPS, max(MIN_RESIDENT_STEPS, steps))

    def prefetch(self, p: Process) -> None:
        """Swaps in the host pages of p, which was just given work, when the device has
        free room for them and no session waits for memory: the copy is queued now and
        runs before the next step, so p does not wait a step for it."""
        if self.step.blocked or p.swapped_at is None or not p.num_cached:
            return
        host = self.vm.nonresident(p.table)
        if not len(host) or len(host) > self.kalloc.device.num_free:
            return  # only truly free slots: never evict cached pages or sessions for it
        self._swap_in(host)
        self.stats["prefetched_blocks"] += len(host)
        self._returned(p, self.costs.swap_s(len(host)))
        self._resident[p.pid] = p

    def _swap_in(self, pages: np.ndarray) -> None:
        self._copy("in", self.kalloc.swap_in(pages.tolist()))
        self.stats["swap_in_blocks"] += len(pages)
        if self._shared_out:
            self._settle_shared()

    def _pin_batch(self) -> None:
        """Pins the pages of the step's chunks so far (they are never victims); from now
        on until the step ends, reserve pins each new chunk's pages too."""
        if not self.step.pinned:
            self.step.pinned = True
            self._pins.fill(0)
            for q in self.step.batch:
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

    # -- eviction --------------------------------------------------------------------------

    def _make_room(self, need: int, requester: Process) -> bool:
        """Frees device pages until `need` can be allocated, evicting victims (see
        `_victim_list`) that the requester may take from: snapshots' pages, idle sessions,
        and queued sessions of lower priority. Sessions brought back recently are spared
        (hysteresis) unless nothing runs yet this step: the loop must not idle. Idle
        sessions expected back before their eviction would pay off are kept while any
        other victim remains. Returns whether the room was made."""
        k = self.kalloc
        if k.num_free >= need:
            return True
        if self.step.victims is None:
            self.step.victims = self._victim_list()
        queued = requester in self.policy
        rank = self.policy.rank(requester) if queued else None
        spare_recent = bool(self.step.batch)
        # NOTE: load control: a session with nothing computed yet never costs another
        # session its KV (a drop, to recompute later); it takes free and swappable pages
        # only, else waits for memory. Without this, under overload every new arrival
        # starts, the host tier fills with half-served sessions and they are recomputed
        # over and over. (Unless nothing runs yet: the loop must not idle.)
        may_drop = requester.num_cached > 0 or not self.step.batch
        now = time.time()
        for keep_soon in (True, False):
            for holder in self.step.victims:
                if k.num_free >= need:
                    return True
                if isinstance(holder, Process):
                    if holder is requester:
                        continue
                    if holder in self.policy and holder.has_work():
                        if rank is None or self.policy.rank(holder) <= rank:
                            break  # queued victims come lowest priority first
                    elif keep_soon and self.costs.expected_back(holder, now) < self._evict_s(holder):
                        continue  # keep: back before its eviction would pay off
                    if spare_recent and holder.resident_steps > 0:
                        continue
                self._evict(holder, may_drop)
        return k.num_free >= need

    def _victim_list(self) -> list:
        """Holders of device pages in eviction order: snapshots (their pages that no live
        session maps, oldest snapshot first), idle sessions (the one expected back last
        first), then queued sessions, lowest priority first. Sessions come from the
        resident set, whose size is bounded by the device pool, not by the sessions."""
        snaps: list = []
        records = self.snapshot_records()
        if records:
            snaps = sorted(records, key=lambda r: r.created_at)
            self.step.live = np.zeros(len(self.kalloc.refcount), dtype=bool)
            for p in self.procs.values():
                self.step.live[p.table.block_ids] = True
        tier = self.kalloc.tier
        idle, queued = [], []
        for pid, p in list(self._resident.items()):
            if not (tier[p.table.block_ids] == DEVICE).any():
                del self._resident[pid]  # nothing of it left on the device
            elif p in self.policy and p.has_work():
                queued.append(p)
            else:
                idle.append(p)
        now = time.time()
        idle.sort(key=lambda p: self.costs.expected_back(p, now), reverse=True)
        queued.sort(key=self.policy.rank, reverse=True)
        return snaps + idle + queued

    def _evict(self, holder: Process | KVHolder, may_drop: bool = True) -> None:
        """Takes holder's unpinned device pages off the device: swaps them to the host tier
        when it has room and a round trip costs less than recomputing the holder's tokens,
        else drops the holder's pages (its KV is recomputed from tokens when it next runs)
        if may_drop, else leaves them."""
        k = self.kalloc
        pages = holder.table.block_ids
        if not isinstance(holder, Process):
            pages = pages[~self.step.live[pages]]  # a snapshot's pages that only snapshots hold
        movable = pages[(k.tier[pages] == DEVICE) & (self._pins[pages] == 0)]
        if not len(movable):
            return
        if len(movable) <= k.host.num_free and (
                not isinstance(holder, Process)
                or 2 * self.costs.swap_s(len(movable)) <= self.costs.prefill_s(holder.num_cached)):
            self._copy("out", k.swap_out(movable.tolist()))
            self.stats["swap_out_blocks"] += len(movable)
            if isinstance(holder, Process):
                self._follow_out(holder, movable)
        elif not may_drop:
            return
        else:
            # NOTE: a page shared with other holders is freed once the last of them is
            # dropped; shared pages that stay (a running fork's prefix) come back through
            # the prefix cache when this holder runs again
            self.stats["dropped_blocks"] += self.vm.free(holder.table)
            holder.num_cached = 0
        if isinstance(holder, Process):
            holder.set_state(ProcState.SWAPPED)
            holder.swap_count += 1
            holder.resident_steps = 0
            self.stats["preemptions"] += 1
            if holder.swapped_at is None:
                holder.swapped_at = time.monotonic()

    def _evict_s(self, p: Process) -> float:
        """What evicting p and bringing it back would cost, in seconds."""
        n = p.table.num_blocks
        return min(2 * self.costs.swap_s(n) if self.kalloc.host.num_slots else math.inf,
                   self.costs.prefill_s(p.num_cached))

    def _follow_out(self, holder: Process, pages: np.ndarray) -> None:
        """Pages that holder shares with other sessions (its forks) went to the host with
        it: those sessions, idle or queued, are swapped out too."""
        shared = pages[self.kalloc.refcount[pages] > 1]
        if not len(shared):
            return
        out = np.zeros(len(self.kalloc.refcount), dtype=bool)
        out[shared] = True
        others = [q for pid, q in self._shared_out.items() if pid not in self._resident]
        for q in [*self._resident.values(), *others]:
            if q is not holder and q.state in (ProcState.SLEEPING, ProcState.RUNNABLE) and \
                    out[q.table.block_ids].any():
                q.set_state(ProcState.SWAPPED)
                self._shared_out[q.pid] = q

    def _settle_shared(self) -> None:
        """Sessions swapped out with another's pages are not swapped any more once all
        their pages are back. They stay known here (their pages may leave again with
        another's) until they are in the resident set, or were evicted themselves (and so
        come back by running)."""
        for pid, q in list(self._shared_out.items()):
            if q.swapped_at is not None:
                del self._shared_out[pid]
            elif q.state is ProcState.SWAPPED:
                if q.num_cached and not len(self.vm.nonresident(q.table)):
                    q.set_state(self.rest_state(q))
            elif pid in self._resident:
                del self._shared_out[pid]

    # -- the prefix cache --------------------------------------------------------------------

    # NOTE: the cache is scoped: a page is found only from the root of its session's scope,
    # so a tenant never maps another's pages (which would let it probe what they sent, or
    # poison what they read) unless both opted in to one shared scope. A session whose KV
    # came from outside (an import) has a scope of its own: its pages, and every later
    # page computed over them, are shared only within its family (forks, snapshots).

    def scope_of(self, p: Process) -> str:
        """The cache scope p's pages are shared in: its own when it has one (an import's),
        else the one its owner shares (share_cache), else its owner's alone."""
        if p.cache_scope is not None:
            return p.cache_scope
        shared = self.shared_scopes.get(p.owner)
        return "tenant:" + p.owner if shared is None else "shared:" + shared

    def root(self, p: Process) -> bytes:
        """The digest "before" p's first block (the root of its scope's chains)."""
        return scope_root(self.scope_of(p))

    def share_cache(self, scopes: dict[str, str]) -> None:
        """Sets which tenants share prefix-cache pages: owner -> scope name; owners naming
        the same scope share, the others keep their own. Pages cached before stay in the
        scope they were computed in."""
        self.shared_scopes = dict(scopes)

    def _digest_before(self, p: Process, i: int) -> bytes | None:
        """The digest chaining into p's block i: its scope's root for the first block, else
        that of page i-1 (None when that page is not hashed)."""
        return self.root(p) if i == 0 else self.kalloc.digest.get(int(p.table.block_ids[i - 1]))

    def _digests(self, p: Process, lo: int, hi: int) -> list[bytes]:
        """Chained digests of p's token blocks lo..hi-1 (page lo-1 must be hashed)."""
        if hi <= lo:
            return []
        bs = self.block_size
        prev = self._digest_before(p, lo)
        out = []
        for i in range(lo, hi):
            if prev is None:
                break
            prev = block_digest(prev, p.token_ids[i * bs : (i + 1) * bs])
            out.append(prev)
        return out

    def register_tail(self, p: Process) -> None:
        """Enters p's last, partly filled page into the prefix cache under the digest of
        the tokens it holds, as p closes: a session that later starts with the same tokens
        (a conversation sent again with its next turn) maps it and computes only what
        follows. Whoever writes into it writes into a copy (vm.prepare_write), so a cached
        page never changes under its digest."""
        bs, k = self.block_size, p.num_cached % self.block_size
        i = p.num_cached // bs
        if not (k and self.config.prefix_cache and p.kv_version == self.cache_version
                and i < p.table.num_blocks):
            return
        prev = self._digest_before(p, i)
        if prev is None:
            return
        head = p.token_ids[i * bs : i * bs + k]
        self.kalloc.register(int(p.table.block_ids[i]), block_digest(prev, head), prev, head)

    def register_full(self, p: Process, start: int, end: int) -> None:
        """Enters the pages that [start, end) of p completed into the prefix cache."""
        if not self.config.prefix_cache or p.kv_version != self.cache_version:
            return  # (KV kept across a weight update is not what the new weights compute)
        bs = self.block_size
        lo, hi = start // bs, end // bs
        prev = self._digest_before(p, lo)
        for i, digest in enumerate(self._digests(p, lo, hi), lo):
            assert prev is not None
            self.kalloc.register(int(p.table.block_ids[i]), digest, prev,
                                 p.token_ids[i * bs : (i + 1) * bs])
            prev = digest
