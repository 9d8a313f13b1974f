"""Batch-invariant computation (deterministic mode): a token's result does not depend on
what else is in its step.

Plain kernels are not batch-invariant: a matmul picks its blocking (and a different
summation order) from the number of rows, and attention over a padded batch or a
prefill chunk sums over a different number of keys than a lone decode. Both change the
low bits of a token's logits, so the same session can sample differently under load.
Here every reduction has a shape that depends only on the token itself:

- matmuls run on row counts padded to a multiple of `ROWS`, so the same kernel path
  serves every batch (rows are computed independently within it);
- attention runs over each session's keys in fixed splits of `SPLIT` keys (every matmul
  of a fixed shape per split), combined in order under the query's overall maximum;
  splits past a query's position add exact zeros, so a query gives the same bits alone
  (decode), beside other decodes, inside a prefill chunk of any size, or in a dense
  forward of the whole sequence.

It costs speed (padded rows and keys, one prefill chunk at a time); `agentos bench
determinism` measures it. Correctness is checked by tests that compare a session alone
and inside a batch bit for bit, rather than by any assumption about a library's kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agentos.kernel.runner.attention import gather_blocks

ROWS = 16  # matmul row counts are padded to a multiple of this
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
              scale: float, window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """paged_attention's contract (q: [T, H, D] -> [T, H, D]), batch-invariant. The step's
    decodes run together (one query each); each prefill chunk runs on its own."""
    out = torch.empty_like(q)
    B = meta.num_decodes
    if B:
        ctx = meta.decode_ctx_lens
        pos = (ctx - 1)[:, None]  # [B, 1]
        k = _keys(k_cache, meta.decode_block_tables)
        v = _keys(v_cache, meta.decode_block_tables)
        out[:B] = attend(q[:B, None], k, v, pos, scale, window, cap)[:, 0]
    for c in meta.prefills:
        pos = torch.arange(c.ctx_len - c.q_len, c.ctx_len, device=q.device)[None]
        k = _keys(k_cache, c.block_table[None])
        v = _keys(v_cache, c.block_table[None])
        out[c.q_start : c.q_start + c.q_len] = attend(
            q[None, c.q_start : c.q_start + c.q_len], k, v, pos, scale, window, cap)[0]
    return out


def session_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """Causal attention of one whole sequence (the dense forward): q [T, H, D], k, v
    [T, KVH, D] -> [T, H, D]; the same arithmetic per query as the paged path."""
    T = q.shape[0]
    pos = torch.arange(T, device=q.device)[None]
    return attend(q[None], _pad_keys(k[None]), _pad_keys(v[None]), pos, scale, window, cap)[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
           scale: float, window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """q: [B, n, H, D] at positions pos [B, n]; k, v: [B, L, KVH, D] with L a multiple of
    SPLIT (keys past a query's position, and with a sliding window those `window` or more
    behind it, are masked); scores soft-capped by `cap` (Gemma 2) unless it is None.
    Returns [B, n, H, D].

    Each split of SPLIT keys gets its own max, exp-sum and weighted sum of values; the
    splits are then combined in order under the query's overall max. A split past the
    query's position has weight exp(-inf) = 0 and adds exact zeros, so the result does not
    depend on L, on B, or on the other queries: only on the query and its keys."""
    B, n, H, D = q.shape
    L, KVH = k.shape[1], k.shape[2]
    G, ns = H // KVH, L // SPLIT
    n_pad = -(-n // ROWS) * ROWS
    qg = q.new_zeros(B, n_pad, KVH, G, D)
    qg[:, :n] = q.view(B, n, KVH, G, D)
    M = G * n_pad  # rows: head group major, query minor
    qg = qg.permute(0, 2, 3, 1, 4).reshape(B, KVH, M, D)
    rows_pos = torch.zeros(B, n_pad, dtype=torch.long, device=q.device)
    rows_pos[:, :n] = pos  # padding rows see key 0 only (finite, discarded)
    rows_pos = rows_pos.repeat(1, G)  # [B, M]
    # every matmul has a fixed inner size (D, then SPLIT) and fixed columns per split
    ks = k.view(B, ns, SPLIT, KVH, D).permute(0, 3, 1, 4, 2)  # [B, KVH, ns, D, SPLIT]
    vs = v.view(B, ns, SPLIT, KVH, D).permute(0, 3, 1, 2, 4)  # [B, KVH, ns, SPLIT, D]
    s = torch.matmul(qg[:, :, None], ks).float() * scale  # [B, KVH, ns, M, SPLIT]
    if cap is not None:  # elementwise: as batch-invariant as the scores
        s = torch.tanh(s / cap) * cap
    keys = torch.arange(L, device=q.device).view(ns, 1, SPLIT)
    visible = keys[None] <= rows_pos[:, None, :, None]  # [B, ns, M, SPLIT]
    if window is not None:  # splits wholly behind the window add exact zeros, like those past it
        visible &= keys[None] > rows_pos[:, None, :, None] - window
    s = s.masked_fill(~visible[:, None], float("-inf"))
    m = s.amax(-1, keepdim=True)  # [B, KVH, ns, M, 1]; -inf for a split with no visible key
    p = torch.exp(s - torch.where(m == float("-inf"), 0.0, m))
    l_split = p.sum(-1).transpose(2, 3)  # [B, KVH, M, ns]
    o_split = torch.matmul(p.to(v.dtype), vs).float()  # [B, KVH, ns, M, D]
    m = m[..., 0].transpose(2, 3)  # [B, KVH, M, ns]
    w = torch.exp(m - m.amax(-1, keepdim=True))  # [B, KVH, M, ns]: 0 for empty splits
    # NOTE: a sequential sum over splits, so trailing empty splits add exact zeros
    l_sum = torch.zeros(B, KVH, M, device=q.device)
    o = torch.zeros(B, KVH, M, D, device=q.device)
    for i in range(ns):
        l_sum = l_sum + w[..., i] * l_split[..., i]
        o = o + w[..., i, None] * o_split[:, :, i]
    o = (o / l_sum[..., None]).to(q.dtype).view(B, KVH, G, n_pad, D)[:, :, :, :n]
    return o.permute(0, 3, 1, 2, 4).reshape(B, n, H, D)


def _keys(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks of tables [B, nb] from cache [N, bs, KVH, D] as [B, L, KVH, D], L a
    multiple of SPLIT (zero past the blocks; masked anyway)."""
    return _pad_keys(gather_blocks(cache, tables))


def _pad_keys(rows: torch.Tensor) -> torch.Tensor:
    pad = -rows.shape[1] % SPLIT
    if pad:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad, *rows.shape[2:])], dim=1)
    return rows
