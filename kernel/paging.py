"""Memory for the scheduler (the MemoryView it sees): mapping prefix-cache pages,
reserving the pages a chunk will write, and making room by evicting cached pages and then
swapping out or dropping victims. A part of the Kernel (a base class of it); it runs in the
loop thread while a step is formed.

The pager follows the policy (the scheduler and the pager are one): a process may take the
pages of idle processes and of lower-priority ones, never of those ahead of it, so two
sessions never evict each other in turn. Idle sessions go first, those expected back last
first (a session's own history of pauses predicts its next); among queued ones, the lowest
priority. For each victim the cheaper of swap (out and back in, at the measured copy
bandwidth) and drop (recompute its tokens, at the measured prefill speed) is taken. A
session brought back is kept on the device for a few steps (hysteresis, enough to pay for
its return) and what its swap-in cost is charged to its quantum. A session woken by a new
call (a tool result) has its pages swapped in at once when memory is free, before the
step that runs it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from agentos.kernel.kalloc import DEVICE, ROOT_DIGEST, block_digest
from agentos.kernel.process import Process, ProcState, ScoreCall

MIN_RESIDENT_STEPS = 4  # steps a session brought back runs before it may be evicted again
MAX_RESIDENT_STEPS = 64
DEFAULT_PAUSE_S = 1.0  # expected idle time of a session before any pause was seen


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
                self._copy("in", self.kalloc.swap_in(host.tolist()))
                self.stats["swap_in_blocks"] += len(host)
                cost = self._swap_s(len(host))
                self._charges.append((p, cost / self._step_s))
        if p.swapped_at is not None:  # back from an eviction: stay a while (hysteresis)
            self._returned(p, cost if cost is not None
                           else self._prefill_s(p.num_tokens - p.num_cached))
        copies = self.vm.prepare_write(p.table, start, end)
        assert copies is not None, "room was made"
        self._admitted(p)
        if copies:
            slot = self.kalloc.slot
            self._copy("cow", [(int(slot[s]), int(slot[d])) for s, d in copies])
            self.stats["cow_copies"] += len(copies)
        if end - start > 1:  # a prefill: later prompts with the same blocks wait for these
            self._inflight.update(self._digests(p, start // self.block_size, end // self.block_size))
        return True

    def _admitted(self, p: Process) -> None:
        """Records p in the step being formed: its pages (with any new ones, not the ones
        it copied) are pinned while memory is short, and a session joins the resident set."""
        self._batch.append(p)
        if p.pid in self.procs:
            self._resident[p.pid] = p
        if self._pinned:
            self._pin(p.table.block_ids, 1)

    def residents(self) -> list[Process]:
        """Queued sessions not evicted since they last ran, in priority order."""
        out = [q for q in self._resident.values()
               if q.swapped_at is None and q in self.policy and q.has_work()]
        out.sort(key=self.policy.rank)
        return out

    def _returned(self, p: Process, cost_s: float) -> None:
        """p's pages are back (or being recomputed): it runs long enough to pay for that."""
        now = time.monotonic()
        p.swapped_s += now - p.swapped_at
        p.swapped_at = None
        steps = math.ceil(2 * cost_s / self._step_s)
        p.resident_steps = min(MAX_RESIDENT_STEPS, max(MIN_RESIDENT_STEPS, steps))

    def prefetch(self, p: Process) -> None:
        """Swaps in the host pages of p, which was just given work, when the device has
        free room for them and no session waits for memory: the copy is queued now and
        runs before the next step, so p does not wait a step for it."""
        if self._short or p.swapped_at is None or not p.num_cached:
            return
        host = self.vm.nonresident(p.table)
        if not len(host) or len(host) > self.kalloc.device.num_free:
            return  # only truly free slots: never evict cached pages or sessions for it
        self._copy("in", self.kalloc.swap_in(host.tolist()))
        self.stats["swap_in_blocks"] += len(host)
        self.stats["prefetched_blocks"] += len(host)
        self._returned(p, self._swap_s(len(host)))
        self._resident[p.pid] = p

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
        if self._victims is None:
            self._victims = self._victim_list()
        queued = requester in self.policy
        rank = self.policy.rank(requester) if queued else None
        spare_recent = bool(self._batch)
        # NOTE: load control: a session with nothing computed yet never costs another
        # session its KV (a drop, to recompute later); it takes free and swappable pages
        # only, else waits for memory. Without this, under overload every new arrival
        # starts, the host tier fills with half-served sessions and they are recomputed
        # over and over. (Unless nothing runs yet: the loop must not idle.)
        may_drop = requester.num_cached > 0 or not self._batch
        now = time.time()
        for keep_soon in (True, False):
            for holder in self._victims:
                if k.num_free >= need:
                    return True
                if isinstance(holder, Process):
                    if holder is requester:
                        continue
                    if holder in self.policy and holder.has_work():
                        if rank is None or self.policy.rank(holder) <= rank:
                            break  # queued victims come lowest priority first
                    elif keep_soon and self._expected_back(holder, now) < self._evict_s(holder):
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
        snaps = []
        if self.snapshots is not None and self.snapshots.records:
            snaps = sorted(self.snapshots.records.values(), key=lambda r: r.created_at)
            self._live = np.zeros(len(self.kalloc.refcount), dtype=bool)
            for p in self.procs.values():
                self._live[p.table.block_ids] = True
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
        idle.sort(key=lambda p: self._expected_back(p, now), reverse=True)
        queued.sort(key=self.policy.rank, reverse=True)
        return snaps + idle + queued

    def _expected_back(self, p: Process, now: float) -> float:
        """Seconds until idle p is expected to return: its average pause so far less the
        time it has been idle; overdue sessions count as gone (expected never)."""
        pause = p.pause_s if p.pause_s is not None else self._pause_s
        left = p.last_active + pause - now
        return left if left >= 0 else math.inf

    def _evict(self, holder, may_drop: bool = True) -> None:
        """Takes holder's unpinned device pages off the device: swaps them to the host tier
        when it has room and a round trip costs less than recomputing the holder's tokens,
        else drops the holder's pages (its KV is recomputed from tokens when it next runs)
        if may_drop, else leaves them."""
        k = self.kalloc
        pages = holder.table.block_ids
        if not isinstance(holder, Process):
            pages = pages[~self._live[pages]]  # a snapshot's pages that only snapshots hold
        movable = pages[(k.tier[pages] == DEVICE) & (self._pins[pages] == 0)]
        if not len(movable):
            return
        if len(movable) <= k.host.num_free and (
                not isinstance(holder, Process)
                or 2 * self._swap_s(len(movable)) <= self._prefill_s(holder.num_cached)):
            self._copy("out", k.swap_out(movable.tolist()))
            self.stats["swap_out_blocks"] += len(movable)
        elif not may_drop:
            return
        else:
            # NOTE: a page shared with other holders is freed once the last of them is
            # dropped; shared pages that stay (a running fork's prefix) come back through
            # the prefix cache when this holder runs again
            self.stats["dropped_blocks"] += self.vm.free(holder.table)
            holder.num_cached = 0
        if isinstance(holder, Process):
            holder.state = ProcState.SWAPPED
            holder.swap_count += 1
            holder.resident_steps = 0
            self.stats["preemptions"] += 1
            if holder.swapped_at is None:
                holder.swapped_at = time.monotonic()

    def _evict_s(self, p: Process) -> float:
        """What evicting p and bringing it back would cost, in seconds."""
        n = p.table.num_blocks
        return min(2 * self._swap_s(n) if self.kalloc.host.num_slots else math.inf,
                   self._prefill_s(p.num_cached))

    # -- the cost model: measured, per engine ---------------------------------------------

    def _init_costs(self) -> None:
        self._resident: dict[str, Process] = {}  # sessions that may hold device pages
        self._charges: list[tuple[Process, float]] = []  # swap-in costs, for after the step
        self._short = False  # the last step left a session blocked on memory
        self._step_s = 0.01  # moving averages: a step's time, a prefill token's
        self._prefill_tok_s = 1e-4
        self._pause_s = DEFAULT_PAUSE_S  # sessions' idle time between calls
        self._swap_bw = self._measure_swap()  # bytes per second, host <-> device

    def _swap_s(self, num_blocks: int) -> float:
        return num_blocks * self.block_bytes / self._swap_bw

    def _prefill_s(self, num_tokens: int) -> float:
        return num_tokens * self._prefill_tok_s

    def _measure_swap(self) -> float:
        """Times a swap out and back of a few blocks between free slots (before any page
        is handed out); returns bytes per second. Without a host tier, a nominal value."""
        n = min(16, self.kalloc.num_blocks, self.kalloc.host.num_slots)
        if n == 0:
            return 1e10
        pairs = [(i, i) for i in range(n)]
        dev = self.runner.kv.device
        best = math.inf
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            self.runner.swap_out(pairs)
            self.runner.swap_in(pairs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        return 2 * n * self.block_bytes / max(best, 1e-9)

    def _observe_step(self, seconds: float, chunks) -> None:
        """Updates the step-time and prefill-speed averages from a finished step."""
        self._step_s = 0.9 * self._step_s + 0.1 * seconds
        prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if prefill >= 64:
            per = seconds / sum(c.num_tokens for c in chunks)
            self._prefill_tok_s = 0.8 * self._prefill_tok_s + 0.2 * per

    def _observe_wake(self, p: Process) -> None:
        """A session idle since its last call got new work: learns how long it paused."""
        pause = max(0.0, time.time() - p.last_active)
        p.pause_s = pause if p.pause_s is None else 0.5 * p.pause_s + 0.5 * pause
        self._pause_s = 0.9 * self._pause_s + 0.1 * pause

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
