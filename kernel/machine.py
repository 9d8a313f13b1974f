"""What a kernel runs on: the model, its tokenizer and its runner (with the KV pools), and
the sizes they fix. `load_machine` builds one from a Config (in the kernel's loop thread:
see Kernel); a simulation builds its own, with a stand-in runner and no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil
import torch

from agentos.kernel.config import Config
from agentos.kernel.runner.loader import load_model
from agentos.kernel.runner.model import ModelConfig
from agentos.kernel.runner.model_runner import ModelRunner

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Machine:
    model: Any  # the LlamaModel; None in a simulation
    model_config: ModelConfig
    tokenizer: Any
    runner: Any  # the ModelRunner, or a stand-in with execute() and run_copies()
    dtype: torch.dtype | None  # of the weights and the KV
    max_model_len: int  # context limit in tokens
    block_bytes: int  # bytes of one KV block (all layers)
    num_blocks: int  # device KV blocks
    host_blocks: int  # host swap blocks


def load_machine(config: Config) -> Machine:
    """Loads the model and allocates the KV pools, sized from free memory where the config
    leaves them unset. Raises what loading raises (FileNotFoundError, ValueError, ...)."""
    dtype = _DTYPES[config.dtype] if config.dtype else None
    model, mc, tokenizer = load_model(config.model, config.device, dtype, config.revision)
    dtype = next(model.parameters()).dtype
    max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    block_bytes = ModelRunner.block_bytes(model, config.block_size, dtype)
    num_blocks = config.kv_blocks or _auto_kv_blocks(config, block_bytes)
    host_blocks = config.host_blocks if config.host_blocks is not None else \
        _auto_host_blocks(config, block_bytes)
    if config.deterministic:
        from agentos.kernel.runner.batch_invariant import make_batch_invariant

        make_batch_invariant(model)
    runner = ModelRunner(model, num_blocks, config.block_size, config.device, dtype, host_blocks,
                         config.deterministic, config.cuda_graphs, config.max_batch_size, max_model_len)
    return Machine(model, mc, tokenizer, runner, dtype, max_model_len, block_bytes, num_blocks,
                   host_blocks)


def _auto_kv_blocks(config: Config, block_bytes: int) -> int:
    if config.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(config.device))
        budget = int(free * 0.85)
    else:
        budget = min(2 << 30, psutil.virtual_memory().available // 4)
    return max(16, budget // block_bytes)


def _auto_host_blocks(config: Config, block_bytes: int) -> int:
    """Host swap tier from available RAM: a quarter of it, at most 16 GiB on CUDA (pinned
    memory is taken up front) and 4 GiB on CPU (where the device tier is RAM too, and both
    are touched lazily)."""
    cap = (16 << 30) if config.device.startswith("cuda") else (4 << 30)
    return min(cap, psutil.virtual_memory().available // 4) // block_bytes


def fingerprint(model, model_config: ModelConfig) -> str:
    """A digest of the model's configuration and weights (a strided sample of every
    tensor): KV bytes from another engine are used only when it matches."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(repr(sorted(dataclasses.asdict(model_config).items())).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]
