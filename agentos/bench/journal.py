"""`agentos bench journal`: what the journal costs on generate throughput and on fork,
snapshot and rollback latency, with Redis on, as a ratio to the in-memory store.

Three systems run the same work: `memory` (the journal writes into an in-process
MemoryStore: the same records and batches as Redis, minus the network; the baseline),
`redis` (the journal writes to Redis, a private `redis-server` with append-only
persistence unless a URL is given) and `off` (no journal, for reference). With a store,
every change is acknowledged only once it is in the store, so the timings include
waiting for durability.

Throughput: `sessions` sessions, each created from a random `prompt_len`-token prompt and
generating `new_tokens` tokens (sampled, end of sequence ignored), all at once from a
thread pool so their steps batch; timed wall clock from the first create to the last
token, tokens/s = sessions * new_tokens / seconds. Each run is on a fresh engine after a
short warm-up, the systems taking turns (rotated each round) so background load hits all
alike; the median of `repeats` runs.

Latency: one engine per system, all open at once, each with a prefilled session of
each length in `lengths`; each repeat times, on every system in turn, `fork(1)` (the child
closed untimed), `snapshot()`, and after `diverge_tokens` generated tokens (untimed)
`rollback()` to that snapshot (deleted untimed). Medians of `op_repeats`, wall clock
around the public call.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

from agentos.bench.common import (
    check,
    dtype_name,
    median,
    new_console,
    print_checks,
    print_table,
    progress,
    random_prompt,
    ratio,
    set_threads,
    timed,
)

US = 1e6
SYSTEMS = ("memory", "redis", "off")  # memory first: the baseline of the ratios
OPS = ("fork", "snapshot", "rollback")


@dataclass(slots=True)
class JournalBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    redis: str | None = None  # redis:// URL to journal to; None: a private redis-server
    sessions: int = 32  # concurrent sessions of the throughput runs
    prompt_len: int = 128  # tokens per prompt
    new_tokens: int = 64  # tokens generated per session
    temperature: float = 0.8
    repeats: int = 3  # timed throughput runs per system (median)
    lengths: Sequence[int] = (128, 2048, 16384)  # session lengths of fork/snapshot/rollback
    op_repeats: int = 50  # timed repeats of each op per length (median)
    warmup: int = 3  # untimed op repeats before the timed ones
    diverge_tokens: int = 4  # tokens generated between a snapshot and the rollback to it
    block_size: int = 16
    max_batch_tokens: int = 2048
    seed: int = 0  # seeds the random prompts and the sessions' samplers
    # NOTE: one torch thread by default: the journal's cost is the question, not compute, and
    # on a host whose cores are busy an op split over a descheduled thread waits for it (a
    # 2-core machine with one busy core ran the throughput runs 10-30x slower on 2 threads)
    threads: int | None = 1  # torch intra-op threads; None: torch's default

    def __post_init__(self):
        if min(self.sessions, self.prompt_len, self.new_tokens, self.repeats,
               self.op_repeats, self.diverge_tokens) < 1:
            raise ValueError("sessions, prompt_len, new_tokens, repeats, op_repeats and "
                             "diverge_tokens must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError("session lengths must be >= 2 tokens")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")


def run(bench: JournalBench) -> dict:
    """Runs every system; returns the JSON-ready results (see `render`).

    Lengths beyond the model's context are skipped (listed under "skipped"). Raises
    RuntimeError when no --redis URL is given and redis-server is missing or does not
    start; StoreUnavailableError when the given Redis does not answer.
    """
    import torch

    before = torch.get_num_threads()
    try:
        return _run(bench, set_threads(bench.threads))
    finally:
        torch.set_num_threads(before)  # a process-wide setting: put it back


def _run(bench: JournalBench, threads: int) -> dict:
    steps = bench.repeats * len(SYSTEMS) + len(set(bench.lengths))
    with _redis(bench.redis) as url, progress(steps, "journal runs") as advance:
        stores = {"memory": "memory", "redis": url, "off": None}
        runs: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
        for r in range(bench.repeats):
            rng = random.Random(bench.seed + r)  # round r: the same prompts on every system
            order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
            for name in order:
                runs[name].append(_generate_run(bench, stores[name], rng.getstate()))
                advance()
        ops = _measure_ops(bench, stores, advance)
    config = {**asdict(bench), "lengths": list(bench.lengths),
              "redis_server": "given" if bench.redis else "private, appendfsync everysec",
              "dtype": ops["dtype"], "threads": threads}
    return _summarize(config, runs, ops)


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    """Yields url, or that of a private redis-server (stopped and removed afterwards)."""
    if url is not None:
        yield url
        return
    from agentos.bench.redis_server import RedisServer

    with RedisServer() as server:
        yield server.url


def _engine(bench: JournalBench, store: str | None, kv_blocks: int):
    from agentos import Engine

    # NOTE: a deployment of its own per engine: an engine recovers its deployment's
    # records at start, and a given Redis may hold other runs' records
    return Engine(model=bench.model, device=bench.device, dtype=bench.dtype,
                  block_size=bench.block_size, kv_blocks=kv_blocks, host_blocks=0,
                  max_batch_tokens=bench.max_batch_tokens, store=store,
                  deployment=f"bench-{secrets.token_hex(6)}")


def _counters(engine) -> dict:
    st = engine.stats()
    store = st.get("store", {})
    return {"steps": st["steps"], "journal_writes": store.get("journal_writes", 0),
            "journal_batches": store.get("journal_batches", 0),
            "blocks_used": st["kv"]["device_blocks_used"]}


def _generate_run(bench: JournalBench, store: str | None, rng_state) -> dict:
    """One timed throughput run on a fresh engine (after a short warm-up at the same batch
    size). Returns its seconds, the engine steps and journal writes and batches it took,
    and the KV blocks still in use once its sessions closed."""
    per_session = -(-(bench.prompt_len + bench.new_tokens) // bench.block_size) + 1
    kv_blocks = bench.sessions * per_session + 64
    rng = random.Random()
    rng.setstate(rng_state)
    with _engine(bench, store, kv_blocks) as engine, ThreadPoolExecutor(bench.sessions) as pool:
        kernel = engine.kernel
        if bench.prompt_len + bench.new_tokens > kernel.max_model_len:
            raise ValueError(f"prompt_len + new_tokens exceed the model's context "
                             f"({kernel.max_model_len})")

        def prompts() -> list[list[int]]:
            return [random_prompt(bench.prompt_len, kernel.vocab_size,
                                  kernel.model_config.bos_token_id, rng)
                    for _ in range(bench.sessions)]

        def session(i: int, prompt: list[int], new_tokens: int):
            s = engine.create_session(tokens=prompt, seed=bench.seed + i)
            s.generate(max_tokens=new_tokens, temperature=bench.temperature, ignore_eos=True)
            return s

        def batch(new_tokens: int) -> tuple[list, float]:
            work = prompts()  # fresh prompts: no run reuses a cached prefix
            return timed(lambda: list(pool.map(session, range(len(work)), work,
                                               [new_tokens] * len(work))))

        warm, _ = batch(min(bench.new_tokens, 4))
        list(pool.map(lambda s: s.close(), warm))
        before = _counters(engine)
        sessions, seconds = batch(bench.new_tokens)
        after = _counters(engine)
        list(pool.map(lambda s: s.close(), sessions))
        engine.check()
        left = _counters(engine)["blocks_used"]
    return {"seconds": seconds, "blocks_used_after": left,
            **{k: after[k] - before[k] for k in ("steps", "journal_writes", "journal_batches")}}


def _measure_ops(bench: JournalBench, stores: dict[str, str | None],
                 advance=lambda: None) -> dict:
    """Fork, snapshot and rollback medians (microseconds) per session length, one engine
    per system, all open at once so that each repeat runs on every system in turn (a
    drifting background load hits all alike); advance() after each length (a progress
    bar). NOTE: with one torch thread (the default) the engines' loop threads share no
    OpenMP pool to hand work across.

    Returns {"rows": {system: rows}, "skipped": lengths beyond the context, "dtype",
    "blocks_used_after": {system: KV blocks in use once its sessions closed}}."""
    rng = random.Random(bench.seed)
    longest = max(bench.lengths) + bench.diverge_tokens + 1
    kv_blocks = 2 * (-(-longest // bench.block_size)) + 64
    with ExitStack() as stack:
        engines = {name: stack.enter_context(_engine(bench, stores[name], kv_blocks))
                   for name in SYSTEMS}
        kernel = engines["memory"].kernel
        limit = kernel.max_model_len - bench.diverge_tokens - 1
        lengths = sorted(set(bench.lengths))
        rows: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
        for n in (n for n in lengths if n <= limit):
            prompt = random_prompt(n - 1, kernel.vocab_size, kernel.model_config.bos_token_id, rng)
            sessions = {name: e.create_session(tokens=prompt, seed=bench.seed)
                        for name, e in engines.items()}
            for s in sessions.values():  # prefill; now n tokens
                s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)
            times = {name: {op: [] for op in OPS} for name in SYSTEMS}
            for i in range(bench.warmup + bench.op_repeats):
                for name in SYSTEMS[i % len(SYSTEMS):] + SYSTEMS[:i % len(SYSTEMS)]:
                    t = _cycle(sessions[name], bench)
                    if i >= bench.warmup:
                        for op in OPS:
                            times[name][op].append(t[op])
            for name, s in sessions.items():
                s.close()
                rows[name].append({"num_tokens": n, **{f"{op}_us": median(times[name][op]) * US
                                                       for op in OPS}})
            advance()
        for e in engines.values():
            e.check()
        left = {name: _counters(e)["blocks_used"] for name, e in engines.items()}
        dtype = dtype_name(kernel.dtype)
    return {"rows": rows, "skipped": [n for n in lengths if n > limit], "dtype": dtype,
            "blocks_used_after": left}


def _cycle(s, bench: JournalBench) -> dict[str, float]:
    """Times fork(1), snapshot, and rollback to that snapshot after diverge_tokens generated
    tokens, on session s; returns {op: seconds}. Leaves s as it was (the child closed, the
    snapshot deleted)."""
    kids, t_fork = timed(lambda: s.fork(1))
    kids[0].close()
    snap, t_snap = timed(s.snapshot)
    s.generate(max_tokens=bench.diverge_tokens, temperature=bench.temperature, ignore_eos=True)
    s.info()  # a round trip: the kernel has finished the generate's last step
    _, t_rollback = timed(lambda: s.rollback(snap))
    snap.delete()
    return {"fork": t_fork, "snapshot": t_snap, "rollback": t_rollback}


def _summarize(config: dict, runs: dict[str, list[dict]], ops: dict) -> dict:
    generated = config["sessions"] * config["new_tokens"]
    systems = {}
    for name in SYSTEMS:
        rs = runs[name]
        totals = {k: sum(r[k] for r in rs) for k in ("steps", "journal_writes", "journal_batches")}
        systems[name] = {
            "journal": name != "off",
            "generate_runs_s": [r["seconds"] for r in rs],
            "generate_tok_s": generated / median([r["seconds"] for r in rs]),
            **totals,
            "journal_writes_per_token": totals["journal_writes"] / (generated * len(rs)),
            "journal_batches_per_step": ratio(totals["journal_batches"], totals["steps"]),
            "ops": ops["rows"][name],
        }
    metrics = [{"metric": "generate_tok_s", "num_tokens": None,
                **{name: systems[name]["generate_tok_s"] for name in SYSTEMS}}]
    for op in OPS:
        for i, row in enumerate(ops["rows"]["memory"]):
            metrics.append({"metric": f"{op}_us", "num_tokens": row["num_tokens"],
                            **{name: ops["rows"][name][i][f"{op}_us"] for name in SYSTEMS}})
    for m in metrics:
        m["redis_over_memory"] = ratio(m["redis"], m["memory"])
        m["off_over_memory"] = ratio(m["off"], m["memory"])
    checks = [
        check("journal: every generated token written to the store (memory, redis)",
              all(systems[n]["journal_writes"] >= generated * len(runs[n])
                  for n in ("memory", "redis")),
              ", ".join(f"{n} {systems[n]['journal_writes_per_token']:.2f} writes/token"
                        for n in ("memory", "redis"))),
        check("every KV block free once the sessions closed",
              all(r["blocks_used_after"] == 0 for rs in runs.values() for r in rs)
              and not any(ops["blocks_used_after"].values()),
              f"{sum(len(rs) for rs in runs.values())} throughput runs, "
              f"{len(SYSTEMS)} latency engines"),
    ]
    return {"bench": "journal", "config": config, "systems": systems, "metrics": metrics,
            "skipped": ops["skipped"], "checks": checks, "passed": all(c["passed"] for c in checks)}


_LABELS = {"generate_tok_s": "generate tok/s", "fork_us": "fork us", "snapshot_us": "snapshot us",
           "rollback_us": "rollback us"}


def render(result: dict, console=None) -> None:
    """Prints the workload, one table of medians and ratios, the journal's counters and one
    PASS/FAIL line per check."""
    console = console or new_console()
    cfg = result["config"]
    console.print(f"workload: throughput {cfg['sessions']} concurrent sessions x "
                  f"{cfg['prompt_len']}-token prompts x {cfg['new_tokens']} new tokens "
                  f"(temperature {cfg['temperature']}, creates included), median of "
                  f"{cfg['repeats']} runs on fresh engines; fork(1) / snapshot / rollback "
                  f"after {cfg['diverge_tokens']} generated tokens, median of "
                  f"{cfg['op_repeats']} after {cfg['warmup']} warm-up; model {cfg['model']}, "
                  f"{cfg['device']}, {cfg['dtype']}, {cfg['threads']} threads; Redis: "
                  f"{cfg['redis_server']}")
    rows = [[_LABELS[m["metric"]] + ("" if m["num_tokens"] is None else f" @{m['num_tokens']}"),
             m["memory"], m["redis"], m["off"], m["redis_over_memory"], m["off_over_memory"]]
            for m in result["metrics"]]
    print_table("journal cost, medians; x = system / memory (tok/s: below 1 is slower; "
                "us: above 1 is slower)",
                ["metric", "memory", "redis", "off", "redis x", "off x"], rows, console)
    systems = result["systems"]
    print_table("journal counters over the timed throughput runs (writes: creates, tokens, "
                "RNG states)",
                ["system", "engine steps", "journal writes", "store batches", "writes / token",
                 "batches / step"],
                [[name, s["steps"], s["journal_writes"], s["journal_batches"],
                  s["journal_writes_per_token"], s["journal_batches_per_step"]]
                 for name, s in systems.items() if s["journal"]], console)
    if result["skipped"]:
        console.print(f"skipped (beyond the model's context): {result['skipped']}")
    print_checks(result["checks"], console)
