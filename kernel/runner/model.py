"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Qwen3, Mistral, Gemma, Gemma 2, and the
Mixture-of-Experts Mixtral and Qwen3-MoE) over the paged KV cache.

RMSNorm, RoPE, grouped-query attention, SwiGLU (or a sparse MoE of SwiGLU experts, see
moe.py), optional q/k/v (and o) bias, tied or untied embeddings. Gemma changes a few
details: RMSNorm scales by (1 + weight), embeddings are scaled by sqrt(hidden_size), the
MLP gates with tanh-approximated GELU; Gemma 2 adds a norm after attention and after the
MLP, tanh soft-capping of attention scores and of the final logits, and its own
attention scale. Parameters follow HF
names except two fusions: q/k/v -> `qkv_proj` and gate/up -> `gate_up_proj`, so each layer
runs two matmuls where HF runs five. Experts are stacked as transformers 5 holds them
(`mlp.experts.gate_up_proj` [E, 2 * I, H], `mlp.experts.down_proj` [E, H, I]); checkpoints
with one tensor per expert (Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen's
`mlp.experts.{e}.gate_proj/up_proj/down_proj`) load into them too.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from agentos.kernel.runner import cpu_kernels
from agentos.kernel.runner.attention import AttnMeta, paged_attention, sdpa, write_kv
from agentos.kernel.runner.moe import Experts, SparseMoE
from agentos.kernel.runner.rope import rope_inv_freq, rope_table

_ACTS = {"silu": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(slots=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a HF `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope dict with a rope_type, None for plain RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v; Llama attention_bias: on q/k/v/o
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    # per layer: the sliding window (keys a query sees, itself included), None: full
    layer_windows: list[int | None] = field(default_factory=list)
    # Mixture of Experts (Mixtral, Qwen3-MoE); with no MoE layer every layer is a dense MLP
    num_experts: int = 0  # routed experts of each MoE layer
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # each expert's SwiGLU width (Mixtral: intermediate_size)
    norm_topk_prob: bool = True  # top-k routing weights renormalized to sum 1 (Mixtral always)
    moe_layers: list[bool] = field(default_factory=list)  # per layer: MoE (True) or dense MLP
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), in fp32
    scale_embeddings: bool = False  # Gemma: embeddings are multiplied by sqrt(hidden_size)
    # Gemma 2: each layer also norms the attention output and the MLP input and output
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scale is this ** -0.5
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> tanh(s / cap) * cap
    final_logit_softcap: float | None = None  # Gemma 2: the same on the output logits
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if any(self.moe_layers) and not (1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Reads a HF config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if "text_config" in hf and "hidden_size" not in hf:
            hf = {**hf, **hf["text_config"]}
        model_type = hf.get("model_type", "llama")
        # NOTE: Gemma configs on the Hub leave out keys whose transformers defaults differ
        # from Llama's (tied embeddings, head_dim 256, the soft-caps)
        hf = {**_FAMILY_DEFAULTS.get(model_type, {}), **hf}
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        elif "original_max_position_embeddings" not in rope:
            rope["_max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=_hidden_act(hf, model_type),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            layer_windows=_layer_windows(hf, model_type),
            **_moe_fields(hf, model_type),
            **_gemma_fields(hf, model_type),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            model_type=model_type,
        )


# transformers' defaults for keys a config.json may leave out, where they differ from Llama's
_FAMILY_DEFAULTS: dict[str, dict] = {
    "gemma": {"head_dim": 256, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 256, "max_position_embeddings": 8192, "tie_word_embeddings": True,
               "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
}


def _hidden_act(hf: dict, model_type: str) -> str:
    """The MLP's activation as transformers reads it: Gemma 2 from `hidden_activation`,
    Gemma from `hidden_act` with its legacy "gelu" meaning the tanh approximation."""
    if model_type == "gemma2":
        return hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if model_type == "gemma":
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
    return hf.get("hidden_act", "silu")


def _gemma_fields(hf: dict, model_type: str) -> dict:
    """The Gemma fields of ModelConfig (none for other families)."""
    if model_type not in ("gemma", "gemma2"):
        return {}
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention (an encoder, not a decoder) is not supported")
    gemma = {"norm_plus_one": True, "scale_embeddings": True}
    if model_type == "gemma":
        return gemma

    def cap(key: str) -> float | None:
        return None if hf.get(key) is None else float(hf[key])

    return {**gemma, "sandwich_norms": True,
            "query_pre_attn_scalar": float(hf["query_pre_attn_scalar"]),
            "attn_logit_softcap": cap("attn_logit_softcapping"),
            "final_logit_softcap": cap("final_logit_softcapping")}


def _layer_windows(hf: dict, model_type: str) -> list[int | None]:
    """Each layer's sliding window as transformers reads the config: Mistral slides in
    every layer when `sliding_window` is set (and `use_sliding_window` is not false);
    Mixtral in every layer when it is set (its config has neither `use_sliding_window` nor
    `layer_types`); Qwen3-MoE in every layer with `use_sliding_window` (ignoring
    `layer_types` and `max_window_layers`); Qwen2/3 only with `use_sliding_window`, in the
    layers `layer_types` names "sliding_attention" (by default those from
    `max_window_layers` on); Gemma 2 in the layers `layer_types` names (by default every
    other one, from the first)."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if model_type == "gemma2":
        types = hf.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if window is None and "sliding_attention" in types:
            raise ValueError("layer_types names sliding layers, but sliding_window is not set")
    if window is None or model_type not in ("mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
                                            "gemma2"):
        return [None] * layers
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window must be an integer >= 1, got {window!r}")
    if model_type == "gemma2":
        pass  # read above
    elif model_type == "mixtral":
        types = ["sliding_attention"] * layers
    elif model_type == "mistral":
        types = hf.get("layer_types") or ["sliding_attention"] * layers
        if hf.get("use_sliding_window") is False:
            types = ["full_attention"] * layers
    elif not hf.get("use_sliding_window", False):
        types = ["full_attention"] * layers
    elif model_type == "qwen3_moe":
        types = ["sliding_attention"] * layers
    else:
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
            for i in range(layers)]
    if len(types) != layers:
        raise ValueError(f"layer_types has {len(types)} entries for {layers} layers")
    return [window if t == "sliding_attention" else None for t in types]


def _moe_fields(hf: dict, model_type: str) -> dict:
    """The MoE fields of ModelConfig as transformers reads the config, its defaults for
    missing keys included: Mixtral routes in every layer to experts of intermediate_size
    and always renormalizes the top-k; Qwen3-MoE routes in layer i unless i is in
    `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`, to experts of
    moe_intermediate_size, renormalizing only with `norm_topk_prob`."""
    layers = hf["num_hidden_layers"]
    if model_type not in ("mixtral", "qwen3_moe"):
        return {"moe_layers": [False] * layers}
    mixtral = model_type == "mixtral"
    # NOTE: transformers 5 writes num_local_experts for both; Hub Qwen3-MoE configs say num_experts
    experts = hf.get("num_local_experts", hf.get("num_experts", 8 if mixtral else 128))
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < (1 if mixtral else 0):
        raise ValueError(f"num_local_experts / num_experts must be a count of experts, got {experts!r}")
    if mixtral:
        moe_layers = [True] * layers
    else:
        step = hf.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"decoder_sparse_step must be an integer >= 1, got {step!r}")
        dense = set(hf.get("mlp_only_layers") or [])
        moe_layers = [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)]
    return {
        "num_experts": experts,
        "num_experts_per_tok": hf.get("num_experts_per_tok", 2 if mixtral else 8),
        "moe_intermediate_size": hf["intermediate_size"] if mixtral else hf.get("moe_intermediate_size", 768),
        "norm_topk_prob": True if mixtral else bool(hf.get("norm_topk_prob", False)),
        "moe_layers": moe_layers,
    }


class RMSNorm(nn.Module):
    """RMSNorm; with `plus_one` (Gemma) the weight is an offset from 1: x * (1 + weight)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps = eps
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like the HF reference, then cast back
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            # NOTE: Gemma scales before the cast back (in fp32), Llama after it
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's soft-capping, tanh(x / cap) * cap, in x's dtype; x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


@functools.cache
def _embed_scale(hidden_size: int, dtype: torch.dtype) -> float:
    # NOTE: transformers multiplies by sqrt(hidden_size) held as a tensor of the model's
    # dtype (in bf16, sqrt(3072) = 55.43 becomes 55.5): the same rounded value, as a float
    return torch.tensor(hidden_size ** 0.5).to(dtype).item()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D] (non-interleaved halves, as in HF Llama)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.window = cfg.layer_windows[layer] if cfg.layer_windows else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_logit_softcap
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def qkv(self, x, cos, sin):
        """x [T, hidden] -> q [T, H, D], k and v [T, KVH, D], q and k rotated."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v.view(T, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttnMeta):
        # x: [T, hidden]
        T = x.shape[0]
        q, k, v = self.qkv(x, cos, sin)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window,
                            self.softcap, k, v)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Attention then MLP, each added to the residual stream. Llama norms each one's input
    (`input_layernorm`, `post_attention_layernorm`); Gemma 2 ("sandwich") norms the input
    and the output of each (`input_layernorm` and `post_attention_layernorm` around the
    attention, `pre_feedforward_layernorm` and `post_feedforward_layernorm` around the MLP)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)

        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp: nn.Module = MLP(cfg)
        if cfg.moe_layers and cfg.moe_layers[layer]:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                 cfg.moe_intermediate_size, _ACTS[cfg.hidden_act],
                                 cfg.norm_topk_prob, fp32_weights=cfg.model_type == "mixtral")

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return self.add_mlp(self.add_attention(x, a))

    def add_attention(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The residual x plus the attention output a (of input_layernorm(x))."""
        return x + (self.post_attention_layernorm(a) if self.sandwich else a)

    def add_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The residual x plus the MLP's output."""
        if self.sandwich:
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder. `forward` writes the step's K/V into the pool and returns logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, scaling = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_table(inv_freq, cfg.max_position_embeddings, scaling)
        self.register_buffer("cos_table", cos, persistent=False)  # [P, D] fp32
        self.register_buffer("sin_table", sin, persistent=False)
        self.linear = F.linear  # batch_invariant.make_batch_invariant swaps in its own

    @property
    def linear(self) -> Callable[..., torch.Tensor]:
        """The matmul of the logits and of the experts' stacked weights."""
        return self._linear

    @linear.setter
    def linear(self, fn: Callable[..., torch.Tensor]) -> None:
        self._linear = fn
        for m in self.modules():
            if isinstance(m, Experts):
                m.linear = fn

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
        kv: torch.Tensor, logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv: [N, L, 2, bs, KVH, D]; returns fp32 logits [S, V]
        for the tokens at logits_indices [S]. On the CPU a step of a few decodes runs as one
        C++ call (cpu_kernels.forward) where it can."""
        if input_ids.device.type == "cpu":
            if cpu_kernels.takes_forward(self, input_ids, meta, kv, logits_indices):
                return cpu_kernels.forward(self, input_ids, positions, meta, kv, logits_indices)
            if cpu_kernels.takes_step(self, input_ids, meta, kv):
                return cpu_kernels.step(self, input_ids, positions, meta, kv, logits_indices)
        x = self.embed(input_ids)  # [T, hidden]
        cos = self.cos_table[positions].to(x.dtype)[:, None, :]  # [T, 1, D]
        sin = self.sin_table[positions].to(x.dtype)[:, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv[:, i, 0], kv[:, i, 1], meta)
        return self.logits(x[logits_indices])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> embeddings [T, hidden] (Gemma: times sqrt(hidden_size))."""
        x = self.embed_tokens(input_ids)
        return x * _embed_scale(self.cfg.hidden_size, x.dtype) if self.cfg.scale_embeddings else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden states x [S, hidden] -> fp32 logits [S, V]: final norm, the
        output projection and (Gemma 2) its soft-cap, in the model's dtype until the end."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return softcap(self.linear(self.norm(x), w), self.cfg.final_logit_softcap).float()

    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The trainer's view: logits [T, V] (fp32) of every position of one sequence
        input_ids [T], by a plain causal forward with no KV cache, differentiable (no
        inference mode). After make_batch_invariant it uses the same batch-invariant
        kernels as the engine, so it reproduces the engine's logprobs bit for bit."""
        T = input_ids.shape[0]
        positions = torch.arange(T, device=input_ids.device)
        x = self.embed(input_ids)
        cos = self.cos_table[positions].to(x.dtype)[:, None, :]
        sin = self.sin_table[positions].to(x.dtype)[:, None, :]
        for layer in self.layers:
            a = layer.self_attn
            q, k, v = a.qkv(layer.input_layernorm(x), cos, sin)
            o = _dense_attention(q, k, v, a.scale, self.linear is not F.linear, a.window, a.softcap)
            x = layer.add_mlp(layer.add_attention(x, a.o_proj(o.reshape(T, a.q_size))))
        return self.logits(x)

    def hf_named_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their HF names (q/k/v and gate/up split again, experts stacked
        as transformers 5 names them): what `update_hf_weights` and a HF checkpoint take.
        Views, not copies."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            if name.startswith("lm_head"):
                out[name] = p
                continue
            # a fused parameter goes out as its HF parts; stacked experts as they are
            parts = [(name.replace(whole, part), start, size)
                     for part, (whole, start, size) in _fusions(self.cfg).items()
                     if f".{whole}." in name]
            for hf_name, start, size in parts:
                out["model." + hf_name] = p[start : start + size]
            if not parts:
                out["model." + name] = p
        return out

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the model, fusing q/k/v and gate/up, and stacking
        experts given one tensor per expert.

        Raises ValueError naming the first missing or unexpected tensor; a model that
        raised is not to be used.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, t in weights:
            name = canonical_hf_name(name.removeprefix("model."))
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still carry a copy
            target, index = _fused_target(name, self.cfg)
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            dst = params[target] if index is None else params[target][index]
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(t)
            loaded.update(_covered_names(name, self.cfg))
        missing = [n for n in _expected_hf_names(self.cfg) if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")

    def update_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies some or all HF-named tensors into the model (a trainer's update), experts
        stacked or one tensor per expert. Every name and shape is checked before anything
        is copied: on ValueError the model is unchanged."""
        params = dict(self.named_parameters())
        plan = []
        for name, t in weights:
            name = canonical_hf_name(name.removeprefix("model."))
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, index = _fused_target(name, self.cfg)
            p = params.get(target)
            if p is None:
                raise ValueError(f"unexpected weight {name!r}")
            dst = p if index is None else p[index]
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(dst.shape)}")
            plan.append((dst, t))
        with torch.no_grad():
            for dst, t in plan:
                dst.copy_(t)


def _fusions(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor -> (fused tensor, first row, rows)."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
    }


def _dense_attention(q, k, v, scale: float, batch_invariant: bool,
                     window: int | None = None, cap: float | None = None) -> torch.Tensor:
    # q: [T, H, D], k, v: [T, KVH, D] of one whole sequence; causal (within the sliding
    # window when there is one), scores soft-capped by cap; returns [T, H, D]
    T, H, D = q.shape
    KVH = k.shape[1]
    if batch_invariant:
        from agentos.kernel.runner.batch_invariant import session_attention

        return session_attention(q, k, v, scale, window, cap)
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    mask = None
    if window is not None:
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    out = sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
               mask, scale, cap, causal=mask is None)
    return out[0].transpose(0, 1)


# older Mixtral names -> the names Qwen-style MoE checkpoints (and this model) use
_ALIASES = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),
            (re.compile(r"(\.experts\.\d+)\.w1\."), r"\1.gate_proj."),
            (re.compile(r"(\.experts\.\d+)\.w3\."), r"\1.up_proj."),
            (re.compile(r"(\.experts\.\d+)\.w2\."), r"\1.down_proj."))
_EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_STACKED = re.compile(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def canonical_hf_name(name: str) -> str:
    """A HF tensor name (without "model.") with Mixtral's older expert names
    (`block_sparse_moe`, `experts.{e}.w1/w3/w2`) as `mlp` and `gate_proj/up_proj/down_proj`."""
    if "block_sparse_moe" in name or "experts" in name:
        for pattern, repl in _ALIASES:
            name = pattern.sub(repl, name)
    return name


def _fused_target(name: str, cfg: ModelConfig) -> tuple[str, tuple | None]:
    """(parameter, index into it) of the HF tensor `name` (canonical, without "model."):
    index None for the whole parameter. An unknown name comes back as it is."""
    if m := _EXPERT.fullmatch(name):
        stem, e, proj = m.group(1), int(m.group(2)), m.group(3)
        if e >= cfg.num_experts:
            return name, None
        inter = cfg.moe_intermediate_size
        if proj == "down_proj":
            return f"{stem}.down_proj", (e,)
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        return f"{stem}.gate_up_proj", (e, rows)
    for part, (whole, start, size) in _fusions(cfg).items():
        if f".{part}." in name:
            return name.replace(part, whole), (slice(start, start + size),)
    return name, None


def _covered_names(name: str, cfg: ModelConfig) -> list[str]:
    """The names in _expected_hf_names that the HF tensor `name` provides: a stacked
    expert tensor stands for that projection of every expert."""
    m = _STACKED.fullmatch(name)
    if m is None:
        return [name]
    parts = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
    return [f"{m.group(1)}.{e}.{part}.weight" for e in range(cfg.num_experts) for part in parts]


def _expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["embed_tokens.weight", "norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if cfg.sandwich_norms:
            names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(p + f"self_attn.{proj}.weight")
            if (proj != "o_proj" and cfg.qkv_bias) or (proj == "o_proj" and cfg.o_bias):
                names.append(p + f"self_attn.{proj}.bias")
        if cfg.moe_layers and cfg.moe_layers[i]:
            names.append(p + "mlp.gate.weight")
            names += [p + f"mlp.experts.{e}.{proj}.weight" for e in range(cfg.num_experts)
                      for proj in ("gate_proj", "up_proj", "down_proj")]
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(p + f"mlp.{proj}.weight")
            if cfg.mlp_bias:
                names.append(p + f"mlp.{proj}.bias")
    return names
