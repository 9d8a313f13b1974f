from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentos.kernel.kalloc import (
    DEVICE,
    HOST,
    ROOT_DIGEST,
    BlockAllocator,
    OutOfBlocks,
    block_digest,
)


def test_alloc_free_roundtrip():
    a = BlockAllocator(8)
    assert a.can_alloc(8) and not a.can_alloc(9)
    ids = a.alloc(3)
    assert len(set(ids)) == 3 and a.num_used == 3
    assert (a.refcount[ids] == 1).all()
    assert a.decref(ids) == 3
    assert a.num_used == 0 and a.num_free == 8


def test_alloc_failure_changes_nothing():
    a = BlockAllocator(4)
    a.alloc(3)
    before = (a.refcount.copy(), a.num_free)
    with pytest.raises(OutOfBlocks):
        a.alloc(2)
    assert (a.refcount == before[0]).all() and a.num_free == before[1]


def test_shared_block_freed_on_last_reference():
    a = BlockAllocator(4)
    ids = a.alloc(2)
    a.incref(ids)
    assert a.is_shared(ids[0])
    assert a.decref(ids) == 0 and a.num_used == 2
    assert a.decref(ids) == 2 and a.num_used == 0


def test_counts_stack_across_tables():
    a = BlockAllocator(4)
    ids = a.alloc(2)
    a.incref(ids[:1])
    a.incref(ids[:1])
    assert a.refcount[ids[0]] == 3
    assert a.decref(ids) == 1  # ids[1] reached zero
    assert a.decref(ids[:1]) == 0 and a.decref(ids[:1]) == 1
    assert a.num_free == 4 and sorted(a.device._free) == [0, 1, 2, 3]


def test_tail_is_reused_first():
    a = BlockAllocator(8)
    ids = a.alloc(4)
    a.decref(ids)  # head-first order
    assert a.alloc(1) == [ids[-1]]


def test_vectorised_refcounts_on_large_tables():
    a = BlockAllocator(10_000)
    ids = np.array(a.alloc(5_000))
    for _ in range(3):
        a.incref(ids)
    assert (a.refcount[ids] == 4).all()
    for _ in range(4):
        a.decref(ids)
    assert a.num_used == 0


# -- two tiers: swap --------------------------------------------------------------------

def mapped_counts(a: BlockAllocator, *tables) -> np.ndarray:
    counts = np.zeros(len(a.refcount), dtype=np.int64)
    for t in tables:
        np.add.at(counts, np.asarray(t, dtype=np.int64), 1)
    return counts


def test_swap_moves_pages_between_tiers_keeping_ids():
    a = BlockAllocator(4, num_host_blocks=4)
    pages = a.alloc(3)
    a.incref(pages[:2])  # shared with a fork: the fork follows the page to the host
    slots = a.slot[pages].tolist()
    out = a.swap_out(pages[:2])
    assert [d for d, _ in out] == slots[:2]
    assert (a.tier[pages[:2]] == HOST).all() and a.device.num_free == 3 and a.host.num_used == 2
    a.check(mapped_counts(a, pages, pages[:2]))
    back = a.swap_in(pages[:2])
    assert [h for h, _ in back] == [h for _, h in out]
    assert (a.tier[pages] == DEVICE).all() and a.host.num_used == 0
    a.check(mapped_counts(a, pages, pages[:2]))


def test_swap_needs_room_and_changes_nothing_without_it():
    a = BlockAllocator(4, num_host_blocks=1)
    pages = a.alloc(2)
    with pytest.raises(OutOfBlocks):
        a.swap_out(pages)
    assert (a.tier[pages] == DEVICE).all() and a.host.num_free == 1
    a.swap_out(pages[:1])
    a.alloc(3)  # the device is full now
    with pytest.raises(OutOfBlocks):
        a.swap_in(pages[:1])
    assert a.tier[pages[0]] == HOST


def test_freeing_a_host_page_frees_its_host_slot():
    a = BlockAllocator(2, num_host_blocks=2)
    pages = a.alloc(2)
    a.swap_out(pages)
    assert a.decref(pages) == 2
    assert a.host.num_used == 0 and a.device.num_used == 0
    a.check(mapped_counts(a))


# -- prefix cache -----------------------------------------------------------------------

def test_cached_pages_wait_in_lru_and_are_evicted_oldest_first():
    a = BlockAllocator(4)
    first, second = a.alloc(1), a.alloc(1)
    a.register(first[0], b"first")
    a.register(second[0], b"second")
    a.decref(first)
    a.decref(second)
    assert list(a.lru) == [first[0], second[0]] and a.num_used == 0 and a.num_free == 4
    a.check(mapped_counts(a))
    a.alloc(3)  # two free slots and one eviction: the older page goes
    assert a.lookup(b"first") is None and a.lookup(b"second") == second[0]
    a.revive(second[0])  # a hit maps it again
    assert a.refcount[second[0]] == 1 and not a.lru
    assert not a.can_alloc(1)


def test_only_the_canonical_page_of_a_digest_is_kept():
    a = BlockAllocator(4)
    p, q = a.alloc(2)
    a.register(p, b"d")
    a.register(q, b"d")  # same content computed twice: p stays the cached copy
    assert a.lookup(b"d") == p
    a.decref([q])
    assert not a.lru and a.device.num_used == 1  # q was freed outright
    a.forget(p)  # about to be overwritten
    assert a.lookup(b"d") is None
    a.decref([p])
    assert a.num_used == 0 and not a.lru
    a.check(mapped_counts(a))


def test_digest_chain_depends_on_the_whole_prefix():
    x, y = array("i", [1, 2, 3, 4]), array("i", [5, 6, 7, 8])
    assert block_digest(ROOT_DIGEST, x) == block_digest(ROOT_DIGEST, array("i", [1, 2, 3, 4]))
    assert block_digest(block_digest(ROOT_DIGEST, x), y) != block_digest(
        block_digest(ROOT_DIGEST, y), y)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "incref", "decref", "out", "in", "reg"]),
                          st.integers(0, 7)), max_size=60))
def test_random_operations_keep_every_invariant(ops):
    """Any sequence of allocator operations keeps the tiers, LRU and counts consistent."""
    a = BlockAllocator(6, num_host_blocks=5)
    refs: list[int] = []  # one entry per reference held
    for op, x in ops:
        live = sorted(set(refs))
        if op == "alloc" and a.can_alloc(x % 3 + 1):
            refs += a.alloc(x % 3 + 1)
        elif op == "incref" and live:
            refs.append(live[x % len(live)])
            a.incref([refs[-1]])
        elif op == "decref" and refs:
            a.decref([refs.pop(x % len(refs))])
        elif op == "out":
            dev = [p for p in live if a.tier[p] == DEVICE][: x % 3 + 1]
            if dev and len(dev) <= a.host.num_free:
                a.swap_out(dev)
        elif op == "in":
            host = [p for p in live if a.tier[p] == HOST][: x % 3 + 1]
            if host and a.can_alloc(len(host)):
                a.swap_in(host)
        elif op == "reg" and live:
            a.register(live[x % len(live)], bytes([x % 3]))
        a.check(mapped_counts(a, refs))
    a.decref(refs) if len(set(refs)) == len(refs) else [a.decref([r]) for r in refs]
    a.check(mapped_counts(a))
    assert a.num_used == 0 and a.host.num_used == 0
