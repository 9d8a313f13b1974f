import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agentos.kernel.kalloc import BlockAllocator
from agentos.kernel.vm import VM, PageTable


def make(num_blocks=32, block_size=4):
    return VM(BlockAllocator(num_blocks), block_size)


def test_prepare_write_allocates_blocks():
    vm = make()
    t = PageTable()
    assert vm.prepare_write(t, 0, 10) == []
    assert t.num_blocks == 3
    vm.check([t])


def test_fork_shares_every_block_without_copying():
    vm = make()
    t = PageTable()
    vm.prepare_write(t, 0, 10)
    used = vm.kalloc.num_used
    child = vm.fork(t)
    assert np.array_equal(child.block_ids, t.block_ids)
    assert vm.kalloc.num_used == used
    vm.check([t, child])


def test_copy_on_write_of_shared_tail_only():
    vm = make()
    t = PageTable()
    vm.prepare_write(t, 0, 10)  # blocks for positions 0..9; tail block half full
    child = vm.fork(t)
    copies = vm.prepare_write(child, 10, 11)  # child writes into the shared tail
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == t.block_ids[-1] and dst == child.block_ids[-1] and src != dst
    assert np.array_equal(child.block_ids[:2], t.block_ids[:2])  # full blocks still shared
    assert vm.prepare_write(t, 10, 11) == []  # the parent is the last owner now: no copy
    vm.check([t, child])


def test_prepare_write_out_of_blocks_changes_nothing():
    vm = make(num_blocks=3)
    t = PageTable()
    vm.prepare_write(t, 0, 8)
    child = vm.fork(t)
    before = (vm.kalloc.refcount.copy(), child.block_ids.copy())
    assert vm.prepare_write(child, 4, 16) is None  # needs 1 copy + 2 new, 1 free
    assert (vm.kalloc.refcount == before[0]).all()
    assert np.array_equal(child.block_ids, before[1])
    vm.check([t, child])


def test_truncate_and_free():
    vm = make()
    t = PageTable()
    vm.prepare_write(t, 0, 16)
    vm.truncate(t, 5)
    assert t.num_blocks == 2
    vm.free(t)
    assert vm.kalloc.num_used == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "fork", "free"]), st.integers(0, 5),
                          st.integers(1, 9)), max_size=40))
def test_random_operations_keep_refcounts_exact(ops):
    vm = make(num_blocks=64)
    tables = [PageTable()]
    lengths = [0]
    for op, i, n in ops:
        i %= len(tables)
        if op == "write":
            if vm.prepare_write(tables[i], lengths[i], lengths[i] + n) is not None:
                lengths[i] += n
        elif op == "fork":
            tables.append(vm.fork(tables[i]))
            lengths.append(lengths[i])
        elif op == "free" and len(tables) > 1:
            vm.free(tables.pop(i))
            lengths.pop(i)
        vm.check(tables)
    for t in tables:
        vm.free(t)
    assert vm.kalloc.num_used == 0


def test_remap_moves_only_the_differing_tail():
    vm = make()
    t = PageTable()
    vm.prepare_write(t, 0, 10)
    snap = vm.fork(t)
    vm.prepare_write(t, 10, 20)  # copies the shared tail, adds blocks
    vm.remap(t, snap)
    assert np.array_equal(t.block_ids, snap.block_ids)
    vm.check([t, snap])
    other = PageTable()
    vm.prepare_write(other, 0, 30)
    vm.remap(t, other)  # nothing in common
    assert np.array_equal(t.block_ids, other.block_ids)
    vm.check([t, snap, other])
