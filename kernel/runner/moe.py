"""Sparse Mixture-of-Experts feed-forward (Mixtral, Qwen3-MoE): a router picks each token's
top-k experts, and the token's output is the routing-weighted sum of their SwiGLUs.

The expert weights are stacked the way transformers 5 holds them, under its names:
`experts.gate_up_proj` [E, 2 * I, H] (the gate's rows first) and `experts.down_proj`
[E, H, I], so `linear(x, gate_up_proj[e])` is expert e's gate and up projections.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, inter: int,
                 act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, inter))
        self.act = act
        # NOTE: these 3-D weights are not nn.Linear layers, so make_batch_invariant's swap of
        # every nn.Linear misses them; setting LlamaModel.linear sets this one too
        self.linear: Callable[..., torch.Tensor] = F.linear

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's SwiGLU of rows x [n, H] -> [n, H]."""
        gate, up = self.linear(x, self.gate_up_proj[e]).split(self.inter, dim=-1)
        return self.linear(self.act(gate) * up, self.down_proj[e])


class SparseMoE(nn.Module):
    """Router (`gate`, no bias) plus experts, computed as transformers does: softmax of the
    router logits in fp32, top-k, the k weights renormalized to sum 1 when norm_topk_prob
    (Mixtral always), then each expert's output scaled by its weight and a token's k of
    them summed (see _sum_slots)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, inter: int,
                 act: Callable[[torch.Tensor], torch.Tensor], norm_topk_prob: bool,
                 fp32_weights: bool):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, inter, act)
        self.num_experts, self.top_k = num_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        # NOTE: transformers' Mixtral scales the expert outputs by the fp32 weights,
        # Qwen3-MoE rounds the weights to the model dtype first (equal in fp32, not in bf16)
        self.fp32_weights = fp32_weights

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k], expert ids [T, k]) of each token's top-k experts."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.fp32_weights else weights.to(x.dtype)), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        weights, ids = self.route(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.forward_dense(x, weights, ids)
        T, k = ids.shape
        flat = ids.flatten()  # [T * k] (token, slot) pairs, token-major
        order = torch.argsort(flat, stable=True)  # the pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
        flat_weights = weights.flatten()
        # each pair's weighted expert output, in the dtype of the product (fp32 for Mixtral)
        pair_out = x.new_empty(T * k, x.shape[1], dtype=torch.promote_types(x.dtype, weights.dtype))
        # NOTE: one gather, two matmuls and a row write per expert with tokens. A GPU-grade
        # path runs every expert's rows in one grouped GEMM launch (gate_up, then down;
        # torch._grouped_mm or a fused MoE kernel) over the tokens permuted by expert once,
        # without this loop or its host sync.
        start = 0
        for e, n in enumerate(counts):
            if n:
                pairs = order[start : start + n]
                pair_out[pairs] = self.experts.expert(x[pairs // k], e) * flat_weights[pairs, None]
            start += n
        return _sum_slots(pair_out.view(T, k, -1), x.dtype)

    def forward_dense(self, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """forward without the host sync, for CUDA graph capture (a decode step): every
        expert runs over every row and fills the slots routed to it, so each slot holds the
        same product as in forward. E / k times the matmul work of forward."""
        T, k = ids.shape
        pair_out = x.new_zeros(T, k, x.shape[1], dtype=torch.promote_types(x.dtype, weights.dtype))
        for e in range(self.num_experts):
            y = self.experts.expert(x, e)[:, None] * weights[..., None]  # [T, k, H]
            pair_out = torch.where((ids == e)[..., None], y, pair_out)
        return _sum_slots(pair_out, x.dtype)


def _sum_slots(pair_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, k, H] -> [T, H]: each token's k weighted expert outputs summed in slot order in
    fp32, then rounded once to dtype, as transformers' default experts path sums them.

    NOTE: added one slot at a time rather than by .sum(dim=1), whose reduction order on a
    GPU may depend on the number of rows: this way a token's sum does not depend on what
    else is in the batch (deterministic mode)."""
    acc = pair_out[:, 0].float()
    for j in range(1, pair_out.shape[1]):
        acc = acc + pair_out[:, j]
    return acc.to(dtype)
