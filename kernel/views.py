"""The kernel's read-only syscalls and views: a session's tokens and info, the session
lists, the engine's stats, and the KV bytes of pages (exports and snapshots read them). A
part of the Kernel (a base class of it, holding no state of its own).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from agentos.kernel.kalloc import DEVICE
from agentos.kernel.process import Process
from agentos.kernel.vm import PageTable


class Views:
    def read_kv(self, pages: np.ndarray) -> torch.Tensor:
        """A copy of the KV bytes of mapped pages (on either tier), on the CPU:
        [len(pages), *kv_block_shape]. Not while asleep."""
        kv, k = self.runner.kv, self.kalloc
        slots = torch.from_numpy(k.slot[pages])
        on_dev = torch.from_numpy(k.tier[pages] == DEVICE)
        blocks = torch.empty((len(pages), *kv.shape[1:]), dtype=kv.dtype)
        if on_dev.any():
            blocks[on_dev] = kv[slots[on_dev].to(kv.device)].cpu()
        if (~on_dev).any():
            blocks[~on_dev] = self.runner.host_kv[slots[~on_dev]]
        return blocks

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.runner.kv.dtype

    @property
    def kv_block_shape(self) -> list[int]:
        """The shape of one page's KV bytes (all layers)."""
        return list(self.runner.kv.shape[1:])

    def page_tables(self) -> list[PageTable]:
        """The page tables of every live session and score call (snapshots hold others)."""
        return [p.table for p in self.procs.values()] + [p.table for p in self._scratch.values()]

    def sys_tokens(self, pid: str) -> tuple[list[int], list[int]]:
        p = self.proc(pid)
        return p.token_ids.tolist(), p.mask.tolist()

    def sys_info(self, pid: str) -> dict[str, Any]:
        return self.info(self.proc(pid))

    def info(self, p: Process) -> dict[str, Any]:
        host = self.kalloc.num_host(p.table.block_ids)
        return p.info(host, self.weight_version, time.monotonic())

    def sys_list(self, pids: list[str] | None = None,
                 owner: str | None = None) -> list[dict[str, Any]]:
        """Info of every live session, or of those of `pids` that are live; only those of
        the tenant `owner` when it is given."""
        procs = self.procs.values() if pids is None else [
            self.procs[pid] for pid in pids if pid in self.procs]
        return [self.info(p) for p in procs if owner is None or p.owner == owner]

    def sys_num_tokens(self, pids: list[str]) -> int:
        """Tokens held by those of `pids` that are live."""
        return sum(len(self.procs[pid].token_ids) for pid in pids if pid in self.procs)

    def sys_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        by_state = dict(Counter(p.state.value for p in self.procs.values()))
        by_level = dict(Counter(str(p.level) for p in self.policy.order()))
        all_levels = dict(Counter(str(p.level) for p in self.procs.values()))
        return {
            "kv": self.memory.kv_stats(),
            "sessions": {"total": len(self.procs), "by_state": by_state, "by_level": all_levels},
            "scheduler": self.policy.name,
            "queue": {"runnable": sum(by_level.values()), "by_level": by_level},
            "weight_version": self.weight_version, "paused": self._paused, "asleep": self._asleep,
            **self.stats, **self.memory.stats,
            "prefix_hit_tokens_by_owner": dict(self.memory.hits_by_owner),
            # over every session, closed ones included: seconds spent off the device
            "swapped_s": self.stats["swapped_s"] + sum(
                p.time_swapped(now) for p in self.procs.values()),
        }

