import numpy as np
import pytest

from agentos.kernel.kalloc import BlockAllocator, OutOfBlocks


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
