"""Loading a model: the embedded `tiny` preset or a Hugging Face folder.

A HF folder holds `config.json`, safetensors weights (`model.safetensors`, or shards
listed in `model.safetensors.index.json`), optionally `generation_config.json` and
`tokenizer.json`. Tensors are streamed one at a time into `LlamaModel.load_hf_weights`,
so peak host memory is one tensor, not the checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agentos.kernel.runner.model import LlamaModel, ModelConfig
from agentos.kernel.runner.rope import rope_inv_freq, rope_table
from agentos.kernel.runner.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "MistralForCausalLM": "mistral"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_TINY_SEED = 0
_TINY_STD = 0.02


def load_model(
    model: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
) -> tuple[LlamaModel, ModelConfig, Tokenizer]:
    """Builds the model named by `model` ("tiny" or a HF folder) on `device` in `dtype`.

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
        folder = Path(model)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model {model!r} is neither 'tiny' nor a folder holding a HF checkpoint")
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
    if not cfg.eos_token_ids:
        cfg.eos_token_ids = list(tokenizer.eos_token_ids)
    if not tokenizer.eos_token_ids:
        tokenizer.eos_token_ids = list(cfg.eos_token_ids)
    net = _empty_model(cfg, device, dtype)
    with _progress(files) as count:
        net.load_hf_weights((name, t.to(dtype) if t.is_floating_point() else t)
                            for name, t in count(weights))
    return net.eval(), cfg, tokenizer


def hf_model_config(hf: dict) -> ModelConfig:
    """Returns the ModelConfig of a HF config dict after checking that this engine runs it.

    Raises ValueError for a model type other than llama/qwen2/mistral, or for active
    sliding-window attention (which the paged attention does not implement).
    """
    model_type = hf.get("model_type")
    if model_type is None:
        known = [_ARCHITECTURES[a] for a in hf.get("architectures") or [] if a in _ARCHITECTURES]
        model_type = known[0] if known else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} "
                         f"(architectures {hf.get('architectures')}); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    _check_sliding_window(hf, model_type)
    return ModelConfig.from_hf({**hf, "model_type": model_type})


def _check_sliding_window(hf: dict, model_type: str) -> None:
    window = hf.get("sliding_window")
    max_len = hf.get("max_position_embeddings", 2048)
    if model_type not in ("mistral", "qwen2") or window is None or window >= max_len:
        return
    if model_type == "mistral":
        active = hf.get("use_sliding_window", True)
    else:
        # NOTE: Qwen2 slides only when use_sliding_window, and then only in the layers
        # listed as sliding (by default those from max_window_layers on).
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(hf["num_hidden_layers"])]
        active = hf.get("use_sliding_window", False) and "sliding_attention" in layer_types
    if active:
        raise ValueError(
            f"{model_type} config uses sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={max_len}), which is not supported; a checkpoint "
            "trained with full attention can set use_sliding_window: false")


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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    # a single file, shards named by the index, or (no index) every *.safetensors file
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index, index.name).get("weight_map", {}).values()))
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
    for i in [] if eos is None else [eos] if isinstance(eos, int) else eos:
        if i not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(int(i))


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
