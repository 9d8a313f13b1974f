"""Engine configuration: one dataclass, the same names as `agentos serve` flags.

Each field carries its help text (and choices, where it has them) in its metadata:
`agentos.cli` builds the flag `--field-name` of every field from it, so a new field is
a new flag without touching the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("mlfq", "fcfs")


def option(default: Any, text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field with its default, its help text and the values it accepts."""
    return field(default=default, metadata={"help": text, "choices": choices})


@dataclass(slots=True)
class Config:
    model: str = option("tiny", "'tiny' (embedded, built from a fixed seed), a HF model folder, "
                        "or a Hugging Face Hub id (org/name, from the local cache when offline)")
    revision: str | None = option(None, "with a Hub id: the branch, tag or commit")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str | None = option(None, "float32, bfloat16 or float16; unset: float32 on cpu, "
                                "bfloat16 on cuda", DTYPES)
    block_size: int = option(16, "tokens per KV block (page), a power of two")
    kv_blocks: int | None = option(None, "device KV blocks; unset: sized from free memory")
    host_blocks: int | None = option(None, "host swap blocks; unset: sized from available RAM; "
                                     "0: no swap, pages that do not fit are dropped and recomputed")
    max_batch_tokens: int = option(2048, "token budget of one step (decodes + prefill chunks)")
    max_batch_size: int = option(256, "sessions in one step at most")
    max_model_len: int | None = option(None, "context limit; unset: the model's max positions")
    scheduler: str = option("mlfq", "mlfq (multi-level feedback queue over sessions) or fcfs "
                            "(first come first served)", SCHEDULERS)
    deterministic: bool = option(False, "batch-invariant results: a session's tokens and "
                                 "logprobs do not depend on what else runs (slower; "
                                 "kernel/runner/batch_invariant.py)")
    prefix_cache: bool = option(True, "share KV between sessions with the same prefix, to the token")
    cuda_graphs: bool = option(True, "decode steps replay captured CUDA graphs (CUDA only, not "
                               "deterministic)")
    store: Any = option(None, "journal every change to 'memory' or a redis:// URL and recover "
                        "on restart; unset: no journal (in Python also a Store of "
                        "agentos.snapshot.durable.store)")
    deployment: str = option("default", "namespace of the store's keys")
    worker_id: str = option("main", "whose sessions in the store this engine recovers and "
                            "journals")
    seed: int = option(0, "seeds session RNGs that are not given a seed")

    def __post_init__(self):
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError("kv_blocks must be >= 1")
        if self.host_blocks is not None and self.host_blocks < 0:
            raise ValueError("host_blocks must be >= 0")
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}")
        if isinstance(self.store, str) and self.store != "memory" and not self.store.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError(f"store must be None, 'memory' or a redis:// URL, got {self.store!r}")
        if not self.deployment or not self.worker_id:
            raise ValueError("deployment and worker_id must be non-empty")
