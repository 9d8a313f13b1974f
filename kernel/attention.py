"""Paged attention in plain torch: the reference path that runs everywhere.

The KV cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and
the same for V (views into the block-major pool, so strided between blocks). A step's new
tokens are flattened into one batch: decode tokens (one query per session) first, then
prefill chunks (several queries per session, each attending to the session's cached
tokens and causally to each other).
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (already holding the new K/V).

    q: [T, H, D] -> returns [T, H, D].
    """
    if meta.deterministic:
        from agentos.kernel.batch_invariant import attention

        return attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale)
    for c in meta.prefills:
        out[c.q_start : c.q_start + c.q_len] = _prefill(q[c.q_start : c.q_start + c.q_len],
                                                        k_cache, v_cache, c, scale)
    return out


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks named by tables [..., n] from cache [N, bs, KVH, D], as [..., n * bs, KVH, D].

    NOTE: index_select copies whole blocks at memcpy speed, about 1.6x faster on CPU than
    advanced indexing (cache[tables]), which goes element-wise."""
    rows = cache.index_select(0, tables.reshape(-1))  # [prod(tables.shape), bs, KVH, D]
    return rows.view(*tables.shape[:-1], tables.shape[-1] * cache.shape[1], *cache.shape[2:])


def _decode(q, k_cache, v_cache, meta: AttnMeta, scale: float) -> torch.Tensor:
    # q: [B, H, D]; one query per session at the end of its context.
    if meta.shared:
        return _decode_cascade(q, k_cache, v_cache, meta, scale)
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    k = _gather(k_cache, meta.decode_block_tables).transpose(1, 2)  # [B, KVH, L, D]
    v = _gather(v_cache, meta.decode_block_tables).transpose(1, 2)  # L = max_blocks * bs
    L = k.shape[2]
    valid = torch.arange(L, device=q.device)[None, :] < meta.decode_ctx_lens[:, None]  # [B, L]
    # NOTE: grouped-query heads become the query axis of their kv head ([B, KVH, G, D]), and
    # 4-d inputs reach the fused SDPA kernels (3-d ones fall back to the slow math path)
    qg = q.view(B, KVH, H // KVH, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)


def _decode_cascade(q, k_cache, v_cache, meta: AttnMeta, scale: float) -> torch.Tensor:
    """Decode attention in two parts merged by their softmax statistics: each shared
    prefix once, as one matmul for all the rows that map it (its K/V gathered once, not
    once per session), and each row's own suffix. q: [B, H, D] -> [B, H, D]."""
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    G = H // KVH
    qg = q.view(B, KVH, G, D).float()
    k = _gather(k_cache, meta.decode_block_tables).transpose(1, 2).float()  # [B, KVH, Ls, D]
    v = _gather(v_cache, meta.decode_block_tables).transpose(1, 2).float()
    Ls = k.shape[2]
    s = torch.matmul(qg, k.transpose(2, 3)) * scale  # [B, KVH, G, Ls]
    valid = torch.arange(Ls, device=q.device)[None, :] < meta.decode_ctx_lens[:, None]
    # NOTE: never empty: a row's newest token sits in a block it writes, which is private
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(-1)  # [B, KVH, G]
    p = torch.exp(s - m[..., None])
    l_sum = p.sum(-1)
    o = torch.matmul(p, v)  # [B, KVH, G, D], not yet divided by l_sum
    for sp in meta.shared:
        n = len(sp.rows)
        kp = _gather(k_cache, sp.block_table[None])[0].permute(1, 2, 0).float()  # [KVH, D, Lp]
        vp = _gather(v_cache, sp.block_table[None])[0].transpose(0, 1).float()  # [KVH, Lp, D]
        every = n == B  # one prefix shared by the whole batch: no row indexing
        rows = slice(None) if every else sp.rows
        qr = qg[rows].transpose(0, 1).reshape(KVH, n * G, D)
        sc = torch.matmul(qr, kp) * scale  # [KVH, n * G, Lp]
        mp = sc.amax(-1)
        pp = torch.exp(sc - mp[..., None])
        lp = pp.sum(-1).view(KVH, n, G).transpose(0, 1)  # [n, KVH, G]
        op = torch.matmul(pp, vp).view(KVH, n, G, D).transpose(0, 1)
        mp = mp.view(KVH, n, G).transpose(0, 1)
        mr = m[rows]
        m_new = torch.maximum(mr, mp)
        a, b = torch.exp(mr - m_new), torch.exp(mp - m_new)
        if every:
            o = o * a[..., None] + op * b[..., None]
            l_sum = l_sum * a + lp * b
            continue
        o[rows] = o[rows] * a[..., None] + op * b[..., None]
        l_sum[rows] = l_sum[rows] * a + lp * b
        m[rows] = m_new
    return (o / l_sum[..., None]).to(q.dtype).reshape(B, H, D)


def _prefill(q, k_cache, v_cache, c: PrefillChunk, scale: float) -> torch.Tensor:
    # q: [n, H, D] at positions ctx_len - n .. ctx_len - 1.
    n, H, D = q.shape
    KVH = k_cache.shape[2]
    k = _gather(k_cache, c.block_table)[: c.ctx_len]  # [ctx, KVH, D]
    v = _gather(v_cache, c.block_table)[: c.ctx_len]
    G = H // KVH
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    start = c.ctx_len - n
    if start == 0:
        mask, causal = None, True  # the whole context is new: plain causal
    else:
        # key j is visible to query i when j <= start + i
        rows = torch.arange(n, device=q.device)[:, None] + start
        mask, causal = torch.arange(c.ctx_len, device=q.device)[None, :] <= rows, False  # [n, ctx]
    # NOTE: 4-d inputs (a batch of one) reach the fused SDPA kernels; 3-d ones take the
    # math path, 5-7x slower on CPU for long contexts
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=causal, scale=scale,
    )  # [1, H, n, D]
    return out[0].transpose(0, 1)
