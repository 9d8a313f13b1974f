"""The Triton paged-attention kernels against the torch reference, under Triton's interpreter.

There is no GPU in CI, so the kernels run with TRITON_INTERPRET=1 (numpy on CPU tensors).
That flag is read when a kernel is decorated, and it slows every kernel down, so the
checks run in one subprocess that sets it before importing anything: the pytest process
keeps its own triton state whatever else it ran. This file is that subprocess's script too
(`python tests/test_triton_attention.py` runs every check and prints a JSON line of
results); each test asserts one check's result.

Every check compares against attention.py's torch functions on tiny shapes. The K/V pool
is block-major with two layers (the caches are strided views of layer 1), block 0 is only
ever padding, and the kernels read a copy of the pool where block 0 and every slot past a
sequence's end hold NaN: a kernel that reads a masked slot fails, instead of multiplying
zeros by zero. The `test` extra installs triton on Linux, where a missing triton fails
these tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

import pytest

CHECKS = {}  # name -> function running under the interpreter; returns None or "skip: why"
DEVICE = "cpu"  # where the checks' tensors live: `--device cuda` runs them compiled on a GPU


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------- fixtures


def seeded(seed: int):
    """A seeded generator on the checks' device (the default device in `--device` runs)."""
    import torch

    return torch.Generator(device=DEVICE).manual_seed(seed)


class Pool:
    """A two-layer block-major KV pool with shuffled tables; block 0 is never mapped."""

    def __init__(self, num_blocks: int, block_size: int, kvh: int, d: int, dtype, seed: int = 0):
        import torch

        gen = seeded(seed)
        self.block_size = block_size
        self.kv = torch.randn(num_blocks, 2, 2, block_size, kvh, d, generator=gen).to(dtype)
        self.kv[0] = 0
        self.poisoned = self.kv.clone()
        self.poisoned[0] = float("nan")
        self.free_ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()

    def alloc(self, n_tokens: int, prefix: list[int] = ()) -> list[int]:
        """A table for n_tokens: the given prefix blocks, then fresh ones; the slots past
        n_tokens in its last block are poisoned."""
        bs = self.block_size
        ids = list(prefix) + [self.free_ids.pop() for _ in range(-(-n_tokens // bs) - len(prefix))]
        if n_tokens % bs:
            self.poisoned[ids[-1], :, :, n_tokens % bs :] = float("nan")
        return ids

    def caches(self, poisoned: bool):
        kv = self.poisoned if poisoned else self.kv
        return kv[:, 1, 0], kv[:, 1, 1]


def padded(tables: list[list[int]]):
    import torch

    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


def close(actual, expected, dtype) -> None:
    import torch

    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert not actual.isnan().any(), "NaN in the output: a masked slot was read"
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def decode_case(G: int, bs: int, dtype, lens=(1, 5, 16, 37, 100), kvh: int = 2, d: int = 64,
                seed: int = 0):
    """(pool, q [B, H, D], tables [B, W], ctx lens [B]) for decodes of the given lengths."""
    import torch

    pool = Pool(64, bs, kvh, d, dtype, seed)
    tables = padded([pool.alloc(n) for n in lens])
    q = torch.randn(len(lens), kvh * G, d, generator=seeded(seed + 1)).to(dtype)
    return pool, q, tables, torch.tensor(lens, dtype=torch.long)


def decode_meta(tables, ctx):
    import torch

    from agentos.kernel.runner.attention import AttnMeta

    B = len(ctx)
    return AttnMeta(slot_mapping=torch.zeros(B, dtype=torch.long), num_decodes=B,
                    decode_block_tables=tables, decode_ctx_lens=ctx)


def reference_lse(q, k_cache, tables, ctx, scale):
    """Natural-log LSE [B, H] of each decode query over its context, in fp64."""
    import torch

    from agentos.kernel.runner.attention import gather_blocks

    B, H, D = q.shape
    G = H // k_cache.shape[2]
    k = gather_blocks(k_cache, tables).double().repeat_interleave(G, dim=2)  # [B, L, H, D]
    s = torch.einsum("bhd,blhd->bhl", q.double(), k) * scale
    s = s.masked_fill(torch.arange(k.shape[1])[None, None, :] >= ctx[:, None, None], float("-inf"))
    return torch.logsumexp(s, dim=-1)


# --------------------------------------------------------------------------- checks


@check
def decode_fp32():
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T

    for G in (1, 2, 4):
        for bs in (16, 32):
            pool, q, tables, ctx = decode_case(G, bs, torch.float32, seed=G + bs)
            ref = A._decode(q, *pool.caches(False), decode_meta(tables, ctx), 0.125)
            # splits: automatic, none, several (incl. empty ones for short rows); key tiles
            # smaller than, equal to and larger than a block
            for splits, block_n in ((None, None), (1, 16), (3, 32)):
                out = T.decode(q, *pool.caches(True), tables, ctx, 0.125, num_splits=splits,
                               block_n=block_n)
                close(out, ref, torch.float32)


@check
def decode_lse_and_odd_groups():
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T

    for G, splits in ((3, 1), (3, 4), (4, 2)):  # G = 3: groups that are not a power of two
        pool, q, tables, ctx = decode_case(G, 16, torch.float32, lens=(7, 64, 90), seed=G)
        k_cache, v_cache = pool.caches(False)
        ref = A._decode(q, k_cache, v_cache, decode_meta(tables, ctx), 0.125)
        out = torch.empty(q.shape)
        lse = torch.empty(q.shape[:2])
        T.decode(q, *pool.caches(True), tables, ctx, 0.125, out=out, lse=lse, num_splits=splits,
                 block_n=16)
        close(out, ref, torch.float32)
        close(lse, reference_lse(q, k_cache, tables, ctx, 0.125), torch.float32)


def cascade_case(dtype, G: int, bs: int, seed: int):
    """Six decodes: rows 0, 2, 3 share a 4-block prefix, rows 1, 4 a 5-block one, row 5
    none; the meta is built as runner.py builds it (tables and lengths past the prefix).
    Returns (pool, q, cascade meta, plain meta over the whole tables)."""
    import torch

    from agentos.kernel.runner.attention import SharedPrefix

    pool = Pool(96, bs, 2, 64, dtype, seed)
    groups = {0: pool.alloc(4 * bs), 1: pool.alloc(5 * bs)}
    lens = [4 * bs + 3, 5 * bs + 1, 4 * bs + bs, 6 * bs + 7, 5 * bs + 2 * bs + 9, 3 * bs + 5]
    owner = [0, 1, 0, 0, 1, None]
    full = [pool.alloc(n, groups[g] if g is not None else ()) for n, g in zip(lens, owner)]
    skip = [len(groups[g]) if g is not None else 0 for g in owner]
    q = torch.randn(len(lens), 2 * G, 64, generator=seeded(seed)).to(dtype)
    meta = decode_meta(padded([t[s:] for t, s in zip(full, skip)]),
                       torch.tensor([n - s * bs for n, s in zip(lens, skip)]))
    for g in (0, 1):
        rows = [i for i, o in enumerate(owner) if o == g]
        meta.shared.append(SharedPrefix(torch.tensor(rows), torch.tensor(groups[g])))
    return pool, q, meta, decode_meta(padded(full), torch.tensor(lens))


@check
def decode_cascade_fp32():
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T
    from agentos.kernel.runner.attention import SharedPrefix

    for G, bs in ((1, 16), (4, 16), (2, 32)):
        pool, q, meta, plain = cascade_case(torch.float32, G, bs, seed=G)
        ref = A._decode(q, *pool.caches(False), plain, 0.125)
        close(A._decode_cascade(q, *pool.caches(False), meta, 0.125), ref, torch.float32)
        out = T.paged_attention(q, *pool.caches(True), meta, 0.125)
        close(out, ref, torch.float32)
    # one prefix shared by the whole batch (no row indexing): the rows of the first group
    pool, q, meta, plain = cascade_case(torch.float32, 2, 16, seed=5)
    sp = meta.shared[0]
    every = decode_meta(meta.decode_block_tables[sp.rows], meta.decode_ctx_lens[sp.rows])
    every.shared = [SharedPrefix(torch.arange(len(sp.rows)), sp.block_table)]
    ref = A._decode(q[sp.rows], *pool.caches(False),
                    decode_meta(plain.decode_block_tables[sp.rows], plain.decode_ctx_lens[sp.rows]), 0.125)
    close(T.paged_attention(q[sp.rows], *pool.caches(True), every, 0.125), ref, torch.float32)


@check
def split_counts():
    """The split-K heuristic on an H100 (132 SMs): batch 1 at 32k context fills the GPU,
    a full batch or a short context is not split."""
    import torch

    from agentos.kernel.runner import triton_attention as T

    real, T._num_sms = T._num_sms, lambda device: 132
    try:
        cuda = torch.device("cuda")
        tiles = 32768 // 64
        assert T._num_splits(1 * 8, tiles, cuda) == 33  # 264 programs: two per SM
        assert T._num_splits(1 * 2, tiles, cuda) == T.MAX_SPLITS
        assert T._num_splits(64 * 8, tiles, cuda) == 1
        assert T._num_splits(1 * 8, 8, cuda) == 8 // T.MIN_TILES_PER_SPLIT
        assert T._num_splits(1 * 8, 2, cuda) == 1
    finally:
        T._num_sms = real


def prefill_case(dtype, G: int, bs: int, specs, seed: int, kvh: int = 2, d: int = 64):
    """Prefill chunks (q_len, ctx_len) one after another in the batch: (pool, q [T, H, D],
    [PrefillChunk])."""
    import torch

    from agentos.kernel.runner.attention import PrefillChunk

    pool = Pool(96, bs, kvh, d, dtype, seed)
    chunks, q_start = [], 0
    for n, ctx in specs:
        chunks.append(PrefillChunk(q_start, n, ctx, torch.tensor(pool.alloc(ctx))))
        q_start += n
    q = torch.randn(q_start, kvh * G, d, generator=seeded(seed)).to(dtype)
    return pool, q, chunks


def prefill_reference(q, pool, chunks, scale, window=None):
    from agentos.kernel.runner import attention as A

    out = q.new_zeros(q.shape)
    for c in chunks:
        out[c.q_start : c.q_start + c.q_len] = A._prefill(q[c.q_start : c.q_start + c.q_len],
                                                          *pool.caches(False), c, scale, window)
    return out


def run_prefill(q, pool, chunks, scale, window=None, **tiles):
    import torch

    from agentos.kernel.runner import triton_attention as T

    tables = padded([c.block_table.tolist() for c in chunks])
    info = torch.tensor([[c.q_start, c.q_len, c.ctx_len] for c in chunks])
    return T.prefill(q, *pool.caches(True), tables, info, max(c.q_len for c in chunks), scale,
                     out=q.new_zeros(q.shape), window=window, **tiles)


# chunks: cached context before the chunk (start > 0, also mid-block), a whole prompt
# (start == 0), a lone token, and one spanning many blocks
PREFILL_SPECS = [(20, 53), (37, 37), (1, 40), (9, 100)]


@check
def prefill_fp32():
    import torch

    for G in (1, 2, 4):
        for bs in (16, 32):
            pool, q, chunks = prefill_case(torch.float32, G, bs, PREFILL_SPECS, seed=G + bs)
            ref = prefill_reference(q, pool, chunks, 0.125)
            # the default tiles, and small ones: many query tiles and diagonal key tiles
            for tiles in ({}, dict(block_m=16, block_n=16), dict(block_m=32, block_n=64)):
                close(run_prefill(q, pool, chunks, 0.125, **tiles), ref, torch.float32)


@check
def sliding_window():
    """Windows narrower than a key tile, across tile and block edges, and wider than every
    context: decodes (with and without splits) and prefill chunks (with cached context,
    whole prompts, tiles where some rows see nothing yet) equal the torch path's mask."""
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T

    for window in (1, 5, 16, 17, 40, 1000):
        pool, q, tables, ctx = decode_case(2, 16, torch.float32, seed=window)
        ref = A._decode(q, *pool.caches(False), decode_meta(tables, ctx), 0.125, window)
        for splits, block_n in ((None, None), (1, 16), (3, 16), (2, 32)):
            out = T.decode(q, *pool.caches(True), tables, ctx, 0.125, num_splits=splits,
                           block_n=block_n, window=window)
            close(out, ref, torch.float32)
        for G in (1, 4):
            pool, q, chunks = prefill_case(torch.float32, G, 16, PREFILL_SPECS, seed=window + G)
            ref = prefill_reference(q, pool, chunks, 0.125, window)
            for tiles in ({}, dict(block_m=16, block_n=16), dict(block_m=32, block_n=32)):
                close(run_prefill(q, pool, chunks, 0.125, window=window, **tiles), ref,
                      torch.float32)


@check
def prefill_odd_groups_and_head_dims():
    import torch

    for G, d in ((3, 64), (2, 128), (4, 32)):
        pool, q, chunks = prefill_case(torch.float32, G, 16, [(13, 29), (16, 16)], seed=G, d=d)
        ref = prefill_reference(q, pool, chunks, d ** -0.5)
        close(run_prefill(q, pool, chunks, d ** -0.5, block_m=16, block_n=16), ref, torch.float32)


@check
def half_precision():
    # fp16 through every kernel: the same code paths as bf16 (16-bit loads, p cast to the
    # value dtype for the second matmul, fp32 accumulation, cast on store)
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T

    dt = torch.float16
    pool, q, tables, ctx = decode_case(2, 16, dt)
    ref = A._decode(q.float(), *(c.float() for c in pool.caches(False)), decode_meta(tables, ctx), 0.125)
    for splits in (1, 3):
        out = T.decode(q, *pool.caches(True), tables, ctx, 0.125, num_splits=splits)
        assert out.dtype == dt
        close(out, ref, dt)
    pool, q, meta, plain = cascade_case(dt, 2, 16, seed=3)
    ref = A._decode(q.float(), *(c.float() for c in pool.caches(False)), plain, 0.125)
    close(T.paged_attention(q, *pool.caches(True), meta, 0.125), ref, dt)
    pool, q, chunks = prefill_case(dt, 2, 16, PREFILL_SPECS, seed=4)
    pool.kv = pool.kv.float()
    ref = prefill_reference(q.float(), pool, chunks, 0.125)
    close(run_prefill(q, pool, chunks, 0.125, block_m=32, block_n=16), ref, dt)


@check
def bf16():
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a, out, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(a + i[:, None] * N + i[None, :])
        tl.store(out + i[:, None] * N + i[None, :], tl.dot(x, x))

    a = torch.eye(16, dtype=torch.bfloat16)
    out = torch.empty(16, 16)
    probe[(1,)](a, out, 16)
    if not torch.equal(out, torch.eye(16)):
        return ("skip: Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits "
                "(interpreter.py create_dot), so bf16 cannot be checked without a GPU; fp16 covers "
                "the same kernel code")
    from agentos.kernel.runner import triton_attention as T

    pool, q, tables, ctx = decode_case(2, 16, torch.bfloat16)
    from agentos.kernel.runner import attention as A

    ref = A._decode(q.float(), *(c.float() for c in pool.caches(False)), decode_meta(tables, ctx), 0.125)
    close(T.decode(q, *pool.caches(True), tables, ctx, 0.125, num_splits=2), ref, torch.bfloat16)


@check
def dispatch_mixed_step():
    """paged_attention picks the Triton path when told to, for a step of decodes (with a
    shared prefix) and prefill chunks, and matches the torch path."""
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner import triton_attention as T
    from agentos.kernel.runner.attention import AttnMeta, PrefillChunk

    pool, qd, dmeta, _ = cascade_case(torch.float32, 2, 16, seed=9)
    chunks, q_parts, q_start = [], [qd], len(qd)
    for n, ctx in ((7, 30), (12, 12)):
        chunks.append(PrefillChunk(q_start, n, ctx, torch.tensor(pool.alloc(ctx))))
        q_parts.append(torch.randn(n, *qd.shape[1:]))
        q_start += n
    q = torch.cat(q_parts)
    meta = AttnMeta(slot_mapping=torch.zeros(len(q), dtype=torch.long), num_decodes=len(qd),
                    decode_block_tables=dmeta.decode_block_tables,
                    decode_ctx_lens=dmeta.decode_ctx_lens, shared=dmeta.shared, prefills=chunks)
    if q.device.type == "cpu":
        assert A.BACKEND == "auto" and A._triton_kernels(q, pool.caches(False)[0]) is None
    A.BACKEND = "torch"
    try:
        ref = A.paged_attention(q, *pool.caches(False), meta, 0.125)
    finally:
        A.BACKEND = "auto"
    A.BACKEND = "triton"
    try:
        assert A._triton_kernels(q, pool.caches(False)[0]) is T
        out = A.paged_attention(q, *pool.caches(True), meta, 0.125)
        out_again = A.paged_attention(q, *pool.caches(True), meta, 0.125)  # prepared tensors reused
    finally:
        A.BACKEND = "auto"
    close(out, ref, torch.float32)
    assert torch.equal(out, out_again)


@check
def tiny_model_end_to_end():
    """The embedded tiny model (4 layers, GQA 8/4, head_dim 32): a prompt in two chunks
    beside another session's prompt, then a step of decodes, on both paths."""
    import torch

    from agentos.kernel.runner import attention as A
    from agentos.kernel.runner.attention import AttnMeta, PrefillChunk
    from agentos.kernel.runner.loader import load_model

    with torch.device("cpu"):  # the embedded weights come from a seeded CPU generator
        model, cfg, _ = load_model("tiny", device=DEVICE, dtype=torch.float32)
    bs = 16
    gen = seeded(0)
    prompts = {"a": torch.randint(3, 250, (40,), generator=gen).tolist(),
               "b": torch.randint(3, 250, (22,), generator=gen).tolist()}
    ids_of = {"a": [5, 6, 7, 8], "b": [1, 2, 3, 4]}  # block ids, a session's table

    def step(kv, parts):  # parts: (seq, start, end) in order, decodes (one token) first
        ids, pos, slots, chunks, dec = [], [], [], [], []
        for seq, start, end in parts:
            table = torch.tensor(ids_of[seq][: -(-end // bs)])
            p = torch.arange(start, end)
            if end - start == 1 and not chunks:
                dec.append((table, end))
            else:
                chunks.append(PrefillChunk(len(ids), end - start, end, table))
            ids += prompts[seq][start:end]
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        meta = AttnMeta(slot_mapping=torch.cat(slots), num_decodes=len(dec), prefills=chunks)
        if dec:
            meta.decode_block_tables = padded([t.tolist() for t, _ in dec])
            meta.decode_ctx_lens = torch.tensor([n for _, n in dec])
        return model(torch.tensor(ids), torch.cat(pos), meta, kv, torch.arange(len(ids)))

    steps = [[("a", 0, 25), ("b", 0, 21)], [("a", 25, 39)], [("b", 21, 22), ("a", 39, 40)]]
    logits = {}
    for backend in ("torch", "triton"):
        A.BACKEND = backend
        kv = torch.zeros(10, cfg.num_layers, 2, bs, cfg.num_kv_heads, cfg.head_dim)
        try:
            logits[backend] = [step(kv, parts) for parts in steps]
        finally:
            A.BACKEND = "auto"
    for a, b in zip(logits["torch"], logits["triton"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def results() -> dict:
    if sys.platform != "linux" and importlib.util.find_spec("triton") is None:
        pytest.skip("the test extra installs triton on Linux only")
    env = dict(os.environ, TRITON_INTERPRET="1", AGENTOS_ATTENTION="auto")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the interpreter checks did not run (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernels(results, name):
    result = results[name]
    if result.startswith("skip: "):
        pytest.skip(result.removeprefix("skip: "))
    assert result == "ok", result


def test_cpu_path_does_not_import_triton():
    code = ("import sys, torch; import agentos, agentos.kernel.runner.model; "
            "from agentos.kernel.runner import attention as A; "
            "A.paged_attention(torch.zeros(1, 2, 16), torch.zeros(1, 16, 1, 16), "
            "torch.zeros(1, 16, 1, 16), A.AttnMeta(torch.zeros(1, dtype=torch.long), 1, "
            "torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)), 0.25); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AGENTOS_ATTENTION")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]


def main() -> None:
    """Runs the checks and prints {name: result} as JSON: on CPU tensors under Triton's
    interpreter (TRITON_INTERPRET=1 must be set), or compiled on a GPU with `--device cuda`
    (what scripts/gpu_check.sh runs). `--only a,b` runs those checks alone."""
    import argparse

    global DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    DEVICE = args.device
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    else:
        import torch

        torch.set_default_device(DEVICE)
    names = args.only.split(",") if args.only else list(CHECKS)
    out = {}
    for name, fn in ((n, CHECKS[n]) for n in names):
        t0 = time.perf_counter()
        try:
            out[name] = fn() or "ok"
        except Exception:
            out[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()


def test_a_failing_kernel_hands_over_to_torch_for_good(monkeypatch):
    """Under AGENTOS_ATTENTION=auto, a Triton failure (say a kernel that does not compile
    for the GPU) is answered by the torch path, this call and every later one."""
    import torch

    from agentos.kernel.runner import attention

    calls = []

    class Failing:
        def paged_attention(self, *args):
            calls.append(1)
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(attention, "BACKEND", "auto")
    monkeypatch.setattr(attention, "_TRITON_OFF", False)
    monkeypatch.setattr(attention, "_triton_kernels",
                        lambda q, k: None if attention._TRITON_OFF else Failing())
    k = torch.randn(4, 16, 2, 8)
    v = torch.randn(4, 16, 2, 8)
    q = torch.randn(2, 4, 8)
    meta = attention.AttnMeta(slot_mapping=torch.tensor([5, 20]), num_decodes=2,
                              decode_block_tables=torch.tensor([[0, 0], [1, 2]]),
                              decode_ctx_lens=torch.tensor([6, 21]))
    want = attention._decode(q, k, v, meta, 0.3)
    for _ in range(2):
        assert torch.equal(attention.paged_attention(q, k, v, meta, 0.3), want)
    assert calls == [1] and attention._TRITON_OFF
