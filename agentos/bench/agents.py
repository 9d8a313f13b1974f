"""`agentos bench agents`: turn latency of an agent workload under MLFQ and under FCFS.

A seeded workload of many agent sessions, each a few turns long. A session arrives (Poisson
arrivals), sends its prompt and generates; then, like an agent waiting on a tool, it
pauses, appends the tool's output (length drawn per turn) and generates again. Generation
lengths are heavy-tailed: most turns are short tool calls (log-normal), and a few write a
long answer (a report, a file: `long_fraction` of turns, hundreds to thousands of tokens).
The arrival rate is set so the engine's seats (`max_batch_size`) are oversubscribed:
runnable sessions queue, which is when the scheduling policy matters.

The same workload (same arrival times, prompts, tool outputs, lengths and pauses) runs on
two engines that differ only in the scheduler, one after the other in the same process.
Turn latency is wall time from the turn's request (append + generate) to its last
token. Reported per policy: mean, p50, p99 and max turn latency, generated tokens per
second over the run (first arrival to last token), and the MLFQ/FCFS ratios. Greedy
decoding with `ignore_eos`, so both runs generate exactly the same number of tokens.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace

from agentos.bench.common import (
    check,
    new_console,
    print_checks,
    print_table,
    progress,
    ratio,
    set_threads,
)


@dataclass(slots=True)
class AgentsBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None
    sessions: int = 64  # agent sessions in the run
    turns: int = 2  # generate calls per session
    arrival_rate: float = 3.5  # sessions arriving per second (Poisson)
    prompt_median: int = 256  # first turn's prompt length (log-normal median, tokens)
    tool_median: int = 32  # appended tool output per later turn (log-normal median, tokens)
    gen_median: int = 8  # tokens generated per tool-call turn (log-normal median)
    gen_sigma: float = 1.0  # log-normal sigma of those lengths
    long_fraction: float = 0.06  # share of turns that write a long answer (report, code)
    long_median: int = 768  # tokens of a long answer (log-normal median, sigma 0.5)
    gen_max: int = 2048  # cap of one turn's generation
    pause_ms: float = 500.0  # mean tool pause between turns (exponential)
    max_batch_size: int = 2  # seats per step: fewer than the sessions that want one
    max_batch_tokens: int = 2048
    block_size: int = 16
    schedulers: tuple[str, ...] = ("fcfs", "mlfq")
    seed: int = 0  # seeds the workload
    seeds: tuple[int, ...] = ()  # several workloads: each is run, the targets apply to the medians
    threads: int | None = None

    def __post_init__(self):
        if self.sessions < 1 or self.turns < 1 or self.arrival_rate <= 0:
            raise ValueError("sessions, turns and arrival_rate must be positive")
        if set(self.schedulers) - {"fcfs", "mlfq"}:
            raise ValueError("schedulers are fcfs and mlfq")
        self.seeds = tuple(self.seeds)


@dataclass(slots=True)
class Turn:
    tokens: list[int]  # the prompt (first turn) or the tool output appended before it
    max_tokens: int
    pause_s: float  # tool pause before this turn (0 for the first)


def make_workload(b: AgentsBench) -> list[tuple[float, list[Turn]]]:
    """[(arrival second, turns)] per session, drawn from b.seed."""
    rng = random.Random(b.seed)

    def lognormal(median: int, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, round(median * math.exp(rng.gauss(0.0, sigma)))))

    work, t = [], 0.0
    for _ in range(b.sessions):
        t += rng.expovariate(b.arrival_rate)
        turns = []
        for i in range(b.turns):
            n = lognormal(b.prompt_median, 0.5, 8, 4 * b.prompt_median) if i == 0 else \
                lognormal(b.tool_median, 1.0, 1, 16 * b.tool_median)
            long = rng.random() < b.long_fraction
            gen = lognormal(b.long_median, 0.5, 1, b.gen_max) if long else \
                lognormal(b.gen_median, b.gen_sigma, 1, b.gen_max)
            turns.append(Turn(tokens=[rng.randrange(1, 256) for _ in range(n)], max_tokens=gen,
                              pause_s=0.0 if i == 0 else rng.expovariate(1000.0 / b.pause_ms)))
        work.append((t, turns))
    return work


def run(bench: AgentsBench) -> dict:
    threads = set_threads(bench.threads)
    results = []
    seeds = bench.seeds or (bench.seed,)
    turns = len(seeds) * len(bench.schedulers) * bench.sessions * bench.turns
    with progress(turns, "agent turns") as advance:
        for seed in seeds:
            b = replace(bench, seed=seed, seeds=())
            work = make_workload(b)
            runs = {name: asyncio.run(_run_policy(b, name, work, advance))
                    for name in b.schedulers}
            results.append(_summarize(b, threads, work, runs))
    if len(results) == 1:
        return results[0]
    ratios = {k: statistics.median(r["ratios"][k] for r in results) for k in results[0]["ratios"]}
    checks = _checks(ratios, f"median of {len(results)} workloads")
    return {"bench": "agents", "seeds": list(bench.seeds), "per_seed": results, "ratios": ratios,
            "checks": checks, "passed": all(c["passed"] for c in checks)}


async def _run_policy(b: AgentsBench, scheduler: str, work, advance=lambda: None) -> dict:
    from agentos import AsyncEngine

    blocks = sum(-(-(sum(len(t.tokens) + t.max_tokens for t in turns)) // b.block_size) + 1
                 for _, turns in work)
    async with AsyncEngine(model=b.model, device=b.device, dtype=b.dtype, block_size=b.block_size,
                           kv_blocks=blocks + 64, host_blocks=0, scheduler=scheduler,
                           max_batch_size=b.max_batch_size,
                           max_batch_tokens=b.max_batch_tokens) as engine:
        # warm-up: one short session touches every path before the clock starts
        s = await engine.create_session(tokens=list(range(1, 40)))
        await s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)
        await s.close()
        start = time.perf_counter()
        per_session = await asyncio.gather(*(_agent(engine, start, at, turns, advance)
                                             for at, turns in work))
        wall = time.perf_counter() - start - work[0][0]
        stats = await engine.stats()
    latencies = [lat for session in per_session for lat, _ in session]
    lengths = [n for session in per_session for _, n in session]
    return {"latencies": latencies, "lengths": lengths, "tokens": sum(lengths), "wall_s": wall,
            "steps": stats["steps"], "tokens_prefilled": stats["tokens_prefilled"]}


async def _agent(engine, start: float, arrival: float, turns: list[Turn],
                 advance=lambda: None) -> list[tuple[float, int]]:
    """One session's life; returns (latency seconds, tokens generated) per turn. Calls
    advance() after each turn (a progress bar)."""
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    out = []
    session = None
    for turn in turns:
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


def _summarize(b: AgentsBench, threads: int, work, runs: dict) -> dict:
    gen = [t.max_tokens for _, turns in work for t in turns]
    tools = [len(t.tokens) for _, turns in work for t in turns[1:]]
    workload = {
        **{k: v for k, v in asdict(b).items() if k not in ("model", "device", "dtype", "schedulers")},
        "turns_total": len(gen), "tokens_to_generate": sum(gen),
        "gen_len_p50": statistics.median(gen), "gen_len_p99": _pct(gen, 0.99), "gen_len_max": max(gen),
        "tool_len_p50": statistics.median(tools) if tools else 0,
        "arrival_span_s": work[-1][0] - work[0][0], "threads": threads,
    }
    policies = {}
    for name, r in runs.items():
        lat = r["latencies"]
        by_len = {}  # mean latency by the turn's generation length
        for label, lo, hi in _CLASSES:
            sel = [x for x, n in zip(lat, r["lengths"]) if lo <= n <= hi]
            by_len[label] = {"turns": len(sel), "mean_s": statistics.fmean(sel) if sel else None}
        policies[name] = {
            "mean_s": statistics.fmean(lat), "p50_s": statistics.median(lat),
            "p99_s": _pct(lat, 0.99), "max_s": max(lat), "tokens": r["tokens"],
            "wall_s": r["wall_s"], "tokens_per_s": r["tokens"] / r["wall_s"], "steps": r["steps"],
            "by_length": by_len,
        }
    result = {"bench": "agents", "workload": workload, "policies": policies, "checks": []}
    if {"fcfs", "mlfq"} <= runs.keys():
        f, m = policies["fcfs"], policies["mlfq"]
        ratios = {"mean_latency_fcfs_over_mlfq": ratio(f["mean_s"], m["mean_s"]),
                  "p50_latency_fcfs_over_mlfq": ratio(f["p50_s"], m["p50_s"]),
                  "p99_latency_fcfs_over_mlfq": ratio(f["p99_s"], m["p99_s"]),
                  "max_latency_mlfq_over_fcfs": ratio(m["max_s"], f["max_s"]),
                  "tokens_per_s_mlfq_over_fcfs": ratio(m["tokens_per_s"], f["tokens_per_s"])}
        result["ratios"] = ratios
        result["checks"] = _checks(ratios, f"seed {b.seed}")
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result


def _checks(r: dict, what: str) -> list[dict]:
    return [
        check("MLFQ mean turn latency >= 3x lower than FCFS", r["mean_latency_fcfs_over_mlfq"] >= 3,
              f"{r['mean_latency_fcfs_over_mlfq']:.2f}x ({what})"),
        check("MLFQ tokens/s >= 0.9x FCFS", r["tokens_per_s_mlfq_over_fcfs"] >= 0.9,
              f"{r['tokens_per_s_mlfq_over_fcfs']:.2f}x ({what})"),
        check("no starvation: MLFQ max turn latency <= 2x FCFS",
              r["max_latency_mlfq_over_fcfs"] <= 2, f"{r['max_latency_mlfq_over_fcfs']:.2f}x ({what})"),
    ]


def render(result: dict, console=None) -> None:
    console = console or new_console()
    for one in result.get("per_seed", [result]):
        _render_one(one, console)
    if "per_seed" in result:
        console.print(f"median over seeds {result['seeds']}: {_ratio_line(result['ratios'])}")
    print_checks(result["checks"], console)


def _render_one(result: dict, console) -> None:
    w = result["workload"]
    console.print(
        f"workload (seed {w['seed']}): {w['sessions']} sessions x {w['turns']} turns, Poisson "
        f"arrivals {w['arrival_rate']}/s over {w['arrival_span_s']:.1f} s; prompt median "
        f"{w['prompt_median']} tokens, tool output median {w['tool_len_p50']:.0f}, tool pause "
        f"mean {w['pause_ms']:.0f} ms; generation: tool calls log-normal median "
        f"{w['gen_median']} sigma {w['gen_sigma']}, {w['long_fraction']:.0%} long answers of "
        f"median {w['long_median']} (p50 {w['gen_len_p50']:.0f}, p99 {w['gen_len_p99']}, max "
        f"{w['gen_len_max']}), {w['tokens_to_generate']} tokens in {w['turns_total']} turns; "
        f"engine: {w['max_batch_size']} seats, {w['max_batch_tokens']} tokens per step, "
        f"{w['threads']} threads")
    rows = [[name, p["mean_s"], p["p50_s"], p["p99_s"], p["max_s"], p["tokens_per_s"], p["wall_s"],
             *(p["by_length"][c]["mean_s"] for c, _, _ in _CLASSES)]
            for name, p in result["policies"].items()]
    counts = next(iter(result["policies"].values()))["by_length"]
    print_table("turn latency (s) and throughput", [
        "policy", "mean", "p50", "p99", "max", "tok/s", "wall s",
        *(f"mean, {c} ({counts[c]['turns']} turns)" for c, _, _ in _CLASSES)], rows, console)
    if "ratios" in result:
        console.print(_ratio_line(result["ratios"]))


def _ratio_line(r: dict) -> str:
    return (f"FCFS/MLFQ latency: mean {r['mean_latency_fcfs_over_mlfq']:.2f}x, p50 "
            f"{r['p50_latency_fcfs_over_mlfq']:.2f}x, p99 {r['p99_latency_fcfs_over_mlfq']:.2f}x; "
            f"MLFQ/FCFS max {r['max_latency_mlfq_over_fcfs']:.2f}x, tok/s "
            f"{r['tokens_per_s_mlfq_over_fcfs']:.2f}x")
