"""The pager's cost model: what a step, a prefill token and a swap cost, and how long
sessions pause between calls. Measured per engine as it runs (moving averages), so the
pager's choice between swapping and recomputing follows the machine it is on. A
simulation supplies its own (agentos/bench/simulate.py): a fixed bandwidth and modelled
step times.
"""

from __future__ import annotations

import math
import time

import torch

from agentos.kernel.process import Process

DEFAULT_PAUSE_S = 1.0  # expected idle time of a session before any pause was seen


class CostModel:
    def __init__(self, block_bytes: int, swap_bw: float):
        self.block_bytes = block_bytes
        self.swap_bw = swap_bw  # bytes per second, host <-> device
        self.step_s = 0.01  # moving averages: a step's time, a prefill token's
        self.prefill_tok_s = 1e-4
        self.pause_s = DEFAULT_PAUSE_S  # sessions' idle time between calls

    def swap_s(self, num_blocks: int) -> float:
        """Seconds to copy num_blocks one way between host and device."""
        return num_blocks * self.block_bytes / self.swap_bw

    def prefill_s(self, num_tokens: int) -> float:
        """Seconds to recompute the KV of num_tokens tokens."""
        return num_tokens * self.prefill_tok_s

    def observe_step(self, seconds: float, chunks) -> None:
        """Updates the step-time and prefill-speed averages from a finished step."""
        self.step_s = 0.9 * self.step_s + 0.1 * seconds
        prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if prefill >= 64:
            per = seconds / sum(c.num_tokens for c in chunks)
            self.prefill_tok_s = 0.8 * self.prefill_tok_s + 0.2 * per

    def observe_wake(self, p: Process) -> None:
        """A session idle since its last call got new work: learns how long it paused."""
        pause = max(0.0, time.time() - p.last_active)
        p.pause_s = pause if p.pause_s is None else 0.5 * p.pause_s + 0.5 * pause
        self.pause_s = 0.9 * self.pause_s + 0.1 * pause

    def expected_back(self, p: Process, now: float) -> float:
        """Seconds until idle p is expected to return: its average pause so far less the
        time it has been idle; overdue sessions count as gone (expected never)."""
        pause = p.pause_s if p.pause_s is not None else self.pause_s
        left = p.last_active + pause - now
        return left if left >= 0 else math.inf


def measure_swap(runner, num_blocks: int, block_bytes: int) -> float:
    """Times a swap out and back of num_blocks blocks between the runner's first slots of
    each tier (call it before any page is handed out); returns bytes per second. With no
    blocks to move (no host tier), a nominal value."""
    if num_blocks == 0:
        return 1e10
    pairs = [(i, i) for i in range(num_blocks)]
    dev = runner.kv.device
    best = math.inf
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        runner.swap_out(pairs)
        runner.swap_in(pairs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_blocks * block_bytes / max(best, 1e-9)
