"""The C++ paged decode attention of the CPU (kernel/runner/cpu_kernels.py) against the
torch path it replaces: same outputs for every shape and option the models use, bad tables
refused, and the torch path kept when the kernel cannot be built."""

import logging
import subprocess

import pytest
import torch

from agentos.kernel.runner import attention, cpu_kernels
from agentos.kernel.runner.attention import AttnMeta, paged_attention


def _case(B, H, KVH, D, bs, num_blocks, dtype, seed=0):
    """Caches as per-layer views of a block-major pool (strided between blocks), random
    permuted block tables padded with 0 past each length, and random lengths."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(B * num_blocks + 3, 2, 2, bs, KVH, D, generator=g).to(dtype)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    tables = torch.randperm(pool.shape[0], generator=g)[: B * num_blocks].view(B, num_blocks)
    lens = torch.randint(1, num_blocks * bs + 1, (B,), generator=g)
    lens[0] = num_blocks * bs  # one row fills its table
    for b in range(B):
        tables[b, -(-int(lens[b]) // bs):] = 0
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def _torch_decode(monkeypatch, q, k_cache, v_cache, tables, lens, scale, window, cap):
    with monkeypatch.context() as m:
        m.setattr(attention, "BACKEND", "torch")
        meta = AttnMeta(slot_mapping=torch.zeros(len(q), dtype=torch.long),
                        num_decodes=len(q), decode_block_tables=tables, decode_ctx_lens=lens)
        return paged_attention(q, k_cache, v_cache, meta, scale, window, cap)


def test_builds_here():
    """The machines this runs on have a C++ compiler: the fast path is the one tested."""
    assert cpu_kernels.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 4, 32, 16, 9),  # B, H, KVH, D, block, blocks
                                   (5, 4, 4, 64, 8, 7),  # no grouping
                                   (2, 14, 2, 80, 32, 4),  # odd head dim, G = 7
                                   (2, 14, 2, 64, 16, 5),  # G = 7 (Qwen2.5-0.5B's heads)
                                   (3, 12, 4, 128, 16, 6),  # G = 3
                                   (1, 8, 1, 128, 16, 70),  # one row: split into ranges
                                   (2, 4, 2, 256, 16, 40),
                                   (4, 16, 4, 64, 16, 12)])  # G = 4
@pytest.mark.parametrize("window,cap", [(None, None), (7, None), (None, 5.0), (37, 2.0)])
def test_decode_equals_torch_path(dtype, shape, window, cap, monkeypatch):
    B, H, KVH, D, bs, blocks = shape
    q, k, v, tables, lens = _case(B, H, KVH, D, bs, blocks, dtype)
    assert cpu_kernels.supports(q, k, v)
    want = _torch_decode(monkeypatch, q, k, v, tables, lens, D ** -0.5, window, cap)
    got = cpu_kernels.decode(q, k, v, tables, lens, D ** -0.5, window, cap)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_split_ranges_do_not_change_the_result(threads, monkeypatch):
    """However many threads cut a long context into ranges, the merge gives the same output
    (to rounding) as one range."""
    q, k, v, tables, lens = _case(1, 8, 2, 32, 16, 80, torch.float32, seed=3)
    monkeypatch.setattr(cpu_kernels, "MIN_SPLIT_TOKENS", 10**9)  # one range
    one = cpu_kernels.decode(q, k, v, tables, lens, 0.2)
    monkeypatch.setattr(cpu_kernels, "MIN_SPLIT_TOKENS", 16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = cpu_kernels.decode(q, k, v, tables, lens, 0.2)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(split, one, atol=1e-6, rtol=1e-6)


def test_paged_attention_takes_it_on_cpu(monkeypatch):
    """Decodes on CPU go through the C++ kernel; AGENTOS_ATTENTION=torch keeps them off it;
    a cascade (shared prefixes) stays on the torch path."""
    calls = []
    real = cpu_kernels.decode
    monkeypatch.setattr(cpu_kernels, "decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, tables, lens = _case(2, 4, 2, 16, 4, 5, torch.float32)
    meta = AttnMeta(slot_mapping=torch.zeros(2, dtype=torch.long), num_decodes=2,
                    decode_block_tables=tables, decode_ctx_lens=lens)
    paged_attention(q, k, v, meta, 0.25)
    assert calls == [1]
    monkeypatch.setattr(attention, "BACKEND", "torch")
    paged_attention(q, k, v, meta, 0.25)
    assert calls == [1]


@pytest.mark.parametrize("bad", ["length past the table", "zero length", "block past the pool",
                                 "negative block"])
def test_bad_tables_raise_and_read_nothing(bad):
    q, k, v, tables, lens = _case(2, 4, 2, 16, 4, 5, torch.float32)
    if bad == "length past the table":
        lens[1] = 5 * 4 + 1
    elif bad == "zero length":
        lens[1] = 0
    elif bad == "block past the pool":
        tables[0, 0] = k.shape[0]
    else:
        tables[0, 2] = -1
    with pytest.raises(IndexError):
        cpu_kernels.decode(q, k, v, tables, lens, 0.25)


def test_unsupported_layouts_are_declined():
    q, k, v, _, _ = _case(1, 4, 2, 16, 4, 3, torch.float32)
    assert not cpu_kernels.supports(q.half(), k.half(), v.half())  # no fp16 kernel
    assert not cpu_kernels.supports(q, k.transpose(1, 2), v.transpose(1, 2))  # head-major
    assert not cpu_kernels.supports(q[:, :, :8], k, v)  # head dims differ
    assert not cpu_kernels.supports(q, k, v.bfloat16())  # V's dtype differs
    assert not cpu_kernels.supports(q[:0], k, v)  # no decodes


def test_failed_build_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    """No working compiler: one warning, available() is False and decode attention runs
    on the torch path (the engine keeps working)."""
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("AGENTOS_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, "agentos.attention"):
            assert not cpu_kernels.available()
        assert "unavailable" in caplog.text
        q, k, v, tables, lens = _case(2, 4, 2, 16, 4, 5, torch.float32)
        meta = AttnMeta(slot_mapping=torch.zeros(2, dtype=torch.long), num_decodes=2,
                        decode_block_tables=tables, decode_ctx_lens=lens)
        out = paged_attention(q, k, v, meta, 0.25)
        assert out.shape == q.shape and torch.isfinite(out).all()
        assert not list(tmp_path.glob("*.so"))
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.available()


def test_build_is_cached(tmp_path, monkeypatch):
    """A second build of the same source for the same compiler and CPU compiles nothing."""
    monkeypatch.setenv("AGENTOS_KERNEL_CACHE", str(tmp_path))
    first = cpu_kernels._build()
    assert first.parent == tmp_path and first.exists()

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_kernels._build() == first
