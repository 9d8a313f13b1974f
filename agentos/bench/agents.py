"""`agentos bench agents`: turn latency of agent workloads under MLFQ and under FCFS, with
the engine bound where production binds it: KV memory.

A workload is many agent sessions, each a few turns long, drawn from a seed. A session
arrives, sends its prompt and generates; then, like an agent waiting on a tool, it pauses,
appends the tool's output (length drawn per turn) and generates again. Arrivals are either
a Poisson process or bursty (groups of sessions arriving nearly together, quiet gaps
between, the same mean rate). Generation lengths are heavy-tailed: most turns are short
tool calls (log-normal), and `long_fraction` of turns write a long answer (a report, a
file). By default three workloads run (seed 0 Poisson, seed 1 bursty, seed 2 Poisson).

Each workload runs under two bounds:

- **memory** (the primary): seats are not the limit (`max_batch_size`, the engine's
  default), the device KV pool holds `memory_fraction` of the workload's working set (the
  blocks every session would hold at its end), and a host swap tier holds twice the
  working set. Sessions compete for pages: the scheduler decides who holds memory.
- **seats**: `seats` sessions per step, a pool that holds everything, no host tier.

Under each bound the same workload (same arrival times, prompts, tool outputs, lengths and
pauses) runs on two engines that differ only in the scheduler, one after the other in the
same process. Turn latency is wall time from the turn's request (append + generate) to
its last token; tokens/s is over the run (first arrival to last token). The paging and
scheduling counters are deltas of `engine.stats()` over the timed part. Greedy decoding
with `ignore_eos`, so both policies generate exactly the same tokens. The targets apply to
the median MLFQ/FCFS ratios over the workloads, memory-bound.

Each workload also runs once **alone**: its sessions one after another, no pauses, memory
to spare, so each turn's latency is its service time with nobody else on the engine. No
scheduler makes a turn faster than that (a bigger batch only slows a step), so the alone
mean bounds the mean-latency ratio any policy can reach against FCFS: the **ceiling**,
FCFS mean / alone mean. Long answers take most of the alone time, which is why that
ceiling, not the policy, caps the ratio on a lightly loaded engine. Per policy the mean
**slowdown** (a turn's latency over its alone latency, averaged over turns) is the
scheduling literature's measure of what short jobs pay.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from agentos.bench.common import (
    check,
    new_console,
    print_checks,
    print_table,
    progress,
    ratio,
    set_threads,
)

ARRIVALS = ("poisson", "bursty")
BOUNDS = ("memory", "seats")


@dataclass(slots=True)
class AgentsBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None
    sessions: int = 24  # agent sessions per workload
    turns: int = 3  # generate calls per session
    arrival_rate: float = 5.0  # sessions arriving per second, on average
    arrivals: str | None = None  # "poisson" or "bursty"; None: alternate, Poisson first
    burst_size: int = 6  # bursty: mean sessions per burst (uniform 1 .. 2 * burst_size - 1)
    burst_spread_ms: float = 50.0  # bursty: mean gap between arrivals inside a burst
    prompt_median: int = 128  # first turn's prompt length (log-normal median, tokens)
    tool_median: int = 32  # appended tool output per later turn (log-normal median, tokens)
    gen_median: int = 8  # tokens generated per tool-call turn (log-normal median)
    gen_sigma: float = 1.0  # log-normal sigma of those lengths
    long_fraction: float = 0.12  # share of turns that write a long answer (report, code)
    long_median: int = 256  # tokens of a long answer (log-normal median, sigma 0.5)
    gen_max: int = 1024  # cap of one turn's generation
    pause_ms: float = 500.0  # mean tool pause between turns (exponential)
    bound: str = "both"  # "memory", "seats" or "both"
    memory_fraction: float = 0.2  # memory-bound: the device pool / the working set
    max_batch_size: int = 256  # memory-bound: seats per step (the engine's default)
    seats: int = 2  # seat-bound: seats per step (its pool holds everything)
    max_batch_tokens: int = 2048
    block_size: int = 16
    schedulers: tuple[str, ...] = ("fcfs", "mlfq")
    seed: int | None = None  # one workload from this seed (instead of seeds)
    seeds: tuple[int, ...] = (0, 1, 2)  # one workload per seed; targets apply to the medians
    # NOTE: one thread by default: on a host busy with other work, an op split over a
    # descheduled thread waits for it (steps 5-20x slower on 2 busy cores), which would
    # change the load the workload puts on the engine; one thread gives the same load anywhere
    threads: int | None = 1
    workloads: list[tuple[int, str]] = field(init=False)  # (seed, arrivals) of each run

    def __post_init__(self):
        if self.sessions < 1 or self.turns < 1 or self.arrival_rate <= 0 or self.burst_size < 1:
            raise ValueError("sessions, turns, arrival_rate and burst_size must be positive")
        if self.arrivals not in (None, *ARRIVALS):
            raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}")
        if self.bound not in (*BOUNDS, "both"):
            raise ValueError("bound must be memory, seats or both")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("memory_fraction must be in (0, 1]")
        if self.max_batch_size < 1 or self.seats < 1:
            raise ValueError("max_batch_size and seats must be >= 1")
        if set(self.schedulers) - {"fcfs", "mlfq"}:
            raise ValueError("schedulers are fcfs and mlfq")
        seeds = (self.seed,) if self.seed is not None else tuple(self.seeds)
        if not seeds:
            raise ValueError("no workload: give seed or seeds")
        self.seeds = seeds
        # NOTE: alternating shapes, so a default run sees both without a flag per workload
        self.workloads = [(s, self.arrivals or ARRIVALS[i % 2]) for i, s in enumerate(seeds)]

    @property
    def bounds(self) -> tuple[str, ...]:
        return BOUNDS if self.bound == "both" else (self.bound,)


@dataclass(slots=True)
class Turn:
    tokens: list[int]  # the prompt (first turn) or the tool output appended before it
    max_tokens: int
    pause_s: float  # tool pause before this turn (0 for the first)


def arrival_times(b: AgentsBench, arrivals: str, rng: random.Random) -> list[float]:
    """b.sessions arrival seconds, ascending. Poisson: exponential gaps at b.arrival_rate.
    Bursty: bursts start as a Poisson process at arrival_rate / burst_size, each holds
    uniform 1 .. 2 * burst_size - 1 sessions spaced by exponential gaps of burst_spread_ms;
    the mean rate is arrival_rate either way."""
    if arrivals == "poisson":
        t, out = 0.0, []
        for _ in range(b.sessions):
            t += rng.expovariate(b.arrival_rate)
            out.append(t)
        return out
    out, start = [], 0.0
    while len(out) < b.sessions:
        start += rng.expovariate(b.arrival_rate / b.burst_size)
        t = start
        for _ in range(rng.randint(1, 2 * b.burst_size - 1)):
            out.append(t)
            t += rng.expovariate(1000.0 / b.burst_spread_ms)
    return sorted(out[: b.sessions])


def make_workload(b: AgentsBench, seed: int, arrivals: str) -> list[tuple[float, list[Turn]]]:
    """[(arrival second, turns)] per session, drawn from seed."""
    rng = random.Random(seed)

    def lognormal(median: int, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, round(median * math.exp(rng.gauss(0.0, sigma)))))

    work = []
    for at in arrival_times(b, arrivals, rng):
        turns = []
        for i in range(b.turns):
            n = lognormal(b.prompt_median, 0.5, 8, 4 * b.prompt_median) if i == 0 else \
                lognormal(b.tool_median, 1.0, 1, 16 * b.tool_median)
            long = rng.random() < b.long_fraction
            gen = lognormal(b.long_median, 0.5, 1, b.gen_max) if long else \
                lognormal(b.gen_median, b.gen_sigma, 1, b.gen_max)
            turns.append(Turn(tokens=[rng.randrange(1, 256) for _ in range(n)], max_tokens=gen,
                              pause_s=0.0 if i == 0 else rng.expovariate(1000.0 / b.pause_ms)))
        work.append((at, turns))
    return work


def session_blocks(b: AgentsBench, turns: list[Turn]) -> int:
    """Blocks the session holds at its end: all it was given and generated."""
    return -(-sum(len(t.tokens) + t.max_tokens for t in turns) // b.block_size)


def engine_options(b: AgentsBench, bound: str, work) -> dict:
    """The engine's sizing under `bound`. Memory: memory_fraction of the working set on the
    device (never less than the largest session plus one block, which must fit to run),
    twice the working set on the host, max_batch_size seats. Seats: `seats` seats, a pool
    that holds every session at once plus slack, no host tier."""
    blocks = [session_blocks(b, turns) for _, turns in work]
    working_set = sum(blocks)
    if bound == "memory":
        return {"max_batch_size": b.max_batch_size, "host_blocks": 2 * working_set,
                "kv_blocks": max(math.ceil(b.memory_fraction * working_set), max(blocks) + 1)}
    return {"max_batch_size": b.seats, "host_blocks": 0,
            "kv_blocks": working_set + len(blocks) + 64}


def run(bench: AgentsBench) -> dict:
    """Runs every workload under each bound with each scheduler, one engine per run; returns
    the JSON-ready result (see `_run`). Torch's thread count is restored afterwards: it is
    process-wide, and the caller's own work must not run with the bench's setting."""
    import torch

    before = torch.get_num_threads()
    try:
        return _run(bench)
    finally:
        torch.set_num_threads(before)


def _run(bench: AgentsBench) -> dict:
    """Runs every workload under each bound with each scheduler, one engine per run; returns
    the JSON-ready result: config, per workload its description and per bound the engine's
    sizing, the policies' numbers and the ratios; the medians per bound; the checks."""
    threads = set_threads(bench.threads)
    workloads = []
    turns = len(bench.workloads) * (len(bench.bounds) * len(bench.schedulers) + 1) \
        * bench.sessions * bench.turns
    with progress(turns, "agent turns") as advance:
        for seed, arrivals in bench.workloads:
            work = make_workload(bench, seed, arrivals)
            alone = asyncio.run(_run_alone(bench, work, advance))
            record = {"workload": {**_describe(bench, seed, arrivals, work),
                                   "alone_mean_s": statistics.fmean(alone)}, "bounds": {}}
            for bound in bench.bounds:
                options = engine_options(bench, bound, work)
                runs = {name: asyncio.run(_run_policy(bench, name, options, work, advance))
                        for name in bench.schedulers}
                record["bounds"][bound] = _summarize(options, runs, alone)
            workloads.append(record)
    config = {k: v for k, v in asdict(bench).items()
              if k not in ("model", "device", "dtype", "seed", "workloads")}
    result = {"bench": "agents", "config": {**config, "threads": threads},
              "workloads": workloads, "medians": {}, "checks": []}
    for bound in bench.bounds:
        per = [w["bounds"][bound]["ratios"] for w in workloads if "ratios" in w["bounds"][bound]]
        if per:
            result["medians"][bound] = {k: statistics.median(r[k] for r in per) for k in per[0]}
    # the targets apply to memory-bound medians; a seats-only run checks its own
    primary = "memory" if "memory" in result["medians"] else next(iter(result["medians"]), None)
    if primary is not None:
        result["primary"] = primary
        result["checks"] = _checks(result["medians"][primary],
                                   f"{_NAMES[primary]}, median of {len(workloads)} workloads")
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


_DELTAS = ("steps", "tokens_prefilled", "swap_out_blocks", "swap_in_blocks",
           "dropped_blocks", "preemptions", "swapped_s", "sched_s")


async def _run_policy(b: AgentsBench, scheduler: str, options: dict, work,
                      advance=lambda: None) -> dict:
    from agentos import AsyncEngine

    async with AsyncEngine(model=b.model, device=b.device, dtype=b.dtype, block_size=b.block_size,
                           scheduler=scheduler, max_batch_tokens=b.max_batch_tokens,
                           **options) as engine:
        # warm-up: one short session touches every path before the clock starts
        s = await engine.create_session(tokens=list(range(1, 40)))
        await s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)
        await s.close()
        before = await engine.stats()
        start = time.perf_counter()
        per_session = await asyncio.gather(*(_agent(engine, start, at, turns, advance)
                                             for at, turns in work))
        wall = time.perf_counter() - start - work[0][0]
        after = await engine.stats()
    latencies = [lat for session in per_session for lat, _ in session]
    lengths = [n for session in per_session for _, n in session]
    return {"latencies": latencies, "lengths": lengths, "tokens": sum(lengths), "wall_s": wall,
            **{k: after.get(k, 0) - before.get(k, 0) for k in _DELTAS}}


async def _run_alone(b: AgentsBench, work, advance=lambda: None) -> list[float]:
    """Each turn's latency with the engine to itself: sessions one after another, turns
    back to back, a pool that holds the largest session. In the order the timed runs
    report theirs (session by session, turn by turn)."""
    from agentos import AsyncEngine

    kv_blocks = max(session_blocks(b, turns) for _, turns in work) + 8
    latencies = []
    async with AsyncEngine(model=b.model, device=b.device, dtype=b.dtype, block_size=b.block_size,
                           scheduler="fcfs", max_batch_tokens=b.max_batch_tokens,
                           kv_blocks=kv_blocks, host_blocks=0) as engine:
        s = await engine.create_session(tokens=list(range(1, 40)))
        await s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)
        await s.close()
        for _, turns in work:
            latencies += [lat for lat, _ in await _agent(engine, 0.0, 0.0, turns, advance,
                                                          pauses=False)]
    return latencies


async def _agent(engine, start: float, arrival: float, turns: list[Turn],
                 advance=lambda: None, pauses: bool = True) -> list[tuple[float, int]]:
    """One session's life; returns (latency seconds, tokens generated) per turn. Calls
    advance() after each turn (a progress bar)."""
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    out = []
    session = None
    for turn in turns:
        if pauses:
            await asyncio.sleep(turn.pause_s)
        t0 = time.perf_counter()
        if session is None:
            session = await engine.create_session(tokens=turn.tokens)
        else:
            await session.append(tokens=turn.tokens)
        gen = await session.generate(max_tokens=turn.max_tokens, temperature=0.0, ignore_eos=True)
        out.append((time.perf_counter() - t0, len(gen.tokens)))
        advance()
    await session.close()
    return out


_CLASSES = (("<= 32 tokens", 0, 32), ("33-256", 33, 256), ("> 256", 257, 1 << 30))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _describe(b: AgentsBench, seed: int, arrivals: str, work) -> dict:
    gen = [t.max_tokens for _, turns in work for t in turns]
    tools = [len(t.tokens) for _, turns in work for t in turns[1:]]
    given = sum(len(t.tokens) for _, turns in work for t in turns)
    blocks = [session_blocks(b, turns) for _, turns in work]
    return {
        "seed": seed, "arrivals": arrivals, "sessions": len(work), "turns_total": len(gen),
        "tokens_to_generate": sum(gen), "tokens_given": given,
        "gen_len_p50": statistics.median(gen), "gen_len_p99": _pct(gen, 0.99),
        "gen_len_max": max(gen), "tool_len_p50": statistics.median(tools) if tools else 0,
        "arrival_span_s": work[-1][0] - work[0][0], "working_set_blocks": sum(blocks),
        "largest_session_blocks": max(blocks),
    }


def _summarize(options: dict, runs: dict, alone: list[float]) -> dict:
    policies = {}
    for name, r in runs.items():
        lat, gen = r["latencies"], max(1, r["tokens"])
        slowdown = statistics.fmean(x / max(a, 1e-6) for x, a in zip(lat, alone))
        by_len = {}  # mean latency by the turn's generation length
        for label, lo, hi in _CLASSES:
            sel = [x for x, n in zip(lat, r["lengths"]) if lo <= n <= hi]
            by_len[label] = {"turns": len(sel), "mean_s": statistics.fmean(sel) if sel else None}
        policies[name] = {
            "mean_s": statistics.fmean(lat), "p50_s": statistics.median(lat),
            "p99_s": _pct(lat, 0.99), "max_s": max(lat), "slowdown": slowdown,
            "tokens": r["tokens"],
            "wall_s": r["wall_s"], "tokens_per_s": r["tokens"] / r["wall_s"],
            "prefill_per_token": r["tokens_prefilled"] / gen,
            "swap_out_per_token": r["swap_out_blocks"] / gen,
            "swap_in_per_token": r["swap_in_blocks"] / gen,
            "sched_us_per_step": 1e6 * r["sched_s"] / r["steps"] if r["steps"] else None,
            **{k: r[k] for k in _DELTAS},
            "by_length": by_len,
        }
    out = {"engine": options, "policies": policies}
    if {"fcfs", "mlfq"} <= runs.keys():
        f, m = policies["fcfs"], policies["mlfq"]
        out["ratios"] = {"mean_latency_fcfs_over_mlfq": ratio(f["mean_s"], m["mean_s"]),
                         "p50_latency_fcfs_over_mlfq": ratio(f["p50_s"], m["p50_s"]),
                         "p99_latency_fcfs_over_mlfq": ratio(f["p99_s"], m["p99_s"]),
                         "max_latency_mlfq_over_fcfs": ratio(m["max_s"], f["max_s"]),
                         "tokens_per_s_mlfq_over_fcfs": ratio(m["tokens_per_s"], f["tokens_per_s"]),
                         "slowdown_fcfs_over_mlfq": ratio(f["slowdown"], m["slowdown"]),
                         # no policy's mean is below the alone mean: the most the first
                         # ratio could be on this workload at this load
                         "mean_latency_ceiling": ratio(f["mean_s"], statistics.fmean(alone))}
    return out


def _checks(r: dict, what: str) -> list[dict]:
    return [
        check("MLFQ mean turn latency >= 3x lower than FCFS", r["mean_latency_fcfs_over_mlfq"] >= 3,
              f"{r['mean_latency_fcfs_over_mlfq']:.2f}x ({what})"),
        check("MLFQ tokens/s >= 0.95x FCFS", r["tokens_per_s_mlfq_over_fcfs"] >= 0.95,
              f"{r['tokens_per_s_mlfq_over_fcfs']:.2f}x ({what})"),
        check("no starvation: MLFQ max turn latency <= 1.5x FCFS",
              r["max_latency_mlfq_over_fcfs"] <= 1.5,
              f"{r['max_latency_mlfq_over_fcfs']:.2f}x ({what})"),
    ]


# -- report ---------------------------------------------------------------------------------

_NAMES = {"memory": "memory-bound", "seats": "seat-bound"}


def render(result: dict, console=None) -> None:
    console = console or new_console()
    c = result["config"]
    console.print(
        f"agent workloads: {c['sessions']} sessions x {c['turns']} turns, arrivals "
        f"{c['arrival_rate']}/s on average (bursty: bursts of 1-{2 * c['burst_size'] - 1} "
        f"sessions {c['burst_spread_ms']:.0f} ms apart); prompt median {c['prompt_median']} "
        f"tokens, tool output median {c['tool_median']}, tool pause mean {c['pause_ms']:.0f} ms; "
        f"generation: tool calls log-normal median {c['gen_median']} sigma {c['gen_sigma']}, "
        f"{c['long_fraction']:.0%} long answers of median {c['long_median']} (cap "
        f"{c['gen_max']}); {c['max_batch_tokens']} tokens per step, "
        f"{c['threads']} thread{'' if c['threads'] == 1 else 's'}")
    for i, one in enumerate(result["workloads"], 1):
        w = one["workload"]
        console.print(
            f"  workload {i} ({_label(w)}): arrivals over {w['arrival_span_s']:.1f} s, "
            f"{w['tokens_to_generate']:,} tokens to generate in {w['turns_total']} turns (p50 "
            f"{w['gen_len_p50']:.0f}, p99 {w['gen_len_p99']}, max {w['gen_len_max']}), "
            f"{w['tokens_given']:,} given; working set {w['working_set_blocks']:,} blocks; "
            f"mean turn latency alone {w['alone_mean_s']:.2f} s")
    for bound in BOUNDS:
        runs = [(one["workload"], one["bounds"][bound]) for one in result["workloads"]
                if bound in one["bounds"]]
        if runs:
            _render_bound(bound, runs, result["medians"].get(bound), console)
    print_checks(result["checks"], console)


def _label(w: dict) -> str:
    return f"seed {w['seed']}, {w['arrivals']}"


def _render_bound(bound: str, runs: list[tuple[dict, dict]], medians: dict | None,
                  console) -> None:
    console.print()
    if bound == "memory":
        pools = ", ".join(f"{r['engine']['kv_blocks']:,} of {w['working_set_blocks']:,}"
                          for w, r in runs)
        console.print(f"[bold]{_NAMES[bound]}[/bold]: {runs[0][1]['engine']['max_batch_size']} "
                      f"seats; device pool (blocks) of the working set: {pools}; host tier 2x "
                      f"the working set")
    else:
        console.print(f"[bold]{_NAMES[bound]}[/bold]: {runs[0][1]['engine']['max_batch_size']} "
                      f"seats per step; the device pool holds every session; no host tier")
    rows, mem_rows = [], []
    for w, r in runs:
        for name, p in r["policies"].items():
            rows.append([_label(w), name, p["mean_s"], p["p50_s"], p["p99_s"], p["max_s"],
                         p["slowdown"], p["tokens_per_s"],
                         *(p["by_length"][c]["mean_s"] for c, _, _ in _CLASSES)])
            mem_rows.append([_label(w), name, p["prefill_per_token"], p["swap_out_per_token"],
                             p["swap_in_per_token"], p["dropped_blocks"], p["preemptions"],
                             p["swapped_s"], p["steps"], p["sched_us_per_step"]])
    print_table(f"{_NAMES[bound]}: turn latency (s) and throughput", [
        "workload", "policy", "mean", "p50", "p99", "max", "slowdown", "tok/s",
        *(f"mean, {c}" for c, _, _ in _CLASSES)], rows, console)
    print_table(f"{_NAMES[bound]}: paging and scheduling (per generated token, over the run)", [
        "workload", "policy", "prefill/tok", "swap-out/tok", "swap-in/tok", "dropped",
        "preemptions", "swapped s", "steps", "sched us/step"], mem_rows, console)
    for w, r in runs:
        if "ratios" in r:
            console.print(f"{_label(w)}: {_ratio_line(r['ratios'])}")
    if medians is not None and len(runs) > 1:
        console.print(f"median of {len(runs)}: {_ratio_line(medians)}")


def _ratio_line(r: dict) -> str:
    return (f"FCFS/MLFQ latency: mean {r['mean_latency_fcfs_over_mlfq']:.2f}x, p50 "
            f"{r['p50_latency_fcfs_over_mlfq']:.2f}x, p99 {r['p99_latency_fcfs_over_mlfq']:.2f}x; "
            f"MLFQ/FCFS max {r['max_latency_mlfq_over_fcfs']:.2f}x, tok/s "
            f"{r['tokens_per_s_mlfq_over_fcfs']:.2f}x; mean slowdown "
            f"{r['slowdown_fcfs_over_mlfq']:.2f}x; ceiling of the mean ratio (FCFS / alone) "
            f"{r['mean_latency_ceiling']:.2f}x")
