"""`agentos bench agents --simulate`: the real scheduler and pager at scale, on modelled time.

The kernel's own policy and pager code (sched.py, memory.py, the step in core.py) drive a
simulated engine: a Kernel over a stand-in machine (no model, no KV bytes) with a cost
model whose step times are modelled; time itself is virtual, so 10,000 sessions run in
seconds of real time. What is real is the Python that decides each step (batch formation,
admission, eviction, accounting): its cost per step is measured with the wall clock and
must not grow with the number of sessions.

The modelled engine is a GPU server bound by KV memory (defaults: an 8B-class model in
bf16 on an H100-class device, 16-token blocks of 2 MiB): a step costs `base_ms` plus
`decode_ms` per decoding session plus `prefill_ms` per prefilled token, plus the blocks
it swaps at `swap_gb_s`. The workloads are `agentos bench agents`'s generator (tool pauses,
heavy-tailed answers), with every session arriving within `window_s` seconds: the more
sessions, the higher the load on the same pool. Each run also reports the mean of its
turns' alone latencies (each turn's modelled time with the engine to itself): FCFS's mean
over that is the most any policy's mean-latency ratio could be.
"""

from __future__ import annotations

import heapq
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from agentos.bench.agents import AgentsBench, _pct, make_workload
from agentos.bench.common import check, new_console, print_checks, print_table, ratio

MIB = 1 << 20


@dataclass(slots=True)
class SimBench:
    sessions: tuple[int, ...] = (100, 1000, 10000)  # one run per count, each policy
    window_s: float = 2.0  # every session arrives within this many seconds (Poisson)
    kv_blocks: int = 256  # the device pool (blocks), the same for every count
    host_blocks: int = 16384  # the host tier (blocks)
    block_bytes: int = 2 * MIB
    base_ms: float = 10.0  # a step's fixed cost (reading the weights)
    decode_ms: float = 0.05  # per decoding session (reading its KV)
    prefill_ms: float = 0.07  # per prefilled token
    swap_gb_s: float = 25.0  # host <-> device copy bandwidth
    max_batch_size: int = 256
    max_batch_tokens: int = 2048
    schedulers: tuple[str, ...] = ("fcfs", "mlfq")
    seed: int = 0

    def __post_init__(self):
        if not self.sessions or min(self.sessions) < 1 or self.window_s <= 0:
            raise ValueError("sessions must be positive counts and window_s > 0")
        if self.kv_blocks < 1 or self.host_blocks < 0:
            raise ValueError("kv_blocks must be >= 1 and host_blocks >= 0")
        self.sessions = tuple(self.sessions)


class _Clock:
    """Virtual time for the kernel's modules: time() and monotonic() read it; perf_counter
    stays real (it measures the scheduler's own cost)."""

    def __init__(self):
        self.now = 0.0
        self.perf_counter = time.perf_counter

    def time(self) -> float:
        return self.now

    monotonic = time


@contextmanager
def _virtual_time(clock: _Clock):
    from agentos.kernel import core, costs, memory

    saved = core.time, memory.time, costs.time
    core.time = memory.time = costs.time = clock
    try:
        yield
    finally:
        core.time, memory.time, costs.time = saved


class _Runner:
    """Stands in for the model runner: samples token 65 for every sampling chunk and
    counts the blocks each step swaps."""

    def __init__(self):
        self.swapped = 0

    def execute(self, chunks, page_slots) -> list:
        return [(65, 0.0) if c.sample else None for c in chunks]

    def run_copies(self, ops) -> None:
        self.swapped += sum(len(pairs) for kind, pairs in ops if kind != "cow")


def _sim_costs(b: SimBench, runner: _Runner):
    """The modelled engine's cost model: its swap bandwidth, and each step's modelled time
    (what the pager learns from, in place of the wall clock's; kept in `last_step_s` for
    the virtual clock)."""
    from agentos.kernel.costs import CostModel

    class SimCosts(CostModel):
        def __init__(self):
            super().__init__(b.block_bytes, b.swap_gb_s * 1e9)
            self.last_step_s = 0.0  # the modelled time of the last step

        def observe_step(self, seconds: float, chunks) -> None:
            decodes = sum(1 for c in chunks if c.num_tokens == 1)
            prefill = sum(c.num_tokens for c in chunks) - decodes
            self.last_step_s = (b.base_ms + b.decode_ms * decodes + b.prefill_ms * prefill) / 1e3 \
                + runner.swapped * b.block_bytes / (b.swap_gb_s * 1e9)
            runner.swapped = 0
            super().observe_step(self.last_step_s, chunks)

    return SimCosts()


def _sim_kernel(b: SimBench, scheduler: str):
    """A Kernel with the real policy, pager, allocator and step, over the stand-in runner.
    No thread: the caller applies syscalls and steps. Returns (kernel, its cost model)."""
    from agentos.kernel.config import Config
    from agentos.kernel.core import Kernel
    from agentos.kernel.machine import Machine
    from agentos.kernel.runner.model import ModelConfig
    from agentos.kernel.runner.tokenizer import ByteTokenizer

    config = Config(kv_blocks=b.kv_blocks, host_blocks=b.host_blocks, scheduler=scheduler,
                    max_batch_size=b.max_batch_size, max_batch_tokens=b.max_batch_tokens)
    tokenizer = ByteTokenizer()
    model_config = ModelConfig(  # an 8B-class shape; only its vocabulary is used
        vocab_size=tokenizer.vocab_size, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=1 << 20)
    runner = _Runner()
    machine = Machine(model=None, model_config=model_config, tokenizer=tokenizer, runner=runner,
                      dtype=None, max_model_len=1 << 20, block_bytes=b.block_bytes,
                      num_blocks=b.kv_blocks, host_blocks=b.host_blocks)
    costs = _sim_costs(b, runner)
    return Kernel(config, machine=machine, costs=costs), costs


def alone_latency(b: SimBench, turn, after_turn: bool) -> float:
    """A turn's modelled latency with the engine to itself: its prefill (the appended
    tokens, plus the previous turn's last token) in chunks of max_batch_tokens, the first
    token sampled at its end, then one decode step per further token. No policy's mean
    turn latency is below the mean of these."""
    prefill = len(turn.tokens) + after_turn
    chunks = -(-prefill // b.max_batch_tokens)
    return (chunks * b.base_ms + prefill * b.prefill_ms
            + (turn.max_tokens - 1) * (b.base_ms + b.decode_ms)) / 1e3


def simulate(b: SimBench, sessions: int, scheduler: str) -> dict:
    """Runs one workload of `sessions` sessions on a fresh simulated kernel; returns turn
    latencies (virtual seconds), throughput and the scheduler's real cost per step."""
    from agentos.kernel.sampling_params import SamplingParams

    ab = AgentsBench(sessions=sessions, arrival_rate=sessions / b.window_s, seed=b.seed)
    work = make_workload(ab, b.seed, "poisson")
    clock = _Clock()
    latencies: list[float] = []
    with _virtual_time(clock):
        k, costs = _sim_kernel(b, scheduler)
        events = [(at, i, 0) for i, (at, _) in enumerate(work)]  # (time, session, turn)
        heapq.heapify(events)
        pids: dict[int, str] = {}
        started: dict[int, float] = {}
        done: list[tuple[int, int]] = []
        step_wall = 0.0
        steps = 0
        generated = 0
        while True:
            while events and events[0][0] <= clock.now:
                _, i, j = heapq.heappop(events)
                turn = work[i][1][j]
                if j == 0:
                    pids[i] = k.sys_create(turn.tokens, 0, "default")
                else:
                    k.sys_append(pids[i], turn.tokens)
                fut = k.sys_generate(pids[i], SamplingParams(
                    max_tokens=turn.max_tokens, temperature=0.0, ignore_eos=True))
                started[i] = clock.now
                fut.add_done_callback(lambda f, i=i, j=j: done.append((i, j)))
            if not k.policy.has_work():
                if not events:
                    break
                clock.now = events[0][0]
                continue
            before = k.stats["steps"]
            t0 = time.perf_counter()
            k.step()
            step_wall += time.perf_counter() - t0
            if k.stats["steps"] == before:  # nothing could run: wait for the next arrival
                if not events:
                    break
                clock.now = max(clock.now, events[0][0])
                continue
            steps += 1
            clock.now += costs.last_step_s
            for i, j in done:
                latencies.append(clock.now - started[i])
                generated += work[i][1][j].max_tokens
                if j + 1 < len(work[i][1]):
                    heapq.heappush(events, (clock.now + work[i][1][j + 1].pause_s, i, j + 1))
                else:
                    k.sys_close(pids[i])
            done.clear()
        k.vm.check(k.page_tables())  # every page accounted for
    turns = sum(len(t) for _, t in work)
    return {"sessions": sessions, "scheduler": scheduler, "turns": turns,
            "completed": len(latencies), "mean_s": statistics.fmean(latencies),
            "p50_s": statistics.median(latencies), "p99_s": _pct(latencies, 0.99),
            "max_s": max(latencies), "tokens_per_s": generated / clock.now, "sim_s": clock.now,
            "alone_mean_s": statistics.fmean(alone_latency(b, turn, j > 0)
                                             for _, turns in work for j, turn in enumerate(turns)),
            "steps": steps, "step_us": 1e6 * step_wall / steps,
            "sched_us": 1e6 * k.stats["sched_s"] / steps,
            "preemptions": k.memory.stats["preemptions"],
            "swap_out_blocks": k.memory.stats["swap_out_blocks"],
            "dropped_blocks": k.memory.stats["dropped_blocks"]}


def run(bench: SimBench) -> dict:
    runs = [simulate(bench, n, s) for n in bench.sessions for s in bench.schedulers]
    by = {(r["sessions"], r["scheduler"]): r for r in runs}
    lo, hi = min(bench.sessions), max(bench.sessions)
    rows = []
    for n in bench.sessions:
        if {"fcfs", "mlfq"} <= set(bench.schedulers):
            rows.append({"sessions": n, "mean_latency_fcfs_over_mlfq":
                         ratio(by[n, "fcfs"]["mean_s"], by[n, "mlfq"]["mean_s"]),
                         "mean_latency_ceiling":
                         ratio(by[n, "fcfs"]["mean_s"], by[n, "fcfs"]["alone_mean_s"]),
                         "tokens_per_s_mlfq_over_fcfs":
                         ratio(by[n, "mlfq"]["tokens_per_s"], by[n, "fcfs"]["tokens_per_s"])})
    checks = []
    for s in bench.schedulers:
        growth = ratio(by[hi, s]["step_us"], by[lo, s]["step_us"])
        checks.append(check(f"{s}: per-step scheduling cost at {hi} sessions within 2x of "
                            f"{lo}", growth <= 2, f"{by[hi, s]['step_us']:.0f} vs "
                            f"{by[lo, s]['step_us']:.0f} us ({growth:.2f}x)"))
        checks.append(check(f"{s}: every turn completed", all(
            by[n, s]["completed"] == by[n, s]["turns"] for n in bench.sessions),
            ", ".join(f"{by[n, s]['completed']}/{by[n, s]['turns']}" for n in bench.sessions)))
    return {"bench": "agents-simulate", "config": asdict(bench), "runs": runs, "ratios": rows,
            "checks": checks, "passed": all(c["passed"] for c in checks)}


def render(result: dict, console=None) -> None:
    console = console or new_console()
    c = result["config"]
    console.print(
        f"simulated engine: {c['kv_blocks']} device blocks of {c['block_bytes'] / MIB:g} MiB, "
        f"{c['host_blocks']} host blocks; a step costs {c['base_ms']} ms + {c['decode_ms']} ms "
        f"per decode + {c['prefill_ms']} ms per prefill token, swaps at {c['swap_gb_s']} GB/s; "
        f"sessions arrive within {c['window_s']} s (seed {c['seed']}); latencies in virtual "
        f"seconds, step cost in real microseconds of the scheduler's Python")
    print_table("the real policy and pager on modelled time", [
        "sessions", "policy", "mean", "alone", "p50", "p99", "max", "tok/s", "steps",
        "preemptions",
        "us/step (step)", "us/step (form_batch)"],
        [[r["sessions"], r["scheduler"], r["mean_s"], r["alone_mean_s"], r["p50_s"], r["p99_s"], r["max_s"],
          r["tokens_per_s"], r["steps"], r["preemptions"], r["step_us"], r["sched_us"]]
         for r in result["runs"]], console)
    for r in result["ratios"]:
        console.print(f"{r['sessions']} sessions: FCFS/MLFQ mean latency "
                      f"{r['mean_latency_fcfs_over_mlfq']:.2f}x (ceiling, FCFS / alone: "
                      f"{r['mean_latency_ceiling']:.2f}x), MLFQ/FCFS tok/s "
                      f"{r['tokens_per_s_mlfq_over_fcfs']:.2f}x")
    print_checks(result["checks"], console)


def quick(sessions: tuple[int, ...] = (20, 200)) -> SimBench:
    """A small configuration for tests."""
    return replace(SimBench(), sessions=sessions, kv_blocks=256, host_blocks=2048, window_s=5.0)
