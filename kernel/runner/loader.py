"""Loading a model: the embedded `tiny` preset or a Hugging Face folder.

A HF folder holds `config.json`, safetensors weights (`model.safetensors`, or shards
listed in `model.safetensors.index.json`), optionally `generation_config.json` and
`tokenizer.json`. Tensors are streamed one at a time into `LlamaModel.load_hf_weights`,
so peak host memory is one tensor, not the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agentos.kernel.runner.model import LlamaModel, ModelConfig, canonical_hf_name
from agentos.kernel.runner.rope import rope_inv_freq, rope_table
from agentos.kernel.runner.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gemma",
                         "gemma2")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
                  "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
                  "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_TINY_SEED = 0
_TINY_STD = 0.02
# sanity bounds of a config's sizes, checked before anything is allocated: (ModelConfig
# field, config.json key, largest value) -- far past any Llama-family checkpoint
_SIZES = (("vocab_size", "vocab_size", 1 << 24), ("hidden_size", "hidden_size", 1 << 16),
          ("intermediate_size", "intermediate_size", 1 << 18),
          ("num_layers", "num_hidden_layers", 1 << 10),
          ("num_heads", "num_attention_heads", 1 << 10),
          ("num_kv_heads", "num_key_value_heads", 1 << 10), ("head_dim", "head_dim", 1 << 12),
          ("max_position_embeddings", "max_position_embeddings", 1 << 22))
# the same for the MoE sizes, checked when a layer is MoE
_MOE_SIZES = (("num_experts", "num_local_experts / num_experts", 1 << 12),
              ("num_experts_per_tok", "num_experts_per_tok", 1 << 12),
              ("moe_intermediate_size", "moe_intermediate_size", 1 << 18))


def load_model(
    model: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> tuple[LlamaModel, ModelConfig, Tokenizer]:
    """Builds the model named by `model` ("tiny", a HF folder, or a Hugging Face Hub id
    resolved by `resolve_model`) on `device` in `dtype`.

    dtype None (or "auto") means float32 on cpu and, elsewhere, the config's
    `torch_dtype`/`dtype`, else bfloat16. Returns (model in eval mode without grads, its
    config with eos ids merged from generation_config.json, tokenizer). Raises
    FileNotFoundError for a missing folder, config.json or weights, and ValueError for an
    unsupported architecture or option, a bad dtype or device, or weights that do not
    match the config.
    """
    device = _resolve_device(device)
    if model == "tiny":
        hf = tiny_hf_config()
        folder = None
    else:
        folder = Path(resolve_model(model, revision))
        hf = _read_json(folder / "config.json", "config.json")
    cfg = hf_model_config(hf)
    dtype = _resolve_dtype(dtype, device, hf)
    files: list[Path] = []
    if folder is None:
        weights: Iterable[tuple[str, torch.Tensor]] = tiny_hf_weights().items()
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        files = _weight_files(folder)
        weights = _read_safetensors(files)
        _add_eos_ids(cfg, folder / "generation_config.json")
        tokenizer = _load_tokenizer(folder, cfg)
        _check_checkpoint(cfg, files)
    if not cfg.eos_token_ids:
        cfg.eos_token_ids = list(tokenizer.eos_token_ids)
    if not tokenizer.eos_token_ids:
        tokenizer.eos_token_ids = list(cfg.eos_token_ids)
    net = _empty_model(cfg, device, dtype)
    with _progress(files) as count:
        net.load_hf_weights((name, t.to(dtype) if t.is_floating_point() else t)
                            for name, t in count(weights))
    return net.eval(), cfg, tokenizer


# what a checkpoint needs from the Hub: config, generation config, tokenizer, weights
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str, revision: str | None = None) -> str:
    """The local folder of `model`: a folder as it is; else a Hugging Face Hub id
    (`org/name`) through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE and HF_TOKEN as
    it reads them), downloading only the files in HUB_FILES. Raises FileNotFoundError in
    one line (how to point at a local folder) when neither works."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return str(folder)
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"model {model!r} is neither 'tiny', a folder holding a HF "
                                "checkpoint, nor a Hugging Face Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"model {model!r} looks like a Hub id, but huggingface_hub is "
                                "not installed; give a local checkpoint folder") from None
    try:
        return snapshot_download(model, revision=revision, allow_patterns=HUB_FILES)
    except Exception as e:  # offline and not cached, no such repo or revision, no network
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"model {model!r}{f' at revision {revision!r}' if revision else ''} could not be "
            f"had from the Hugging Face Hub ({type(e).__name__}: {reason[:200]}); download it "
            "where there is a network (huggingface-cli download) or give --model a local "
            "checkpoint folder") from None


def hf_model_config(hf: dict) -> ModelConfig:
    """Returns the ModelConfig of a HF config dict after checking that this engine runs it.

    Raises ValueError for a model type other than SUPPORTED_MODEL_TYPES, and naming
    the field for one that is missing, malformed or out of bounds (a size past the sanity
    bounds, an epsilon or RoPE parameter that would make every call NaN).
    """
    if not isinstance(hf, dict):
        raise ValueError("config.json is not a JSON object")
    model_type = hf.get("model_type")
    if model_type is None:
        known = [_ARCHITECTURES[a] for a in hf.get("architectures") or [] if a in _ARCHITECTURES]
        model_type = known[0] if known else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} "
                         f"(architectures {hf.get('architectures')}); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        cfg = ModelConfig.from_hf({**hf, "model_type": model_type})
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"config.json has a malformed field: {e}") from None
    _check_config(cfg)
    return cfg


def _check_config(cfg: ModelConfig) -> None:
    """Raises ValueError, naming the field, unless the model these numbers describe can run."""
    for name, key, limit in _SIZES + (_MOE_SIZES if any(cfg.moe_layers) else ()):
        v = getattr(cfg, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit):
            raise ValueError(f"config.json: {key} must be an integer in [1, {limit}], got {v!r}")
    if not 0 < cfg.rms_norm_eps < 1:  # also false for NaN
        raise ValueError(f"config.json: rms_norm_eps must be in (0, 1), got {cfg.rms_norm_eps}")
    if not 0 < cfg.rope_theta < math.inf:
        raise ValueError(f"config.json: rope_theta must be a positive number, got {cfg.rope_theta}")
    for key, v in (("query_pre_attn_scalar", cfg.query_pre_attn_scalar),
                   ("attn_logit_softcapping", cfg.attn_logit_softcap),
                   ("final_logit_softcapping", cfg.final_logit_softcap)):
        if v is not None and not 0 < v < math.inf:  # None: not used (or no cap)
            raise ValueError(f"config.json: {key} must be a positive number, got {v}")
    ids = [*cfg.eos_token_ids, *([] if cfg.bos_token_id is None else [cfg.bos_token_id])]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError("config.json: bos_token_id and eos_token_id must be token ids")
    try:
        inv_freq, scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    except KeyError as e:
        raise ValueError(f"config.json: rope_scaling lacks {e.args[0]!r}") from None
    except (TypeError, ZeroDivisionError, OverflowError, AttributeError) as e:
        raise ValueError(f"config.json: malformed rope_scaling: {e}") from None
    if not (bool(torch.isfinite(inv_freq).all()) and bool((inv_freq > 0).all())
            and 0 < scale < math.inf):
        raise ValueError(f"config.json: rope_scaling {cfg.rope_scaling} gives non-positive "
                         "or non-finite frequencies (a factor must be a positive number)")


def _check_checkpoint(cfg: ModelConfig, files: list[Path]) -> None:
    """Raises ValueError unless the checkpoint's tensors (read from the file headers, not
    loaded) have the layers and shapes the config says, so that a config claiming more
    or larger layers than its weights is refused before the model is allocated. Experts
    may be stacked (transformers 5) or one tensor per expert (Mixtral's older names too)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[canonical_hf_name(name.removeprefix("model."))] = \
                    tuple(f.get_slice(name).get_shape())
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"layers\.(\d+)\.", n))}
    if len(layers) != cfg.num_layers:
        raise ValueError(f"config.json: num_hidden_layers is {cfg.num_layers}, but the "
                         f"checkpoint holds {len(layers)} layers")
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inter, moe_inter, experts = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts
    expected = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        expected |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                     p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                     p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if cfg.sandwich_norms:
            expected |= {p + "pre_feedforward_layernorm.weight": (h,),
                         p + "post_feedforward_layernorm.weight": (h,)}
        if not (cfg.moe_layers and cfg.moe_layers[i]):
            expected |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                         p + "mlp.down_proj.weight": (h, inter)}
            continue
        expected[p + "mlp.gate.weight"] = (experts, h)
        stacked = p + "mlp.experts.gate_up_proj"
        if stacked in shapes:
            expected[stacked] = (experts, 2 * moe_inter, h)
        else:
            expected |= {p + f"mlp.experts.{e}.{proj}.weight": (moe_inter, h)
                         for e in range(experts) for proj in ("gate_proj", "up_proj")}
        stacked = p + "mlp.experts.down_proj"
        if stacked in shapes:
            expected[stacked] = (experts, h, moe_inter)
        else:
            expected |= {p + f"mlp.experts.{e}.down_proj.weight": (h, moe_inter)
                         for e in range(experts)}
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"checkpoint lacks {name!r}")
        if shapes[name] != shape:
            raise ValueError(f"checkpoint {name!r} has shape {shapes[name]}; config.json says "
                             f"{shape}")


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"bad device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available")
    return device


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, hf: dict):
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, not {dtype}")
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype")), torch.bfloat16)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _weight_files(folder: Path) -> list[Path]:
    # a single file, shards named by the index, or (no index) every *.safetensors file
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, index.name).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is not a JSON object")
        names = sorted(set(weight_map.values()), key=str)
        bad = [n for n in names if not isinstance(n, str) or Path(n).is_absolute()
               or ".." in Path(n).parts]
        if bad:  # NOTE: confined by name, not resolved: HF cache folders link to blobs
            raise ValueError(f"{index} lists a shard outside the model folder: {bad[0]!r}")
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {folder} (model.safetensors or "
            "model.safetensors.index.json); .bin/.pt checkpoints are not supported")
    return files


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


@contextmanager
def _progress(files: list[Path]) -> Iterator[Callable[[Iterable], Iterable]]:
    """Yields count(weights), which passes the (name, tensor) pairs through unchanged
    while a transient bar on stderr counts their bytes against the files' sizes. The
    bar shows only on a terminal, never in logs or tests; count returns weights as they
    are when there is no bar (no files, stderr not a terminal, or another live display,
    such as a benchmark's progress bar, already drawing: rich then wraps stderr, and two
    live displays would garble the terminal)."""
    if not files or not sys.stderr.isatty() or _live_display():
        yield lambda weights: weights
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("loading {task.description}", markup=False), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(files[0].parent.name, total=sum(f.stat().st_size for f in files))

        def count(weights: Iterable[tuple[str, torch.Tensor]]):
            for name, t in weights:
                bar.advance(task, t.numel() * t.element_size())
                yield name, t

        yield count


def _live_display() -> bool:
    from rich.file_proxy import FileProxy

    return isinstance(sys.stderr, FileProxy)


def _add_eos_ids(cfg: ModelConfig, path: Path) -> None:
    # generation_config.json's eos ids stop generation too (e.g. <|eot_id|> of chat models)
    if not path.is_file():
        return
    eos = _read_json(path, path.name).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not (isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them")
    for i in ids:
        if i not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(i)


def _load_tokenizer(folder: Path, cfg: ModelConfig) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    tokenizer = ByteTokenizer(cfg.vocab_size)
    if cfg.vocab_size < 260:
        raise ValueError(
            f"{folder} has no tokenizer.json and its vocab_size {cfg.vocab_size} is too small "
            f"for the byte-level fallback tokenizer ({tokenizer.vocab_size} ids)")
    return tokenizer


def _empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    # NOTE: built on the meta device so no memory is spent on random init; every parameter
    # is then overwritten by load_hf_weights (which fails if one is missing). The rope
    # tables are buffers computed in __init__, so they are computed again for real, fp32.
    with torch.device("meta"):
        net = LlamaModel(cfg)
    net = net.to(dtype=dtype).to_empty(device=device)
    inv_freq, scaling = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_table(inv_freq, cfg.max_position_embeddings, scaling)
    net.cos_table, net.sin_table = cos.to(device), sin.to(device)
    return net.requires_grad_(False)


def tiny_hf_config() -> dict:
    """Returns the HF LlamaConfig dict of the embedded `tiny` model (byte vocabulary)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 260,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": ByteTokenizer.BOS,
        "eos_token_id": ByteTokenizer.EOS,
        "pad_token_id": ByteTokenizer.PAD,
    }


def tiny_hf_weights() -> dict[str, torch.Tensor]:
    """Returns the `tiny` weights under HF names, float32 on cpu: normal(0, 0.02) from a
    torch.Generator seeded 0, drawn in a fixed order; norm weights are ones."""
    hf = tiny_hf_config()
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    q = hf["num_attention_heads"] * hf["head_dim"]
    kv = hf["num_key_value_heads"] * hf["head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(_TINY_SEED)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, _TINY_STD, generator=gen)

    weights = {"model.embed_tokens.weight": normal(hf["vocab_size"], hidden)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(q, hidden)
        weights[p + "self_attn.k_proj.weight"] = normal(kv, hidden)
        weights[p + "self_attn.v_proj.weight"] = normal(kv, hidden)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    weights["model.norm.weight"] = torch.ones(hidden)
    return weights


def save_hf_folder(path: str | Path, hf_config: dict, weights: dict[str, torch.Tensor]) -> Path:
    """Writes `config.json` and `model.safetensors` into `path` (created if needed), a
    folder that both `load_model` and transformers' `from_pretrained` read. Returns the
    folder; overwrites those two files."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
