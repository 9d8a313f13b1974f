"""Batch-invariant computation (deterministic mode): a token's result does not depend on
what else is in its step.

Plain kernels are not batch-invariant: a matmul picks its blocking (and a different
summation order) from the number of rows, and attention over a padded batch or a
prefill chunk sums over a different number of keys than a lone decode. Both change the
low bits of a token's logits, so the same session can sample differently under load.
Here every reduction has a shape that depends only on the token itself:

- matmuls run on row counts padded to a multiple of `ROWS`, so the same kernel path
  serves every batch (rows are computed independently within it);
- attention runs per session over its keys in fixed splits of `SPLIT` keys, combined in
  order with an online softmax; splits past a query's position are exact no-ops, so a
  query gives the same bits alone (decode), inside a prefill chunk of any size, or in a
  dense forward of the whole sequence.

It costs speed (padded rows, a loop over sessions and splits); `agentos bench
determinism` measures it. Correctness is checked by tests that compare a session alone
and inside a batch bit for bit, rather than by any assumption about a library's kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 64  # matmul row counts are padded to a multiple of this
SPLIT = 128  # keys per attention split


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the rows of x [T, K] padded to a multiple of ROWS."""
    T = x.shape[0]
    pad = -T % ROWS
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return F.linear(x, weight, bias)[:T]


def make_batch_invariant(model: nn.Module) -> None:
    """Switches every linear layer of the model (and its logits) to `linear`."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.forward = lambda x, m=m: linear(x, m.weight, m.bias)
    model.linear = linear


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
              scale: float) -> torch.Tensor:
    """paged_attention's contract (q: [T, H, D] -> [T, H, D]), batch-invariant."""
    out = torch.empty_like(q)
    for i in range(meta.num_decodes):
        ctx = int(meta.decode_ctx_lens[i])
        table = meta.decode_block_tables[i]
        out[i : i + 1] = session_attention(q[i : i + 1], k_cache, v_cache, table, ctx, scale)
    for c in meta.prefills:
        out[c.q_start : c.q_start + c.q_len] = session_attention(
            q[c.q_start : c.q_start + c.q_len], k_cache, v_cache, c.block_table, c.ctx_len, scale)
    return out


def session_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      table: torch.Tensor, ctx_len: int, scale: float) -> torch.Tensor:
    """Attention of one session's n queries (positions ctx_len - n .. ctx_len - 1) over
    its first ctx_len cached keys. q: [n, H, D]; caches [N, bs, KVH, D]; returns [n, H, D]."""
    n, H, D = q.shape
    bs, KVH = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH
    L = -(-ctx_len // SPLIT) * SPLIT
    nb = -(-ctx_len // bs)
    k = _keys(k_cache, table[:nb], L)  # [KVH, L, D]
    v = _keys(v_cache, table[:nb], L)
    # queries of one kv head are rows of one matmul: [KVH, G * n_pad, D]
    n_pad = -(-n // ROWS) * ROWS
    qg = q.new_zeros(n_pad, KVH, G, D)
    qg[:n] = q.view(n, KVH, G, D)
    qg = qg.permute(1, 2, 0, 3).reshape(KVH, G * n_pad, D)
    pos = torch.arange(n_pad, device=q.device) + (ctx_len - n)
    pos[n:] = 0  # padding rows see key 0 only (finite, discarded)
    rows_pos = pos.repeat(G)  # [G * n_pad], row r is query r % n_pad of head group r // n_pad
    m = torch.full((KVH, G * n_pad, 1), float("-inf"), device=q.device)
    l_sum = torch.zeros((KVH, G * n_pad, 1), device=q.device)
    o = torch.zeros((KVH, G * n_pad, D), device=q.device)
    keys = torch.arange(SPLIT, device=q.device)
    for start in range(0, L, SPLIT):
        s = torch.matmul(qg, k[:, start : start + SPLIT].transpose(1, 2)).float() * scale
        visible = (keys[None, :] + start) <= rows_pos[:, None]  # [G * n_pad, SPLIT]
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        # NOTE: a split past every query's position leaves m unchanged: alpha is exp(0) = 1
        # and p is 0, so it adds exact zeros and the result does not depend on L
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + torch.matmul(p.to(v.dtype), v[:, start : start + SPLIT]).float()
        m = m_new
    o = (o / l_sum).to(q.dtype).view(KVH, G, n_pad, D)[:, :, :n]
    return o.permute(2, 0, 1, 3).reshape(n, H, D)


def _keys(cache: torch.Tensor, table: torch.Tensor, L: int) -> torch.Tensor:
    # the session's blocks as [KVH, L, D], zero past the blocks (masked anyway)
    rows = cache.index_select(0, table).flatten(0, 1)  # [nb * bs, KVH, D]
    if rows.shape[0] < L:
        rows = torch.cat([rows, rows.new_zeros(L - rows.shape[0], *rows.shape[1:])])
    return rows[:L].transpose(0, 1)
