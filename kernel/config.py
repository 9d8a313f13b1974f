"""Engine configuration: one dataclass, the same names as `agentos serve` flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Config:
    model: str = "tiny"  # "tiny" (embedded, built from a fixed seed) or a HF model folder
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str | None = None  # "float32", "bfloat16", "float16"; None: fp32 on CPU, bf16 on CUDA
    block_size: int = 16  # tokens per KV block (page)
    kv_blocks: int | None = None  # device KV blocks; None: sized from free memory
    host_blocks: int | None = None  # host swap tier; None: sized from available RAM, 0: no swap
    max_batch_tokens: int = 2048  # token budget of one step (decodes + prefill chunks)
    max_batch_size: int = 256  # sessions in one step at most
    max_model_len: int | None = None  # context limit; None: the model's max positions
    scheduler: str = "mlfq"  # "mlfq" (multi-level feedback queue) or "fcfs"
    deterministic: bool = False  # batch-invariant results (kernel/runner/batch_invariant.py)
    prefix_cache: bool = True  # share full KV blocks between sessions with the same prefix
    cuda_graphs: bool = True  # decode steps replay captured CUDA graphs (CUDA only, not deterministic)
    store: Any = None  # None (no journal), "memory", a redis:// URL, or a snapshot.store.Store
    deployment: str = "default"  # namespace of the store's keys
    worker_id: str = "main"  # whose sessions in the store this engine recovers and journals
    seed: int = 0  # seeds session RNGs that are not given a seed

    def __post_init__(self):
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError("kv_blocks must be >= 1")
        if self.host_blocks is not None and self.host_blocks < 0:
            raise ValueError("host_blocks must be >= 0")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        if self.scheduler not in ("mlfq", "fcfs"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}")
        if isinstance(self.store, str) and self.store != "memory" and not self.store.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError(f"store must be None, 'memory' or a redis:// URL, got {self.store!r}")
        if not self.deployment or not self.worker_id:
            raise ValueError("deployment and worker_id must be non-empty")
