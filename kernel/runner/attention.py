"""Paged attention in plain torch: the reference path that runs everywhere.

The KV cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and
the same for V (views into the block-major pool, so strided between blocks). A step's new
tokens are flattened into one batch: decode tokens (one query per session) first, then
prefill chunks (several queries per session, each attending to the session's cached
tokens and causally to each other).

On CUDA the Triton kernels of triton_attention.py take over when Triton is installed and
the shapes are supported; AGENTOS_ATTENTION=torch keeps this path (to compare the two).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One session's chunk of new tokens inside a step."""

    q_start: int  # offset of the chunk's first token in the flattened batch
    q_len: int  # number of new tokens in the chunk
    ctx_len: int  # tokens in the session's cache after this chunk is written
    block_table: torch.Tensor  # [ceil(ctx_len / block_size)] int64 physical block ids


@dataclass(slots=True)
class SharedPrefix:
    """Leading blocks that several of a step's decodes map (forks of one session, or
    sessions sharing a prompt through the prefix cache): attended once for all of them."""

    rows: torch.Tensor  # [n] int64: the decodes (rows of the batch) that share it
    block_table: torch.Tensor  # [p] int64 physical block ids, every slot valid for all rows


@dataclass(slots=True)
class AttnMeta:
    """Where a step's tokens live in the paged cache and what each one may attend to."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64, padded with 0
    decode_ctx_lens: torch.Tensor | None = None  # [B] int64, cache length incl. the new token
    # with shared prefixes, decode_block_tables and decode_ctx_lens cover only what
    # follows each row's shared prefix
    shared: list[SharedPrefix] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    deterministic: bool = False  # batch-invariant attention (see batch_invariant.py)


# "auto": the Triton kernels on CUDA when Triton is installed and the shapes are supported;
# "torch": always this module's path; "triton": the Triton kernels wherever they can run
# (also CPU tensors under TRITON_INTERPRET=1, as the tests do), an error where they cannot
BACKEND = os.environ.get("AGENTOS_ATTENTION", "auto")
if BACKEND not in ("auto", "torch", "triton"):
    raise ValueError(f"AGENTOS_ATTENTION must be auto, torch or triton, not {BACKEND!r}")


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores the new tokens' K and V at their slots. k, v: [T, KVH, D].

    The caches are per-layer views of the block-major pool, strided between blocks, so
    the slots are addressed as (block, offset) pairs."""
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache.index_put_((blocks, offsets), k)
    v_cache.index_put_((blocks, offsets), v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float,
    window: int | None = None, cap: float | None = None,
    k: torch.Tensor | None = None, v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (already holding the new K/V).
    With a sliding `window`, a query sees only the `window` keys ending at its own
    position (Mistral's, Qwen's and Gemma 2's sliding layers, as transformers masks them).
    With a soft-cap `cap` (Gemma 2), each scaled score s becomes tanh(s / cap) * cap.
    k, v: the step's new K and V [T, KVH, D] as written (optional): on the torch path, the
    prefill chunks whose whole context is new attend to them directly, consecutive ones of
    one length in one call (fresh prompts, as a batch of new sessions brings).

    q: [T, H, D] -> returns [T, H, D].
    """
    if meta.deterministic:
        from agentos.kernel.runner.batch_invariant import attention

        return attention(q, k_cache, v_cache, meta, scale, window, cap)
    fast = _triton_kernels(q, k_cache)
    if fast is not None:
        try:
            return fast.paged_attention(q, k_cache, v_cache, meta, scale, window, cap)
        except Exception as e:  # e.g. a kernel that does not compile for this GPU
            if BACKEND == "triton":
                raise
            # NOTE: the kernels write nothing before they run, so the torch path can take
            # this call; it keeps every later one (one warning, not one per step)
            _disable_triton(e)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale,
                                          window, cap)
    direct = k is not None and v is not None and k.dtype == k_cache.dtype and window is None
    for run in _runs(meta.prefills):
        c = run[0]
        end = c.q_start + len(run) * c.q_len
        if direct and c.ctx_len == c.q_len:
            out[c.q_start : end] = _fresh(q[c.q_start : end], k[c.q_start : end],  # type: ignore[index]
                                          v[c.q_start : end], len(run), scale, cap)  # type: ignore[index]
        elif len(run) > 1:
            out[c.q_start : end] = _prefill_run(q[c.q_start : end], k_cache, v_cache, run,
                                                scale, window, cap)
        else:
            out[c.q_start : end] = _prefill(q[c.q_start : end], k_cache, v_cache, c, scale,
                                            window, cap)
    return out


def _runs(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
    """The chunks in order, cut into runs: consecutive chunks of one length and one
    context length, adjacent in the batch, share a run (a batch of new sessions' prompts,
    or of sessions each given a tool output of one length)."""
    runs: list[list[PrefillChunk]] = []
    for c in chunks:
        last = runs[-1][-1] if runs else None
        if (last is not None and c.q_len == last.q_len and c.ctx_len == last.ctx_len
                and c.q_start == last.q_start + last.q_len):
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def _prefill_run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 run: list[PrefillChunk], scale: float, window: int | None,
                 cap: float | None) -> torch.Tensor:
    """_prefill for n chunks of one length L and one context length C in one call: their
    K/V gathered from the cache together, one mask for all. q [n * L, H, D] -> the same."""
    T, H, D = q.shape
    n, L, C = len(run), run[0].q_len, run[0].ctx_len
    tables = torch.stack([c.block_table for c in run])  # [n, blocks]
    k = gather_blocks(k_cache, tables)[:, :C].transpose(1, 2)  # [n, KVH, C, D]
    v = gather_blocks(v_cache, tables)[:, :C].transpose(1, 2)
    rows = torch.arange(L, device=q.device)[:, None] + (C - L)
    keys = torch.arange(C, device=q.device)[None, :]
    mask = keys <= rows  # [L, C]: key j is visible to query i when j <= start + i
    if window is not None:
        mask &= keys > rows - window
    qs = q.view(n, L, H, D).transpose(1, 2)  # [n, H, L, D]
    return _gqa(qs, k, v, mask, scale, cap).transpose(1, 2).reshape(T, H, D)


# a chunk of up to this many new tokens after a cached context attends with its query
# heads grouped by kv head (_grouped); a longer one keeps K and V repeated per query head,
# which SDPA blocks better over many queries (one layer, the tiny model's heads, ms,
# repeated vs grouped: 16 tokens after 8k 2.5 vs 1.5, 32 after 8k 4.8 vs 3.3, 64 after 8k
# 9.3 vs 9.2, 512 after 8k 45 vs 55)
GROUPED_MAX_QUERIES = 32


def _gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float, cap: float | None, causal: bool = False) -> torch.Tensor:
    """sdpa of q [n, H, L, D] over the kv heads k, v [n, KVH, C, D]: grouped (below) for a
    short chunk under a mask without a cap, else with K and V repeated per query head."""
    n, H, L, D = q.shape
    if mask is not None and cap is None and L <= GROUPED_MAX_QUERIES:
        return _grouped(q, k, v, mask, scale)
    G = H // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return sdpa(q, k, v, mask, scale, cap, causal)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
             scale: float) -> torch.Tensor:
    """SDPA of q [n, H, L, D] over k, v [n, KVH, C, D] under a boolean mask [L, C]: each kv
    head's H / KVH query heads go in as one run of queries, so K and V are read as they
    are. Repeating them per query head copies the whole context twice a layer: a 4-token
    chunk after 8k tokens took 13-17 ms a step of the tiny model that way, 8 this way.
    (SDPA's enable_gqa with a mask was slower still on the CPU in that step.)"""
    n, H, L, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    out = F.scaled_dot_product_attention(q.reshape(n, KVH, G * L, D), k, v,
                                         attn_mask=mask.repeat(G, 1), scale=scale)
    return out.view(n, H, L, D)


def _fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float,
           cap: float | None) -> torch.Tensor:
    """Causal attention of n sequences of equal length L whose whole context is new, from
    their own K/V: q [n * L, H, D], k, v [n * L, KVH, D] -> [n * L, H, D]. One SDPA call
    for the n of them, no copy of the cache and no repeated kv heads (enable_gqa)."""
    T, H, D = q.shape
    KVH = k.shape[1]
    qs = q.view(n, T // n, H, D).transpose(1, 2)  # [n, H, L, D]
    ks = k.view(n, T // n, KVH, D).transpose(1, 2)  # [n, KVH, L, D]
    vs = v.view(n, T // n, KVH, D).transpose(1, 2)
    if cap is None:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                             enable_gqa=KVH != H)
    else:
        G = H // KVH
        out = sdpa(qs, ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1), None,
                   scale, cap, causal=True)
    return out.transpose(1, 2).reshape(T, H, D)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float, cap: float | None = None, causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention (q [..., M, D], k, v [..., L, D], a boolean mask
    broadcastable to [..., M, L], True where a key is visible, or `causal`), with the
    scores soft-capped by `cap` when it is not None.

    NOTE: SDPA has no soft-cap, so capped scores take the explicit path in the order
    transformers' eager Gemma 2 attention computes them: scale, cap and the weights' matmul
    in q's dtype, softmax in fp32."""
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    s = torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * scale / cap) * cap  # [..., M, L]
    if causal:
        M, L = s.shape[-2:]
        mask = torch.ones(M, L, dtype=torch.bool, device=q.device).tril(L - M)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _triton_kernels(q: torch.Tensor, k_cache: torch.Tensor):
    """The triton_attention module when it should run this call, else None (torch path).
    Raises RuntimeError when BACKEND is "triton" and Triton cannot run on q's device."""
    if BACKEND == "torch" or (BACKEND == "auto" and (q.device.type != "cuda" or _TRITON_OFF)):
        return None  # NOTE: checked first, so the CPU path never imports triton
    mod = _load_triton()
    if mod is None or not mod.available(q.device):
        if BACKEND == "triton":
            raise RuntimeError(f"AGENTOS_ATTENTION=triton, but Triton cannot run on {q.device}")
        return None
    return mod if mod.supports(q, k_cache) else None


def _cpu_kernels(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The cpu_kernels module when its C++ decode should run this call, else None."""
    if q.device.type != "cpu" or BACKEND == "torch":
        return None
    mod = _load_cpu()
    return mod if mod.available() and mod.supports(q, k_cache, v_cache) else None


@functools.cache
def _load_cpu():
    from agentos.kernel.runner import cpu_kernels

    return cpu_kernels


_TRITON_OFF = False  # set after the Triton path failed once under BACKEND "auto"


def _disable_triton(error: Exception) -> None:
    global _TRITON_OFF
    import logging

    logging.getLogger("agentos.attention").warning(
        "Triton attention failed (%s: %s); using the torch path from now on",
        type(error).__name__, error)
    _TRITON_OFF = True


@functools.cache
def _load_triton():
    try:
        from agentos.kernel.runner import triton_attention
    except ImportError:
        return None
    return triton_attention


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks named by tables [..., n] from cache [N, bs, KVH, D], as [..., n * bs, KVH, D].

    NOTE: each block is one contiguous run inside the block-major pool, so the layer's view
    is taken as rows [N, bs * KVH * D] (strided between rows only): index_select then
    copies whole rows at memcpy speed. On the 4-d strided view it goes element by element,
    5-7x slower on CPU (and advanced indexing, cache[tables], slower still)."""
    N, bs, KVH, D = cache.shape
    idx = tables.reshape(-1)
    if cache.stride(3) == 1 and cache.stride(2) == D and cache.stride(1) == KVH * D:
        rows = cache.as_strided((N, bs * KVH * D), (cache.stride(0), 1)).index_select(0, idx)
    else:
        rows = cache.index_select(0, idx)
    return rows.view(*tables.shape[:-1], tables.shape[-1] * bs, KVH, D)


def _decode(q, k_cache, v_cache, meta: AttnMeta, scale: float,
            window: int | None = None, cap: float | None = None) -> torch.Tensor:
    # q: [B, H, D]; one query per session at the end of its context.
    if meta.shared:  # never with sliding layers: their tables are whole (see model_runner)
        assert window is None, "a sliding layer needs whole decode tables, not a cascade"
        return _decode_cascade(q, k_cache, v_cache, meta, scale, cap)
    native = _cpu_kernels(q, k_cache, v_cache)
    if native is not None:
        return native.decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens,
                             scale, window, cap)
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    k = gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)  # [B, KVH, L, D]
    v = gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)  # L = max_blocks * bs
    L = k.shape[2]
    keys = torch.arange(L, device=q.device)[None, :]
    valid = keys < meta.decode_ctx_lens[:, None]  # [B, L]
    if window is not None:
        valid &= keys >= meta.decode_ctx_lens[:, None] - window
    # NOTE: grouped-query heads become the query axis of their kv head ([B, KVH, G, D]), and
    # 4-d inputs reach the fused SDPA kernels (3-d ones fall back to the slow math path)
    qg = q.view(B, KVH, H // KVH, D)
    out = sdpa(qg, k, v, valid[:, None, None, :], scale, cap)
    return out.reshape(B, H, D)


def _decode_cascade(q, k_cache, v_cache, meta: AttnMeta, scale: float,
                    cap: float | None = None) -> torch.Tensor:
    """Decode attention in parts merged by their log-sum-exp: each shared prefix once, as
    one attention for all the rows that map it (its K/V gathered once, not once per
    session), and each row's own suffix. q: [B, H, D] -> [B, H, D]."""
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    G = H // KVH
    qg = q.view(B, KVH, G, D)
    k = gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)  # [B, KVH, Ls, D]
    v = gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)
    Ls = k.shape[2]
    # NOTE: never empty: a row's newest token sits in a block it writes, which is private
    hidden = torch.arange(Ls, device=q.device)[None, :] >= meta.decode_ctx_lens[:, None]
    mask = torch.zeros(B, 1, 1, Ls, dtype=q.dtype, device=q.device).masked_fill_(
        hidden[:, None, None, :], float("-inf"))
    o, lse = _attention_lse(qg, k, v, mask, scale, cap)  # [B, KVH, G, D] fp32, [B, KVH, G]
    for sp in meta.shared:
        n = len(sp.rows)
        every = n == B  # one prefix shared by the whole batch: no row indexing
        rows = slice(None) if every else sp.rows
        kp = gather_blocks(k_cache, sp.block_table[None]).transpose(1, 2)  # [1, KVH, Lp, D]
        vp = gather_blocks(v_cache, sp.block_table[None]).transpose(1, 2)
        qr = qg[rows].transpose(0, 1).reshape(1, KVH, n * G, D)
        op, lp = _attention_lse(qr, kp, vp, None, scale, cap)
        op = op.view(KVH, n, G, D).transpose(0, 1)
        lp = lp.view(KVH, n, G).transpose(0, 1)
        lr = lse[rows]
        merged = torch.logaddexp(lr, lp)
        o_new = o[rows] * torch.exp(lr - merged)[..., None] + op * torch.exp(lp - merged)[..., None]
        if every:
            o, lse = o_new, merged
        else:
            o[rows], lse[rows] = o_new, merged
    return o.to(q.dtype).reshape(B, H, D)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attention_lse(q, k, v, mask, scale: float,
                   cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp: q [B, h, M, D], k, v [B, h, L, D], mask additive
    [B, 1, 1, L] or None, scores soft-capped by cap. Returns (out [B, h, M, D] fp32, lse
    [B, h, M] fp32)."""
    if q.device.type == "cpu" and _FLASH_CPU is not None and cap is None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out.float(), lse.float()
    s = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()), lse


def _prefill(q, k_cache, v_cache, c: PrefillChunk, scale: float,
             window: int | None = None, cap: float | None = None) -> torch.Tensor:
    # q: [n, H, D] at positions ctx_len - n .. ctx_len - 1.
    n = q.shape[0]
    k = gather_blocks(k_cache, c.block_table)[: c.ctx_len]  # [ctx, KVH, D]
    v = gather_blocks(v_cache, c.block_table)[: c.ctx_len]
    start = c.ctx_len - n
    if start == 0 and window is None:
        mask, causal = None, True  # the whole context is new: plain causal
    else:
        # key j is visible to query i when j <= start + i (and within the window)
        rows = torch.arange(n, device=q.device)[:, None] + start
        keys = torch.arange(c.ctx_len, device=q.device)[None, :]
        mask, causal = keys <= rows, False  # [n, ctx]
        if window is not None:
            mask &= keys > rows - window
    # NOTE: 4-d inputs (a batch of one) reach the fused SDPA kernels; 3-d ones take the
    # math path, 5-7x slower on CPU for long contexts
    out = _gqa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
               mask, scale, cap, causal)  # [1, H, n, D]
    return out[0].transpose(0, 1)
