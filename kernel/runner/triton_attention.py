"""Paged attention in Triton: the fast path of `attention.paged_attention` on CUDA.

Same contract as the torch reference in attention.py (which stays the CPU path and the
judge of correctness): K/V per layer are strided views `[num_blocks, block_size, KVH, D]`
of the block-major pool, read through block tables; the step's decodes come first, then
its prefill chunks.

Kernels and tiling (written for Hopper, H100/H200; untuned there, see the NOTEs):

- One inner loop, `_attend`, for everything: a tile of query rows against BLOCK_N keys at
  a time, flash-attention online softmax in fp32 (exp2, with scale * log2(e) folded into
  the scores). Keys are gathered through the block table one key per lane (the block id
  of key j is `table[j // block_size]`), so BLOCK_N and the page size are independent.
  The loop runs twice: first over tiles that need no mask at all (every key valid and
  visible to every row), then over the at most few tiles at the end that do.
- Grouped-query attention: a program owns one kv head and the query rows of all its G
  query heads (row r is query r // G, head kv_head * G + r % G), so each K/V tile is
  loaded once for the whole group and the scores are one tensor-core matmul.
- Decode (`decode`): one program per (sequence, row tile, kv head, split). Split-K
  (flash-decoding): when sequences * kv heads would not fill the SMs (batch 1 at 32k
  context has 8 programs for 132 SMs), each sequence's tiles are divided among several
  programs that write partial (acc, max, sum); `_reduce_kernel` merges them. With one
  split the kernel writes the final output directly (no second launch). The same kernel
  with n queries per sequence serves a shared prefix of the cascade: n rows times G
  heads attend to the prefix's blocks in one pass, and the merge with each row's suffix
  by log-sum-exp happens in torch.
- Prefill (`prefill`): every chunk of the step in one launch, grid (query tile, kv head,
  chunk); a query tile is BLOCK_M // G tokens times G heads. Tiles strictly below the
  diagonal run unmasked; tiles past the chunk's end exit at once.

No host synchronisation anywhere: split counts come from the table width (a host-side
shape), never from context lengths on the device, and a decode-only step allocates only
the split partials, so it can be captured in a CUDA graph (cuda_graphs.py) once its
warm-up runs have compiled the kernels.

Dtypes fp16/bf16 (fp32 accumulation) and fp32 (exact "ieee" dots, not tf32: fp32 exists
for the reference comparisons). Head dims are powers of two from 16 to 256; anything else
falls back to torch (`supports`). Every index that can exceed 2^31 (block id times block
stride in a pool of many layers) is computed in int64.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from agentos.kernel.runner.attention import AttnMeta

# NOTE: read when the kernels below are decorated: under TRITON_INTERPRET=1 they are
# interpreted on CPU tensors (numpy), which is how the tests run them without a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same, as a constant inside kernels
MAX_SPLITS = 64  # decode splits per sequence at most
MIN_TILES_PER_SPLIT = 4  # a split below this many key tiles costs more to merge than it saves
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, or any device when the
    kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if INTERPRET:
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels handle these shapes, dtypes and layouts (else use torch)."""
    D = q.shape[-1]
    H, KVH = q.shape[1], k_cache.shape[2]
    return (
        q.dtype in _DTYPES and k_cache.dtype == q.dtype
        and 16 <= D <= 256 and D & (D - 1) == 0
        and H % KVH == 0 and H // KVH <= 64
        and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    )


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    # NOTE: from exp2, not libdevice's tanh, which Triton's interpreter (the tests) lacks;
    # exp2 of -2|x| never overflows, and the sign is restored exactly
    t = tl.exp2(tl.abs(x) * (-2.0 * LOG2E_C))  # exp(-2|x|)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attend(acc, m_i, l_i, q, qpos, K, V, table, ctx_len, lo, hi, scale_log2, cap_log2, window,
            stride_kb, stride_kt, stride_vb, stride_vt,
            BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
            SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of query rows q [BLOCK_M, D] at positions qpos [BLOCK_M] over key
    tiles lo..hi-1 of one paged sequence. K, V point at the kv head; table at the
    sequence's block table. Without MASKED every key of every tile must exist and be
    visible to every row; with it, CAUSAL hides keys after a row's position and WINDOW
    those `window` or more before it. With SOFTCAP the scores are soft-capped (cap_log2 is
    the cap times log2(e), in the scores' base-2 units). Returns the updated (acc
    [BLOCK_M, D] fp32, m_i [BLOCK_M] base-2 max, l_i [BLOCK_M] sum)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for t in range(lo, hi):
        keys = t * BLOCK_N + offs_n
        if MASKED:
            valid = keys < ctx_len
            blocks = tl.load(table + keys // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            blocks = tl.load(table + keys // BLOCK_SIZE).to(tl.int64)
        within = keys % BLOCK_SIZE
        k_ptrs = K + (blocks * stride_kb + within * stride_kt)[None, :] + offs_d[:, None]  # [D, N]
        v_ptrs = V + (blocks * stride_vb + within * stride_vt)[:, None] + offs_d[None, :]  # [N, D]
        if MASKED:
            k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [M, N], base-2 logits
        if SOFTCAP:  # tanh(s / cap) * cap, the same in base-2 units
            s = cap_log2 * _tanh(s / cap_log2)
        if MASKED:
            visible = valid[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= qpos[:, None])
            if WINDOW:
                visible = visible & (keys[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if WINDOW:
            # a row can see nothing in a tile where the window of another row of the tile
            # starts: subtract 0 instead of its -inf max (no -inf - -inf), which leaves its
            # acc, max and sum untouched
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # every row has a finite max from its first tile on (key 0, or a valid key of a
            # decode split), so no -inf - -inf below
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(Q, K, V, Tables, CtxLens, Out, Lse, PartO, PartM, PartL,
                   scale_log2, cap_log2, window, num_queries,
                   stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                   stride_vh, stride_tab, stride_ot, stride_oh, stride_lt,
                   G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   HAS_LSE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                   PRECISION: tl.constexpr):
    # grid: (sequences * row tiles, kv heads, splits); rows = num_queries * G per kv head
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_rows = num_queries * G
    row_tiles = tl.cdiv(num_rows, BLOCK_M)
    seq = pid // row_tiles
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    tok = (seq * num_queries + rows // G).to(tl.int64)
    head = kvh * G + rows % G
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    ctx_len = tl.load(CtxLens + seq)
    num_tiles = tl.cdiv(ctx_len, BLOCK_N)
    full = ctx_len // BLOCK_N  # tiles with every key valid
    qpos = tl.zeros([BLOCK_M], dtype=tl.int64) + (ctx_len - 1)  # every row is the last token
    if WINDOW:
        first_key = tl.maximum(ctx_len - window, 0)  # the oldest key the window shows
    else:
        first_key = ctx_len * 0
    t0 = first_key // BLOCK_N  # the tile holding it, and the first tile it fills whole
    whole = tl.cdiv(first_key, BLOCK_N)
    # this split's share of the sequence's own tiles (balanced per sequence, so short rows
    # in a batch of long ones leave their extra splits empty rather than lopsided)
    lo = t0 + split * (num_tiles - t0) // NUM_SPLITS
    hi = t0 + (split + 1) * (num_tiles - t0) // NUM_SPLITS
    table = Tables + seq.to(tl.int64) * stride_tab
    Kh = K + kvh.to(tl.int64) * stride_kh
    Vh = V + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WINDOW:  # the tile where the window starts mid-tile
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len, lo,
                                tl.minimum(hi, whole), scale_log2, cap_log2, window,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, False, True, SOFTCAP, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len, tl.maximum(lo, whole),
                            tl.minimum(hi, full), scale_log2, cap_log2, window,
                            stride_kb, stride_kt, stride_vb, stride_vt,
                            BLOCK_N, BLOCK_SIZE, HEAD_DIM, False, False, False, SOFTCAP, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len,
                            tl.maximum(tl.maximum(lo, full), whole), hi, scale_log2, cap_log2, window,
                            stride_kb, stride_kt, stride_vb, stride_vt,
                            BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, False, WINDOW, SOFTCAP, PRECISION)

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if HAS_LSE:
            tl.store(Lse + tok * stride_lt + head, (m_i + tl.log2(l_i)) / LOG2E_C, mask=row_ok)
    else:
        # partials [S, KVH, NUM_SPLITS, rows (, D)], contiguous
        part = ((seq * tl.num_programs(1) + kvh) * NUM_SPLITS + split).to(tl.int64) * num_rows + rows
        tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PartM + part, m_i, mask=row_ok)
        tl.store(PartL + part, l_i, mask=row_ok)


@triton.jit
def _reduce_kernel(PartO, PartM, PartL, Out, Lse, num_queries, stride_ot, stride_oh, stride_lt,
                   G: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SPLITS_POW2: tl.constexpr, HAS_LSE: tl.constexpr):
    # grid: (sequences, rows, kv heads); merges one row's splits by their maxima
    seq = tl.program_id(0)
    row = tl.program_id(1)
    kvh = tl.program_id(2)
    num_rows = num_queries * G
    splits = tl.arange(0, SPLITS_POW2)
    ok = splits < NUM_SPLITS
    part = ((seq * tl.num_programs(2) + kvh) * NUM_SPLITS + splits).to(tl.int64) * num_rows + row
    m = tl.load(PartM + part, mask=ok, other=float("-inf"))
    l = tl.load(PartL + part, mask=ok, other=0.0)
    m_max = tl.max(m, 0)  # finite: a sequence's first split always has keys
    w = tl.exp2(m - m_max)  # 0 for empty splits (max -inf)
    l_sum = tl.sum(l * w, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / l_sum
    tok = (seq * num_queries + row // G).to(tl.int64)
    head = kvh * G + row % G
    tl.store(Out + tok * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))
    if HAS_LSE:
        tl.store(Lse + tok * stride_lt + head, (m_max + tl.log2(l_sum)) / LOG2E_C)


@triton.jit
def _prefill_kernel(Q, K, V, Tables, Chunks, Out, scale_log2, cap_log2, window,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                    stride_vh, stride_tab, stride_ot, stride_oh,
                    G: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (query tiles of the longest chunk, kv heads, chunks); Chunks [C, 3] int64 holds
    # (q_start, q_len, ctx_len) per chunk; a query tile is TOKENS = BLOCK_M // G tokens
    kvh = tl.program_id(1)
    c = tl.program_id(2)
    q_start = tl.load(Chunks + c * 3)
    q_len = tl.load(Chunks + c * 3 + 1)
    ctx_len = tl.load(Chunks + c * 3 + 2)
    # NOTE: tiles in reverse: the first programs scheduled take the last (longest, causal)
    # query tiles, so the short ones fill in behind them instead of leaving a long tail
    mt = tl.cdiv(q_len, TOKENS) - 1 - tl.program_id(0)
    if mt < 0:  # this chunk has fewer tiles than the longest one
        return
    rows = tl.arange(0, BLOCK_M)
    t = mt * TOKENS + rows // G  # token index within the chunk
    row_ok = (rows < TOKENS * G) & (t < q_len)
    start = ctx_len - q_len  # position of the chunk's first token
    qpos = start + t
    tok = q_start + t
    head = kvh * G + rows % G
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    first = start + mt * TOKENS  # the tile's smallest and largest query positions
    last = start + tl.minimum((mt + 1) * TOKENS, q_len) - 1
    full = (first + 1) // BLOCK_N  # tiles up to the first whose keys some row cannot see yet
    hi = tl.cdiv(last + 1, BLOCK_N)
    if WINDOW:
        # tiles from lo on hold keys some row sees; from whole on every row sees them all
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N
        whole = tl.maximum(lo, tl.minimum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N), full))
    else:
        lo = first * 0
        whole = lo
    table = Tables + c.to(tl.int64) * stride_tab
    Kh = K + kvh.to(tl.int64) * stride_kh
    Vh = V + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WINDOW:  # the tiles where the rows' windows start
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len, lo, whole,
                                scale_log2, cap_log2, window, stride_kb, stride_kt, stride_vb, stride_vt,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, True, True, SOFTCAP, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len, whole, full,
                            scale_log2, cap_log2, window, stride_kb, stride_kt, stride_vb, stride_vt,
                            BLOCK_N, BLOCK_SIZE, HEAD_DIM, False, True, False, SOFTCAP, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, qpos, Kh, Vh, table, ctx_len, tl.maximum(full, whole),
                            hi, scale_log2, cap_log2, window, stride_kb, stride_kt, stride_vb, stride_vt,
                            BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, True, WINDOW, SOFTCAP, PRECISION)
    out = acc / l_i[:, None]
    tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- launchers


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float, *,
           queries_per_seq: int = 1, out: torch.Tensor | None = None,
           lse: torch.Tensor | None = None, num_splits: int | None = None,
           block_n: int | None = None, window: int | None = None,
           cap: float | None = None) -> torch.Tensor:
    """Attention of queries at the end of paged sequences over all their cached tokens.

    q: [S * n, H, D], n = queries_per_seq consecutive queries per sequence (n = 1: one
    decode per row; n > 1: several rows against one shared prefix); block_tables [S, W]
    (padding beyond a sequence's blocks is never read); ctx_lens [S] (>= 1). Writes the
    output into `out` ([S * n, H, D], any float dtype, default a new tensor like q) and, if
    given, the natural-log log-sum-exp of each (query, head) into `lse` [S * n, H] fp32.
    With a `window`, each query sees only the `window` newest keys (n must be 1); with a
    `cap`, scores are soft-capped (tanh(s / cap) * cap, Gemma 2). num_splits / block_n
    override the split count and key tile (tests). Returns `out`.
    """
    T, H, D = q.shape
    S = block_tables.shape[0]
    KVH = k_cache.shape[2]
    G = H // KVH
    assert S * queries_per_seq == T and supports(q, k_cache), "unsupported decode shapes"
    if out is None:
        out = torch.empty_like(q)
    num_rows = queries_per_seq * G
    # NOTE: 16 rows is the smallest tensor-core tile; a lone decode with G = 4 wastes
    # 3/4 of it, which costs nothing here: decode is bound by reading K/V, not by math
    block_m = min(64, max(16, triton.next_power_of_2(num_rows)))
    row_tiles = triton.cdiv(num_rows, block_m)
    block_n, num_warps, num_stages = _decode_config(D, q.element_size(), block_n)
    max_tiles = triton.cdiv(block_tables.shape[1] * k_cache.shape[1], block_n)
    if window is not None:
        assert queries_per_seq == 1, "a window is per query: one query per sequence"
        max_tiles = min(max_tiles, triton.cdiv(window, block_n) + 1)
    splits = num_splits or _num_splits(S * row_tiles * KVH, max_tiles, q.device)
    parts = [q] * 3  # unused pointers when there is one split
    if splits > 1:
        parts = [q.new_empty(S, KVH, splits, num_rows, D, dtype=torch.float32),
                 q.new_empty(S, KVH, splits, num_rows, dtype=torch.float32),
                 q.new_empty(S, KVH, splits, num_rows, dtype=torch.float32)]
    lse_arg = lse if lse is not None else out
    lse_stride = lse.stride(0) if lse is not None else 0
    _decode_kernel[(S * row_tiles, KVH, splits)](
        q, k_cache, v_cache, block_tables, ctx_lens, out, lse_arg, *parts,
        scale * LOG2E, (cap or 0.0) * LOG2E, window or 0, queries_per_seq,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), lse_stride,
        G=G, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=D,
        NUM_SPLITS=splits, HAS_LSE=lse is not None, WINDOW=window is not None,
        SOFTCAP=cap is not None, PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _reduce_kernel[(S, num_rows, KVH)](
            *parts, out, lse_arg, queries_per_seq, out.stride(0), out.stride(1), lse_stride,
            G=G, HEAD_DIM=D, NUM_SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits),
            HAS_LSE=lse is not None, num_warps=4 if D >= 128 else 2,
        )
    return out


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            chunks: torch.Tensor, max_q_len: int, scale: float, *, out: torch.Tensor | None = None,
            block_m: int | None = None, block_n: int | None = None,
            window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """Causal attention of prefill chunks over their paged context, all chunks in one launch.

    q: [T, H, D]; chunks [C, 3] int64 rows (q_start, q_len, ctx_len): chunk c's queries are
    q[q_start : q_start + q_len], at positions ctx_len - q_len .. ctx_len - 1, and its
    context the first ctx_len tokens of block_tables[c] ([C, W]). max_q_len bounds q_len
    (it sizes the grid). With a `window`, a query sees only the `window` keys ending at
    its own position; with a `cap`, scores are soft-capped. Writes those rows of `out`
    (default a new tensor like q; other rows untouched) and returns it. block_m / block_n
    override the tiles (tests).
    """
    T, H, D = q.shape
    KVH = k_cache.shape[2]
    G = H // KVH
    assert supports(q, k_cache), "unsupported prefill shapes"
    if out is None:
        out = torch.empty_like(q)
    cfg_m, cfg_n, num_warps, num_stages = _prefill_config(D, q.element_size())
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    assert block_m >= G, "a query tile must hold every head of a group"
    tokens = block_m // G
    _prefill_kernel[(triton.cdiv(max_q_len, tokens), KVH, chunks.shape[0])](
        q, k_cache, v_cache, block_tables, chunks, out, scale * LOG2E, (cap or 0.0) * LOG2E,
        window or 0,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, TOKENS=tokens, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=D, WINDOW=window is not None, SOFTCAP=cap is not None,
        PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                    scale: float, window: int | None = None,
                    cap: float | None = None) -> torch.Tensor:
    """attention.paged_attention's contract (q: [T, H, D] -> [T, H, D], a sliding `window`
    or None, a soft-cap or None) on the Triton kernels; the caller checked `available` and
    `supports`."""
    out = torch.empty_like(q)
    prep = _prepare(meta, q.device, k_cache.shape[1])
    B = meta.num_decodes
    if B and not meta.shared:
        decode(q[:B], k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale,
               out=out[:B], window=window, cap=cap)
    elif B:
        assert window is None, "a sliding layer needs whole decode tables, not a cascade"
        out[:B] = _decode_cascade(q[:B], k_cache, v_cache, meta, prep.prefix_lens, scale, cap)
    if meta.prefills:
        prefill(q, k_cache, v_cache, prep.tables, prep.chunks, prep.max_q_len, scale, out=out,
                window=window, cap=cap)
    return out


def _decode_cascade(q, k_cache, v_cache, meta: AttnMeta, prefix_lens: list[torch.Tensor],
                    scale: float, cap: float | None = None) -> torch.Tensor:
    """Decode with shared prefixes (see attention._decode_cascade): each row's suffix, then
    each prefix once for all its rows, merged by log-sum-exp in fp32. q: [B, H, D]."""
    B, H, _ = q.shape
    o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale, out=o, lse=lse,
           cap=cap)
    for sp, plen in zip(meta.shared, prefix_lens):
        n = len(sp.rows)
        every = n == B  # one prefix shared by the whole batch: no row indexing
        qr = q if every else q.index_select(0, sp.rows)
        op = torch.empty(qr.shape, dtype=torch.float32, device=q.device)
        lp = torch.empty(n, H, dtype=torch.float32, device=q.device)
        decode(qr, k_cache, v_cache, sp.block_table[None], plen, scale, queries_per_seq=n,
               out=op, lse=lp, cap=cap)
        lr = lse if every else lse[sp.rows]
        orr = o if every else o[sp.rows]
        merged = torch.logaddexp(lr, lp)
        o_new = orr * torch.exp(lr - merged)[..., None] + op * torch.exp(lp - merged)[..., None]
        if every:
            o, lse = o_new, merged
        else:
            o[sp.rows], lse[sp.rows] = o_new, merged
    return o.to(q.dtype)


class _Prepared:
    """A step's launch tensors derived from its AttnMeta."""

    __slots__ = ("prefix_lens", "tables", "chunks", "max_q_len")

    def __init__(self, meta: AttnMeta, device: torch.device, block_size: int):
        self.prefix_lens = [torch.full((1,), len(sp.block_table) * block_size, dtype=torch.int64,
                                       device=device) for sp in meta.shared]
        cs = meta.prefills
        self.max_q_len = max((c.q_len for c in cs), default=0)
        self.chunks = self.tables = None
        if cs:
            self.chunks = torch.tensor([[c.q_start, c.q_len, c.ctx_len] for c in cs],
                                       dtype=torch.int64).to(device, non_blocking=True)
            self.tables = (cs[0].block_table[None] if len(cs) == 1 else
                           torch.nn.utils.rnn.pad_sequence([c.block_table for c in cs], batch_first=True))


_last: tuple[AttnMeta, _Prepared] | None = None


def _prepare(meta: AttnMeta, device: torch.device, block_size: int) -> _Prepared:
    # NOTE: every layer of a step passes the same AttnMeta; its launch tensors (a host to
    # device copy and a padding kernel) are built for the first layer only. Holding the
    # meta keeps its id from being reused by a later step's.
    global _last
    last = _last
    if last is not None and last[0] is meta:
        return last[1]
    prep = _Prepared(meta, device, block_size)
    _last = (meta, prep)
    return prep


# --------------------------------------------------------------------------- tuning


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored by 16-bit dots


def _decode_config(D: int, itemsize: int, block_n: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel."""
    # NOTE: 64 keys of D = 128 in bf16 is 16 KiB of K and of V per stage; three stages keep
    # about 100 KiB of loads in flight per program, which decode (HBM-bound) needs. Untuned.
    if block_n is None:
        block_n = 64 if D * itemsize <= 256 else 32
    return block_n, 4, 3 if D * itemsize <= 256 else 2


def _prefill_config(D: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel."""
    # NOTE: 128 query rows x 64 keys is the flash-attention tile for Hopper (a warpgroup
    # matmul needs 64 rows per 4 warps); fp32 (tests, tiny models) and D = 256 halve it to
    # stay within 228 KiB of shared memory. Untuned.
    if itemsize == 4 or D > 128:
        return 64, 32, 4, 2
    return 128, 64, 4 if D <= 64 else 8, 3


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests see them
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(num_programs: int, max_tiles: int, device: torch.device) -> int:
    # NOTE: split-K only when the programs without it would leave SMs idle; then aim for
    # two programs per SM (batch 1, 8 kv heads, 32k context: 33 splits of 16 tiles of 64
    # keys on an H100), never splits shorter than MIN_TILES_PER_SPLIT tiles
    sms = _num_sms(device)
    if num_programs >= sms:
        return 1
    want = triton.cdiv(2 * sms, num_programs)
    return max(1, min(want, max_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
