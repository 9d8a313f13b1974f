"""Physical memory: KV pages with reference counts, living in the slots of two tiers.

A page is what a page table maps (one block of `block_size` token positions). Each live
page sits in one slot of the device tier (where attention reads it) or of the host tier
(swapped out). Swapping moves a page between tiers without changing its id, so every
page table that maps it (forks, snapshots) follows at once and nothing is rewritten.

The allocator also holds the prefix cache's bookkeeping: the chained digest of each cached
page (a full block, or the head of a closed session's last block), the canonical page of
each digest, each cached page's tokens under the digest before it (for matches that end
inside a page), and an LRU of cached device pages that no table maps any more (kept until
their slot is needed). Each chain starts from the root of a
cache scope (`scope_root`), so sessions of different scopes (tenants) never share a page
through the cache, whatever their tokens.

Plain numpy and dicts over ids (no tensors): the KV bytes live in the model runner.
Reference counts are vectorised so that forking or freeing a page table of thousands of
pages is a handful of array operations, not a Python loop.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

DEVICE, HOST, FREE = 0, 1, -1  # tier of a page
ROOT_DIGEST = b"agentos/prefix/v1"  # the seed of every scope's root (scope_root)


def scope_root(scope: str) -> bytes:
    """The digest "before" the first block of a session in cache scope `scope`: chains of
    different scopes never meet."""
    return hashlib.blake2b(ROOT_DIGEST + scope.encode(), digest_size=16).digest()


def block_digest(prev: bytes, tokens) -> bytes:
    """The digest of a full block given its tokens (an array("i") slice) and the digest of
    the block before it: equal digests mean equal prefixes, hence equal KV."""
    return hashlib.blake2b(prev + tokens.tobytes(), digest_size=16).digest()


class OutOfBlocks(Exception):
    """Raised by alloc when the device tier cannot satisfy a request (nothing changed)."""


class Tier:
    """The slots of one memory tier: a free list. Low slots are handed out first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def alloc(self, n: int) -> list[int]:
        assert n <= len(self._free), "tier overcommitted"
        if n == 0:
            return []
        slots = self._free[-n:]
        del self._free[-n:]
        slots.reverse()
        return slots

    def free(self, slots: Iterable[int]) -> None:
        self._free.extend(slots)


class BlockAllocator:
    """Pages over a device tier of `num_blocks` slots and a host tier of `num_host_blocks`.

    `alloc` hands out device pages with reference count 1; `incref`/`decref` count table
    entries; a page reaching zero frees its slot, unless it is the prefix cache's copy of
    its digest and sits on the device: then it waits in the LRU until a slot is needed.
    """

    def __init__(self, num_blocks: int, num_host_blocks: int = 0):
        if num_blocks < 1 or num_host_blocks < 0:
            raise ValueError("need num_blocks >= 1 and num_host_blocks >= 0")
        self.device = Tier(num_blocks)
        self.host = Tier(num_host_blocks)
        n = num_blocks + num_host_blocks  # every live page holds a slot: ids never run out
        self.refcount = np.zeros(n, dtype=np.int32)
        self.tier = np.full(n, FREE, dtype=np.int8)
        self.slot = np.zeros(n, dtype=np.int64)
        self._free_pages: list[int] = list(range(n - 1, -1, -1))
        self.digest: dict[int, bytes] = {}  # cached page -> chained digest of its tokens
        self.cached: dict[bytes, int] = {}  # digest -> the page new sessions share
        # the cached pages by what precedes them, for matches that end inside a page:
        # (digest of the page before, first token) -> pages; page -> (that digest, tokens)
        self.after: dict[tuple[bytes, int], set[int]] = {}
        self.held: dict[int, tuple[bytes, array]] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # unmapped cached device pages, oldest first
        self.evictions = 0

    # -- capacity -----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.device.num_slots

    @property
    def num_free(self) -> int:
        """Device pages that can be allocated now (free slots plus evictable cached pages)."""
        return self.device.num_free + len(self.lru)

    @property
    def num_used(self) -> int:
        """Device slots held by mapped pages."""
        return self.device.num_used - len(self.lru)

    def can_alloc(self, n: int) -> bool:
        """True when n device pages can be allocated now. Changes nothing."""
        return n <= self.num_free

    # -- pages --------------------------------------------------------------------------

    def alloc(self, n: int) -> list[int]:
        """Returns n fresh device pages, each with reference count 1, evicting the least
        recently used cached pages if the free slots fall short.

        Raises OutOfBlocks (and changes nothing) when fewer than n can be had.
        """
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        self._make_free(n)
        pages = self._new_pages(n, DEVICE, self.device.alloc(n))
        self.refcount[pages] = 1
        return pages

    def incref(self, pages: Sequence[int] | np.ndarray) -> None:
        """Adds one reference to each page. The ids must be distinct (as in a page table)."""
        ids = np.asarray(pages, dtype=np.int64)
        if ids.size == 0:
            return
        rc = self.refcount[ids]
        assert (rc > 0).all(), "incref of an unmapped page"
        # NOTE: fancy-index assignment, ~20x faster than np.add.at; needs distinct ids
        self.refcount[ids] = rc + 1

    def decref(self, pages: Sequence[int] | np.ndarray) -> int:
        """Drops one reference from each page (distinct ids); returns how many reached zero.

        Callers pass page tables head-first; the last pages of a table are reused first
        (the tail is pushed last onto the free stack, and enters the LRU first), so
        prefixes stay in memory longest.
        """
        ids = np.asarray(pages, dtype=np.int64)
        if ids.size == 0:
            return 0
        rc = self.refcount[ids] - 1
        assert (rc >= 0).all(), "decref of an unmapped page"
        self.refcount[ids] = rc
        dead = ids[rc == 0]
        dead_count = dead.size
        if dead.size:
            # NOTE: one pass splits them (np.isin costs tens of microseconds on a few pages)
            keep, free = [], []
            for p in dead[::-1].tolist():
                cached = self.tier[p] == DEVICE and self.cached.get(self.digest.get(p, b"")) == p
                (keep if cached else free).append(p)
            if keep:
                self.lru.update(dict.fromkeys(keep))
                dead = np.array(free[::-1], dtype=np.int64)
            self._release(dead)
        return dead_count

    def num_host(self, pages: np.ndarray) -> int:
        """How many of the pages are in the host tier (swapped out)."""
        # NOTE: count_nonzero, not .sum(): a listing asks this per session
        return int(np.count_nonzero(self.tier[pages] == HOST))

    def revive(self, page: int) -> None:
        """Maps a cached page again (a prefix-cache hit): one reference, out of the LRU."""
        if self.refcount[page] == 0:
            del self.lru[page]
        self.refcount[page] += 1

    def is_shared(self, page: int) -> bool:
        return bool(self.refcount[page] > 1)

    def _new_pages(self, n: int, tier: int, slots: list[int]) -> list[int]:
        pages = self._free_pages[-n:] if n else []
        del self._free_pages[len(self._free_pages) - n :]
        pages.reverse()
        self.tier[pages] = tier
        self.slot[pages] = slots
        return pages

    def _release(self, pages: np.ndarray) -> None:
        """Frees unreferenced pages and their slots (forgetting their digests)."""
        if not pages.size:
            return
        tiers = self.tier[pages]
        self.device.free(self.slot[pages[tiers == DEVICE]].tolist())
        self.host.free(self.slot[pages[tiers == HOST]].tolist())
        self.tier[pages] = FREE
        ids = pages.tolist()
        if self.digest:
            for p in ids:
                self.forget(p)
        self._free_pages.extend(ids)

    def _make_free(self, n: int) -> None:
        """Evicts LRU cached pages until n device slots are free."""
        while self.device.num_free < n:
            page, _ = self.lru.popitem(last=False)
            self.evictions += 1
            self._release(np.array([page], dtype=np.int64))

    # -- swap ---------------------------------------------------------------------------

    def swap_out(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Moves mapped device pages to the host tier. Returns the (device slot, host slot)
        copies to make, in order, before either slot is reused."""
        if len(pages) > self.host.num_free:
            raise OutOfBlocks(f"need {len(pages)} host blocks, {self.host.num_free} free")
        ids = np.asarray(pages, dtype=np.int64)
        assert (self.tier[ids] == DEVICE).all() and (self.refcount[ids] > 0).all()
        src = self.slot[ids].tolist()
        dst = self.host.alloc(len(src))
        self.device.free(src)
        self.tier[ids] = HOST
        self.slot[ids] = dst
        return list(zip(src, dst))

    def swap_in(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Moves host pages to the device tier (evicting cached pages if needed). Returns
        the (host slot, device slot) copies to make."""
        if len(pages) > self.num_free:
            raise OutOfBlocks(f"need {len(pages)} blocks, {self.num_free} free")
        ids = np.asarray(pages, dtype=np.int64)
        assert (self.tier[ids] == HOST).all()
        self._make_free(len(ids))
        src = self.slot[ids].tolist()
        dst = self.device.alloc(len(src))
        self.host.free(src)
        self.tier[ids] = DEVICE
        self.slot[ids] = dst
        return list(zip(src, dst))

    # -- prefix cache -------------------------------------------------------------------

    def register(self, page: int, digest: bytes, prev: bytes | None = None,
                 tokens: array | None = None) -> None:
        """Records a page's digest; it becomes the cached copy if there is none. With the
        digest before it (`prev`) and the tokens it holds (a full block, or the head of
        one), it can also be found by `longest_match`."""
        if self.digest.get(page, digest) != digest:
            self.forget(page)
        self.digest[page] = digest
        if self.cached.setdefault(digest, page) == page and prev is not None and tokens:
            self.held[page] = (prev, tokens)
            self.after.setdefault((prev, tokens[0]), set()).add(page)

    def forget(self, page: int) -> None:
        """Drops a page's digest (before it is overwritten or freed)."""
        digest = self.digest.pop(page, None)
        if digest is not None and self.cached.get(digest) == page:
            del self.cached[digest]
        held = self.held.pop(page, None)
        if held is not None:
            key = (held[0], held[1][0])
            pages = self.after[key]
            pages.discard(page)
            if not pages:
                del self.after[key]

    def lookup(self, digest: bytes) -> int | None:
        return self.cached.get(digest)

    def longest_match(self, prev: bytes, tokens: array) -> tuple[int | None, int]:
        """The cached page after `prev` whose tokens share the longest head with `tokens`
        (fewer than a block), and that length: (None, 0) when none shares one."""
        best, length = None, 0
        for page in self.after.get((prev, tokens[0]), ()) if tokens else ():
            held = self.held[page][1]
            n = min(len(held), len(tokens))
            k = next((j for j in range(1, n) if held[j] != tokens[j]), n)
            if k > length:
                best, length = page, k
        return best, length

    def flush_cache(self) -> None:
        """Empties the prefix cache: frees the LRU's pages and forgets every digest (mapped
        pages stay mapped, but no new session will share them)."""
        self._release(np.fromiter(self.lru, dtype=np.int64, count=len(self.lru)))
        self.lru.clear()
        self.digest.clear()
        self.cached.clear()
        self.after.clear()
        self.held.clear()

    # -- invariants ---------------------------------------------------------------------

    def check(self, mapped: np.ndarray) -> None:
        """Asserts every invariant given how many table entries map each page."""
        rc = self.refcount.astype(np.int64)
        bad = np.nonzero(mapped != rc)[0]
        assert not len(bad), f"refcount mismatch at pages {bad[:8].tolist()}: " \
            f"mapped {mapped[bad[:8]].tolist()} counted {rc[bad[:8]].tolist()}"
        live = rc > 0
        lru = np.zeros(len(rc), dtype=bool)
        lru[list(self.lru)] = True
        assert not (lru & live).any(), "a mapped page is in the LRU"
        assert (self.tier[live] != FREE).all(), "a mapped page has no slot"
        assert (self.tier[lru] == DEVICE).all(), "an LRU page is not on the device"
        held = live | lru
        assert (self.tier[~held] == FREE).all(), "an unmapped page holds a slot"
        for tier, t in ((DEVICE, self.device), (HOST, self.host)):
            slots = self.slot[held & (self.tier == tier)]
            assert len(np.unique(slots)) == len(slots), "two pages share a slot"
            assert len(slots) == t.num_used, "tier free list out of sync"
            assert len(set(t._free)) == t.num_free and not set(t._free) & set(slots.tolist())
        assert len(self._free_pages) == int((~held).sum()), "page free list out of sync"
        for digest, page in self.cached.items():
            assert self.digest.get(page) == digest and held[page], "stale prefix-cache entry"
        assert set(self.held) <= set(self.cached.values()), "a stale partial-match entry"
        assert sum(len(v) for v in self.after.values()) == len(self.held)
