"""The CPU's C++ kernels (cpu_kernels.cpp): paged decode attention, the fast path of
`attention.paged_attention` for a step's decodes, and a whole decode step of a dense
float32 model, the fast path of `LlamaModel.forward` when a step holds only decodes.

Decode attention: the torch path gathers each sequence's blocks into a contiguous copy,
then runs SDPA over it: at batch 32 that moves the whole context through memory three times
a layer (read, write, read again) and is 85% of a tiny-model decode step. The kernel reads
K and V once, in place, through the block table.

Decode step: the eager forward of one token runs about 35 small torch operations a layer
around its matrix-vector products, and MKL's sgemm at one row keeps one core busy where
the step is bound by reading the weights. `forward` runs the step in one call: each weight
row streamed once for all the step's tokens, rows split over the threads, nothing between
the operations but a few loops.

Any other step of those models (prefills, mixed steps, more decodes than `forward` takes):
`step` keeps torch for the matrix products (MKL's GEMMs are at this CPU's peak from a few
hundred rows) and the attention (SDPA, the decode kernel above), and runs everything between
them as C++ passes over the step's rows: about 15 torch operations a layer become 4 calls.
A 2,048-token prefill of the tiny model: 124 ms -> 97 ms, 72 of them the GEMMs.

Built on first use with the system C++ compiler (`$CXX`, else c++ or g++; `-O3
-march=native -fopenmp`) into `~/.cache/agentos/kernels` (`$AGENTOS_KERNEL_CACHE`), keyed by
the source, the compiler and this CPU's flags, and loaded with ctypes, which lets go of the
GIL for the call. The library takes OpenMP from the process (torch's libgomp, already
loaded), so it shares torch's threads rather than starting a second pool.

When no compiler is found or the build fails, `available()` is False (one warning) and the
torch path runs; so it does under AGENTOS_ATTENTION=torch (to compare the two).
Attention: float32 and bfloat16, any head dim, grouped-query heads, sliding windows,
soft-capped scores. Forward: float32 dense models (every family model.py loads but the
MoE ones), up to FORWARD_MAX_ROWS decodes a step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("agentos.attention")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BUILD_TIMEOUT_S = 300
_ARGS = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int64,
                                                          ctypes.c_float, ctypes.c_int64,
                                                          ctypes.c_int]
TASKS_PER_THREAD = 2  # a batch smaller than threads * this splits each sequence's keys
MIN_SPLIT_TOKENS = 256  # but into ranges of at least this many keys
_FUNCTIONS = {torch.float32: "agentos_decode_f32", torch.bfloat16: "agentos_decode_bf16"}


def available() -> bool:
    """True when the library is built (building it now if needed)."""
    return _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True when decode() takes these: CPU tensors of a supported dtype, each block of the
    caches one contiguous [block_size, KVH, D] run, K and V strided alike."""
    if q.device.type != "cpu" or q.dtype not in _FUNCTIONS or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype or v_cache.shape != k_cache.shape or q.shape[0] == 0:
        return False
    _, bs, kvh, d = k_cache.shape
    inner = (kvh * d, d, 1)
    return (k_cache.stride()[1:] == inner and v_cache.stride() == k_cache.stride()
            and q.shape[1] % kvh == 0 and q.shape[2] == d)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
           window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """One query per sequence, q [B, H, D], over the first ctx_lens[b] keys of its blocks
    block_tables [B, max_blocks]; returns [B, H, D]. The caller checked `supports`.
    Raises IndexError, reading nothing, when a context length is below 1 or past its
    table, or a block id it reaches is outside the caches."""
    lib = _library()
    assert lib is not None, "decode() called without available()"
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = ctx_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    B, H, D = q.shape
    _, bs, kvh, _ = k_cache.shape
    threads = torch.get_num_threads()
    splits = _splits(threads, B, tables.shape[1] * bs)
    bad = getattr(lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        lens.data_ptr(), out.data_ptr(), B, H, kvh, D, bs, k_cache.shape[0], tables.shape[1],
        k_cache.stride(0), scale, window or 0, cap or 0.0, splits, threads)
    if bad:
        raise IndexError("paged decode: a context length or block id outside the table or pool")
    return out


def _splits(threads: int, batch: int, table_tokens: int) -> int:
    # key ranges per sequence: enough tasks for every thread, none under MIN_SPLIT_TOKENS keys
    return max(1, min(-(-threads * TASKS_PER_THREAD // batch), table_tokens // MIN_SPLIT_TOKENS))


# decodes a step up to which forward() runs; past it the torch path's GEMMs (MKL) catch up
# (2 threads, fp32, ms a step, this vs the torch path: tiny at 160 tokens 0.25 vs 1.9 at 1
# decode, 3.8 vs 5.3 at 32, 13 vs 14 at 128, 25 vs 25 at 256; Qwen2.5-0.5B shape 65 vs 141
# at 1, 235 vs 404 at 32, 841 vs 1,135 at 128)
FORWARD_MAX_ROWS = 128
# a step() of at most this many rows (a short chunk: an agent's tool output, a few decodes
# beside it) takes its weight products through matvec, the decode step's: it reads each
# weight row once for all rows, where MKL's GEMM at a few rows runs far below its peak.
# Weight products of one layer, us, MKL against matvec (2 threads): the tiny model's shapes
# at 1 / 17 / 64 / 128 rows 74 / 289 / 664 / 1,245 against 36 / 186 / 628 / 1,450; the
# Qwen2.5-0.5B shape's 3,200 / 9,281 / 17,707 / 30,527 against 1,333 / 4,004 / 11,694 / 21,428
STEP_MATVEC_MAX_ROWS = 64
# the C++ Dim, Const and Act enums, in order
_DIMS = ("B", "S", "hidden", "inter", "heads", "kv_heads", "head_dim", "vocab", "layers",
         "block_size", "num_blocks", "max_blocks", "block_stride", "rope_rows", "act",
         "norm_plus_one", "sandwich", "qk_norm", "splits", "threads")
_CONSTS = ("eps", "embed_scale", "attn_scale", "attn_cap", "final_cap")
_ACTS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
_LAYER_TENSORS = 14  # then K and V of the layer: the C++ LayerPtr enum


def takes_forward(model, input_ids: torch.Tensor, meta, kv: torch.Tensor,
                  logits_indices: torch.Tensor) -> bool:
    """True when forward() runs this step of `model` (a LlamaModel): a float32 dense model
    on the CPU with its plain matmul (not the batch-invariant one), a step of 1 to
    FORWARD_MAX_ROWS decodes and nothing else (no prefill, no shared prefix), a contiguous
    float32 pool, the library built, and AGENTOS_ATTENTION at "auto" (under "torch" or
    "triton" the step runs the kernels asked for)."""
    from agentos.kernel.runner import attention

    B = input_ids.shape[0]
    return (attention.BACKEND == "auto" and 0 < B <= FORWARD_MAX_ROWS
            and meta.num_decodes == B and not meta.prefills and not meta.shared
            and not meta.deterministic and input_ids.device.type == "cpu"
            and kv.dtype == torch.float32 and kv.device.type == "cpu" and kv.is_contiguous()
            and _plan(model) is not None and available())


def forward(model, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv: torch.Tensor,
            logits_indices: torch.Tensor) -> torch.Tensor:
    """LlamaModel.forward of a decode-only step (the caller checked `takes_forward`): writes
    each token's K/V at its slot and returns the fp32 logits [S, V] of the tokens at
    logits_indices [S]. Raises IndexError, having written nothing, when a token id,
    position, slot, context length, block id or logits index is out of range."""
    lib = _library()
    plan = _PLANS.get(model)  # made by takes_forward
    assert lib is not None and plan is not None, "forward() called without takes_forward()"
    cfg = model.cfg
    B, S = input_ids.shape[0], logits_indices.shape[0]
    tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
    N, L, _, bs, kvh, d = kv.shape
    if (L, kvh, d) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) or tables is None \
            or lens is None or tables.shape[0] != B or lens.shape != (B,):
        raise ValueError("forward: the pool or the decode tables do not match the model")
    ints = [t.to(torch.int64).contiguous() for t in (input_ids, positions, meta.slot_mapping,
                                                      tables, lens, logits_indices)]
    if ints[1].shape != (B,) or ints[2].shape != (B,):
        raise ValueError("forward: one position and one slot per token")
    threads = torch.get_num_threads()
    dims = dict(B=B, S=S, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                heads=cfg.num_heads, kv_heads=kvh, head_dim=d, vocab=cfg.vocab_size,
                layers=L, block_size=bs, num_blocks=N, max_blocks=tables.shape[1],
                block_stride=kv.stride(0), rope_rows=model.cos_table.shape[0],
                act=_ACTS[cfg.hidden_act], norm_plus_one=cfg.norm_plus_one,
                sandwich=cfg.sandwich_norms, qk_norm=cfg.qk_norm,
                splits=_splits(threads, B, tables.shape[1] * bs), threads=threads)
    logits = torch.empty(S, cfg.vocab_size, dtype=torch.float32)
    bad = lib.agentos_forward_f32(
        (ctypes.c_int64 * len(_DIMS))(*(int(dims[k]) for k in _DIMS)), plan.consts,
        plan.pointers(kv), plan.windows, *(t.data_ptr() for t in ints),
        *(t.data_ptr() for t in plan.head), logits.data_ptr())
    if bad:
        raise IndexError("decode forward: a token id, position, slot, context length, block id "
                         "or logits index out of range")
    return logits


def takes_step(model, input_ids: torch.Tensor, meta, kv: torch.Tensor) -> bool:
    """True when step() runs this step of `model` (a LlamaModel): what forward() does not
    take (prefills, shared prefixes, more than FORWARD_MAX_ROWS decodes) of the same models:
    float32 dense on the CPU with its plain matmul, not batch-invariant, a contiguous
    float32 pool, the library built, AGENTOS_ATTENTION at "auto"."""
    from agentos.kernel.runner import attention

    return (attention.BACKEND == "auto" and not meta.deterministic
            and input_ids.device.type == "cpu" and input_ids.shape[0] > 0
            and kv.dtype == torch.float32 and kv.device.type == "cpu" and kv.is_contiguous()
            and _plan(model) is not None and available())


def step(model, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv: torch.Tensor,
         logits_indices: torch.Tensor) -> torch.Tensor:
    """LlamaModel.forward of a step takes_step took: the matrix products through MKL's
    GEMMs (matvec at most STEP_MATVEC_MAX_ROWS rows), the attention through torch (SDPA
    and the C++ decode attention), the work between them
    in C++ passes over the step's rows (the norms, Qwen3's q/k norms, RoPE and the K/V
    writes, the activation, the residual adds). Returns the fp32 logits [S, V] of the tokens
    at logits_indices [S]. Raises IndexError, having written nothing, when a token id,
    position or slot is out of range."""
    from agentos.kernel.runner.attention import paged_attention

    lib = _library()
    plan = _PLANS.get(model)  # made by takes_step
    assert lib is not None and plan is not None, "step() called without takes_step()"
    plan.pointers(kv)  # NOTE: checks every weight's dtype, shape and layout when one moved
    cfg = model.cfg
    T, E, I = input_ids.shape[0], cfg.hidden_size, cfg.intermediate_size
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_size, kv_size = H * D, KVH * D
    _, L, _, bs, kvh, d = kv.shape
    if (L, kvh, d) != (cfg.num_layers, KVH, D):
        raise ValueError("step: the pool does not match the model")
    threads, eps, one = torch.get_num_threads(), cfg.rms_norm_eps, int(cfg.norm_plus_one)
    act = _ACTS[cfg.hidden_act]
    pos = positions.to(torch.int64).contiguous()
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    if pos.shape != (T,) or slots.shape != (T,):
        raise ValueError("step: one position and one slot per token")
    x = model.embed(input_ids).contiguous()  # [T, E]; IndexError for a bad token id
    h, mid = torch.empty_like(x), torch.empty(T, I)

    def ptr(t):
        return None if t is None else t.data_ptr()

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if T > STEP_MATVEC_MAX_ROWS:
            return F.linear(x, w, b)
        x = x.contiguous()
        y = torch.empty(T, w.shape[0])
        lib.agentos_matvec_f32(w.data_ptr(), ptr(b), x.data_ptr(), y.data_ptr(), T, w.shape[0],
                               w.shape[1], threads)
        return y

    for i, layer in enumerate(model.layers):
        a, mlp = layer.self_attn, layer.mlp
        lib.agentos_rms_norm_f32(x.data_ptr(), layer.input_layernorm.weight.data_ptr(),
                                 h.data_ptr(), T, E, eps, one, threads)
        qkv = linear(h, a.qkv_proj.weight, a.qkv_proj.bias)  # [T, q + 2 kv]
        k_cache, v_cache = kv[:, i, 0], kv[:, i, 1]
        if lib.agentos_rope_write_f32(
                qkv.data_ptr(), T, H, KVH, D, pos.data_ptr(), model.cos_table.data_ptr(),
                model.sin_table.data_ptr(), model.cos_table.shape[0],
                ptr(getattr(a, "q_norm", None) and a.q_norm.weight),
                ptr(getattr(a, "k_norm", None) and a.k_norm.weight), eps, slots.data_ptr(),
                k_cache.data_ptr(), v_cache.data_ptr(), bs, kv.stride(0), kv.shape[0], threads):
            raise IndexError("step: a position or slot out of range")
        q = qkv[:, :q_size].view(T, H, D)
        k = qkv[:, q_size : q_size + kv_size].view(T, KVH, D)
        v = qkv[:, q_size + kv_size :].view(T, KVH, D)
        o = paged_attention(q, k_cache, v_cache, meta, a.scale, a.window, a.softcap, k, v)
        o = linear(o.reshape(T, q_size), a.o_proj.weight, a.o_proj.bias)
        sandwich = layer.sandwich
        lib.agentos_add_norm_f32(
            x.data_ptr(), o.data_ptr(),
            ptr(layer.post_attention_layernorm.weight) if sandwich else None,
            (layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
             ).weight.data_ptr(), h.data_ptr(), T, E, eps, one, threads)
        gate_up = linear(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)  # [T, 2 I]
        lib.agentos_act_mul_f32(gate_up.data_ptr(), mid.data_ptr(), T, I, act, threads)
        o = linear(mid, mlp.down_proj.weight, mlp.down_proj.bias)
        lib.agentos_add_norm_f32(
            x.data_ptr(), o.data_ptr(),
            ptr(layer.post_feedforward_layernorm.weight) if sandwich else None, None, None,
            T, E, eps, one, threads)
    return model.logits(x[logits_indices])


class _Plan:
    """What forward() passes for one model: its tensors in the C++ order (their addresses
    read at each call, their shapes checked whenever one moved), constants and windows."""

    def __init__(self, model):
        cfg = model.cfg
        self.num_layers = len(model.layers)
        E, I = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.tensors: list[torch.Tensor | None] = []
        self.shapes: list[tuple[int, ...]] = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp

            def opt(mod, name):
                return getattr(mod, name).weight if hasattr(mod, name) else None

            self.tensors += [layer.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias,
                             opt(a, "q_norm"), opt(a, "k_norm"), a.o_proj.weight, a.o_proj.bias,
                             layer.post_attention_layernorm.weight,
                             opt(layer, "pre_feedforward_layernorm"),
                             opt(layer, "post_feedforward_layernorm"), m.gate_up_proj.weight,
                             m.gate_up_proj.bias, m.down_proj.weight, m.down_proj.bias]
            self.shapes += [(E,), (q + 2 * kv, E), (q + 2 * kv,), (cfg.head_dim,),
                            (cfg.head_dim,), (E, q), (E,), (E,), (E,), (E,), (2 * I, E),
                            (2 * I,), (E, I), (E,)]
        lm = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
        # the embedding, the final norm, the output projection and the RoPE tables
        self.head = [model.embed_tokens.weight, model.norm.weight, lm, model.cos_table,
                     model.sin_table]
        self.tensors += self.head
        rope = (model.cos_table.shape[0], cfg.head_dim)
        self.shapes += [(cfg.vocab_size, E), (E,), (cfg.vocab_size, E), rope, rope]
        from agentos.kernel.runner.model import _embed_scale

        values = dict(eps=cfg.rms_norm_eps,
                      embed_scale=_embed_scale(E, torch.float32) if cfg.scale_embeddings else 1.0,
                      attn_scale=model.layers[0].self_attn.scale,
                      attn_cap=cfg.attn_logit_softcap or 0.0,
                      final_cap=cfg.final_logit_softcap or 0.0)
        self.consts = (ctypes.c_float * len(_CONSTS))(*(values[k] for k in _CONSTS))
        self.windows = (ctypes.c_int64 * len(model.layers))(
            *(layer.self_attn.window or 0 for layer in model.layers))
        self._addresses: list[int] = []
        self._pointers = None

    def pointers(self, kv: torch.Tensor):
        """The layers' pointer table (ctypes), with each layer's K and V views of kv."""
        addresses = [0 if t is None else t.data_ptr() for t in self.tensors]
        addresses.append(kv.data_ptr())
        if addresses != self._addresses:
            for t, shape in zip(self.tensors, self.shapes):
                if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"
                                      or tuple(t.shape) != shape or not t.is_contiguous()):
                    raise ValueError("forward: a weight or RoPE table is not a contiguous "
                                     f"float32 CPU tensor of shape {shape}")
            ptrs = []
            item = kv.element_size()
            for i in range(self.num_layers):
                ptrs += addresses[i * _LAYER_TENSORS : (i + 1) * _LAYER_TENSORS]
                ptrs += [kv.data_ptr() + i * kv.stride(1) * item,
                         kv.data_ptr() + (i * kv.stride(1) + kv.stride(2)) * item]
            self._pointers = (ctypes.c_void_p * len(ptrs))(*ptrs)
            self._addresses = addresses
        return self._pointers


def _plan(model) -> _Plan | None:
    """The model's cached _Plan, or None when forward() cannot run it: not float32 on the
    CPU, an MoE layer, an activation it lacks, or the batch-invariant matmul swapped in."""
    w = model.embed_tokens.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or model.linear is not F.linear:
        return None
    plan = _PLANS.get(model)
    if plan is None:
        cfg = model.cfg  # NOTE: fixed for a model's life: read once, when a plan is made
        if any(cfg.moe_layers) or cfg.hidden_act not in _ACTS:
            return None
        plan = _PLANS[model] = _Plan(model)
    return plan


# NOTE: beside the model, not on it: a plan holds ctypes pointers, which would make the
# model impossible to deepcopy or pickle; it holds no reference to the model either, so
# the entry goes with it
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the CPU kernels are unavailable (%s); using the torch path", e)
        return None
    for name in _FUNCTIONS.values():
        getattr(lib, name).argtypes = _ARGS
        getattr(lib, name).restype = ctypes.c_int
    counts = (lib.agentos_forward_dims(), lib.agentos_forward_consts(),
              lib.agentos_forward_layer_ptrs())
    assert counts == (len(_DIMS), len(_CONSTS), _LAYER_TENSORS + 2), counts
    lib.agentos_forward_f32.argtypes = [ctypes.c_void_p] * 16
    lib.agentos_forward_f32.restype = ctypes.c_int
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.agentos_add_norm_f32.argtypes = [p] * 5 + [i64, i64, f32, i32, i32]
    lib.agentos_add_norm_f32.restype = None
    lib.agentos_rms_norm_f32.argtypes = [p] * 3 + [i64, i64, f32, i32, i32]
    lib.agentos_rms_norm_f32.restype = None
    lib.agentos_rope_write_f32.argtypes = ([p] + [i64] * 4 + [p] * 3 + [i64] + [p] * 2 + [f32]
                                           + [p] * 3 + [i64] * 3 + [i32])
    lib.agentos_rope_write_f32.restype = ctypes.c_int
    lib.agentos_act_mul_f32.argtypes = [p, p, i64, i64, i32, i32]
    lib.agentos_act_mul_f32.restype = None
    lib.agentos_matvec_f32.argtypes = [p] * 4 + [i64] * 3 + [i32]
    lib.agentos_matvec_f32.restype = None
    return lib


def _build() -> Path:
    """The built library's path, compiling it when this source, compiler and CPU have none
    yet. Raises RuntimeError when there is no compiler or it fails."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS, _compiler_version(cxx),
                                             _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("AGENTOS_KERNEL_CACHE")
                 or Path.home() / ".cache" / "agentos" / "kernels")
    target = cache / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # NOTE: built beside the target, then renamed: concurrent builders never load half a file
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


@functools.cache
def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return proc.stdout.splitlines()[0] if proc.stdout else ""


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
