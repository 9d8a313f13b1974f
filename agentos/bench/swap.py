"""`agentos bench swap`: the host tier's bandwidth, and what swap buys under oversubscription.

Part 1, bandwidth. `blocks` KV blocks are moved between the device pool and the host
tier by the runner's own `swap_out`/`swap_in` (the copies the kernel makes), for two
slot layouts: contiguous (device slots 0..n-1: a session allocated in one go) and
scattered (a seeded random sample of device slots: pages of sessions whose decode
interleaved), the host slots consecutive in both. The peer is a plain `copy_` of the
same bytes in the same direction between two preallocated contiguous tensors (on CUDA
device memory and pinned host memory, as the tiers are). Every copy is timed wall clock
with the device synced before and after; swaps and plain copies alternate within each
repeat so background load hits both alike; GB/s = bytes / median seconds.

Part 2, oversubscription. A seeded multi-turn agent workload (each session: a prompt,
then turns of greedy generate with a tool output appended between them) runs with every
session concurrent, once on each of three fresh engines: unconstrained (a device pool
that holds everything), a device pool of a quarter of the working set (the blocks all
sessions hold at the end) with a large host tier, and the same pool without a host
tier, where pages are dropped and recomputed from tokens. Each run is timed wall clock
from the first create to the last token; tokens/s = generated tokens / seconds. Greedy
outputs must not depend on where pages lived: every session's final tokens are compared
with the unconstrained run's.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

from agentos.bench.common import (
    check,
    dtype_name,
    median,
    new_console,
    print_checks,
    print_table,
    ratio,
    set_threads,
    sync,
)

GB = 1e9
LAYOUTS = ("contiguous", "scattered")
DIRECTIONS = ("out", "in")  # out: device -> host, in: host -> device


@dataclass(slots=True)
class SwapBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    blocks: int = 256  # blocks moved by each timed swap and plain copy
    repeats: int = 5  # timed copies per layout and direction (medians)
    warmup: int = 2  # untimed copies before them
    sessions: int = 24  # concurrent sessions of the workload
    prompt_len: int = 200  # mean prompt tokens (each within +- block_size / 2 of it)
    turns: int = 3  # generate calls per session; a tool output is appended before each later one
    new_tokens: int = 32  # greedy tokens per turn (end of sequence ignored)
    min_tool_tokens: int = 1  # tool output tokens appended between turns: drawn in [min, max]
    max_tool_tokens: int = 40
    oversubscribe: int = 4  # the small device pool holds the working set / this
    block_size: int = 16
    seed: int = 0  # seeds the scattered slots and the workload
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def __post_init__(self):
        if min(self.blocks, self.repeats, self.sessions, self.prompt_len, self.turns,
               self.new_tokens, self.min_tool_tokens, self.oversubscribe) < 1:
            raise ValueError("blocks, repeats, sessions, prompt_len, turns, new_tokens, "
                             "min_tool_tokens and oversubscribe must be >= 1")
        if self.warmup < 0 or self.max_tool_tokens < self.min_tool_tokens:
            raise ValueError("warmup must be >= 0 and max_tool_tokens >= min_tool_tokens")


def run(bench: SwapBench) -> dict:
    """Runs both parts; returns the JSON-ready results (see `render`)."""
    from agentos import Engine

    threads = set_threads(bench.threads)
    # the host tier must hold the n blocks; a few spare device slots make the sample scattered
    with Engine(model=bench.model, device=bench.device, dtype=bench.dtype,
                block_size=bench.block_size, kv_blocks=bench.blocks + 16,
                host_blocks=bench.blocks + 16) as engine:
        dtype, block_bytes = engine.kernel.dtype, engine.kernel.block_bytes
        rows = _bandwidth(engine, bench)
    work = _workload(bench)
    runs, working_set = _oversubscribe(bench, work)
    workload = {"sessions": bench.sessions, "prompt_len": bench.prompt_len,
                "turns": bench.turns, "new_tokens": bench.new_tokens,
                "tool_tokens": [bench.min_tool_tokens, bench.max_tool_tokens],
                "seed": bench.seed, "total_tokens": sum(_final_len(w, bench) for w in work),
                "working_set_blocks": working_set,
                "working_set_bytes": working_set * block_bytes}
    return _summarize(bench, dtype, threads, block_bytes, rows, workload, runs)


# -- part 1: bandwidth --------------------------------------------------------------------


def _bandwidth(engine, bench: SwapBench) -> list[dict]:
    """Times swap_out/swap_in per layout against plain copies; returns one row per
    (direction, layout). The engine must be idle: the runner is used directly."""
    import torch

    runner, n, dev = engine.kernel.runner, bench.blocks, bench.device
    # NOTE: the pools are calloc'd: a page is mapped on first touch, and reading one never
    # written maps the shared zero page (served from cache). Real bytes everywhere first.
    runner.kv.uniform_()
    runner.host_kv.uniform_()
    shape, pin = (n, *runner.kv.shape[1:]), runner.kv.device.type == "cuda"
    dev_buf = torch.empty(shape, dtype=runner.kv.dtype, device=runner.kv.device).uniform_()
    host_buf = torch.empty(shape, dtype=runner.kv.dtype, pin_memory=pin).uniform_()
    nbytes = n * engine.kernel.block_bytes
    assert dev_buf.numel() * dev_buf.element_size() == nbytes
    rng = random.Random(bench.seed)
    slots = {"contiguous": list(range(n)), "scattered": rng.sample(range(len(runner.kv)), n)}
    copies = {"out": lambda: host_buf.copy_(dev_buf), "in": lambda: dev_buf.copy_(host_buf)}
    ops = {}  # (direction, "plain" or layout) -> the copy
    for direction in DIRECTIONS:
        ops[direction, "plain"] = copies[direction]
        for layout, dev_slots in slots.items():
            if direction == "out":
                ops[direction, layout] = partial(runner.swap_out, list(zip(dev_slots, range(n))))
            else:
                ops[direction, layout] = partial(runner.swap_in, list(zip(range(n), dev_slots)))
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in ops}
    for i in range(bench.warmup + bench.repeats):
        # every op once per round: background load hits swaps and plain copies alike
        for key, op in ops.items():
            sync(dev)
            t0 = time.perf_counter()
            op()
            sync(dev)
            if i >= bench.warmup:
                seconds[key].append(time.perf_counter() - t0)
    rows = []
    for direction in DIRECTIONS:
        plain = nbytes / median(seconds[direction, "plain"]) / GB
        for layout in LAYOUTS:
            swap = nbytes / median(seconds[direction, layout]) / GB
            rows.append({"direction": direction, "layout": layout, "bytes": nbytes,
                         "swap_gb_s": swap, "plain_gb_s": plain, "ratio": ratio(swap, plain),
                         "swap_runs_s": seconds[direction, layout],
                         "plain_runs_s": seconds[direction, "plain"]})
    return rows


# -- part 2: oversubscription -------------------------------------------------------------


def _workload(bench: SwapBench) -> list[tuple[list[int], list[list[int]]]]:
    """Per session: a prompt and the tool outputs appended before each later turn. Ids are
    drawn from 1..255, bytes to the byte tokenizer of `tiny`; prompt lengths vary within a
    block so sessions do not fill their blocks in step."""
    rng = random.Random(bench.seed)
    bs = bench.block_size

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, 256) for _ in range(k)]

    return [(ids(max(1, bench.prompt_len - bs // 2 + rng.randrange(bs))),
             [ids(rng.randint(bench.min_tool_tokens, bench.max_tool_tokens))
              for _ in range(bench.turns - 1)])
            for _ in range(bench.sessions)]


def _final_len(item: tuple[list[int], list[list[int]]], bench: SwapBench) -> int:
    prompt, tools = item
    return len(prompt) + sum(map(len, tools)) + bench.turns * bench.new_tokens


def _oversubscribe(bench: SwapBench, work) -> tuple[list[dict], int]:
    """Runs the workload unconstrained, then in a small pool with swap and with drop;
    returns (one record per run, the working set in blocks)."""
    bs = bench.block_size
    # every session's final blocks, plus a tail block each and room for the warm-up session
    kv_all = sum(-(-_final_len(w, bench) // bs) for w in work) + bench.sessions + 64
    ref, expected = _timed_run(bench, work, "unconstrained", kv_all, 0)
    working_set = sum(-(-len(t) // bs) for t in expected if t is not None)
    small = max(1, -(-working_set // bench.oversubscribe))
    runs = [ref]
    for name, host_blocks in (("swap", 2 * working_set), ("drop", 0)):
        r, tokens = _timed_run(bench, work, name, small, host_blocks)
        r["identical"] = sum(t is not None and t == e for t, e in zip(tokens, expected))
        runs.append(r)
    for r in runs:
        r["ratio"] = ratio(r["tok_s"], ref["tok_s"])
    return runs, working_set


def _timed_run(bench: SwapBench, work, name: str, kv_blocks: int,
               host_blocks: int) -> tuple[dict, list[list[int] | None]]:
    """One run of the workload on a fresh engine. Returns (its record, each session's
    final tokens: None for a failed session)."""
    from agentos import Engine

    with Engine(model=bench.model, device=bench.device, dtype=bench.dtype,
                block_size=bench.block_size, kv_blocks=kv_blocks, host_blocks=host_blocks,
                scheduler="mlfq") as engine:
        longest = max(_final_len(w, bench) for w in work)
        if longest > engine.max_model_len:
            raise ValueError(f"a session reaches {longest} tokens, beyond the model's context "
                             f"({engine.max_model_len})")
        # warm-up: a first prefill and decode pay one-time costs that no run should carry
        s = engine.create_session(tokens=list(range(1, 2 * bench.block_size + 1)))
        s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)
        s.close()
        before = engine.stats()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(work)) as pool:
            outcomes = list(pool.map(lambda w: _agent(engine, w, bench.new_tokens), work))
        wall = time.perf_counter() - t0
        after = engine.stats()
        engine.check()
        for session, *_ in outcomes:
            if session is not None:
                session.close()
        engine.check()
    generated = sum(g for _, _, g, _ in outcomes)
    errors = [e for *_, e in outcomes if e is not None]
    record = {"name": name, "kv_blocks": kv_blocks, "host_blocks": host_blocks, "wall_s": wall,
              "generated_tokens": generated, "tok_s": generated / wall,
              **{k: after[k] - before[k] for k in ("swap_out_blocks", "swap_in_blocks",
                                                     "dropped_blocks")},
              "failed": len(errors), "errors": errors[:3], "identical": None}
    return record, [t for _, t, _, _ in outcomes]


def _agent(engine, item, new_tokens: int):
    """One session's turns. Returns (session or None, final tokens or None, tokens
    generated, error text or None); a failed session is closed, the others stay open
    so the working set is held to the end."""
    from agentos import AgentOSError

    prompt, tools = item
    session, generated = None, 0
    try:
        session = engine.create_session(tokens=prompt)
        for tool in [None, *tools]:
            if tool is not None:
                session.append(tokens=tool)
            g = session.generate(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            generated += len(g.tokens)
        return session, session.tokens, generated, None
    except AgentOSError as e:
        if session is not None:
            session.close()
        return None, None, generated, f"{type(e).__name__}: {e}"


# -- results --------------------------------------------------------------------------


def _summarize(bench: SwapBench, dtype, threads: int, block_bytes: int, rows: list[dict],
               workload: dict, runs: list[dict]) -> dict:
    worst = min(rows, key=lambda r: r["ratio"])
    checks = [check("swap bandwidth >= 0.5x plain copy", all(r["ratio"] >= 0.5 for r in rows),
                    ", ".join(f"{r['direction']} {r['layout']} {r['ratio']:.2f}x" for r in rows)
                    + f" (lowest: {worst['direction']} {worst['layout']})")]
    n = bench.sessions
    for r in runs[1:]:
        checks.append(check(f"{r['name']} run: final tokens identical to the unconstrained "
                            "run's", r["identical"] == n, f"{r['identical']}/{n} sessions"))
        checks.append(check(f"{r['name']} run: no failed sessions", r["failed"] == 0,
                            f"{r['failed']} failed" + (f" ({r['errors'][0]})" if r["errors"]
                                                       else "")))
        if r["name"] == "swap":
            checks.append(check("swap run tokens/s >= 0.5x unconstrained", r["ratio"] >= 0.5,
                                f"{r['tok_s']:.0f} vs {runs[0]['tok_s']:.0f} tok/s "
                                f"({r['ratio']:.2f}x)"))
    return {"bench": "swap", "config": {**asdict(bench), "dtype": dtype_name(dtype),
                                          "threads": threads, "block_bytes": block_bytes},
            "bandwidth": rows, "workload": workload, "runs": runs, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def render(result: dict, console=None) -> None:
    """Prints the results as rich tables plus one PASS/FAIL line per target."""
    console = console or new_console()
    cfg, wl = result["config"], result["workload"]
    names = {"out": "out (device -> host)", "in": "in (host -> device)"}
    print_table(f"swap vs plain copy of {cfg['blocks']} blocks x {cfg['block_bytes'] / 1024:g} KiB "
                f"({result['bandwidth'][0]['bytes'] / 2**20:.1f} MiB), median of "
                f"{cfg['repeats']}; model {cfg['model']}, {cfg['device']}, {cfg['dtype']}, "
                f"{cfg['threads']} threads",
                ["direction", "layout", "swap GB/s", "plain copy GB/s", "swap / plain"],
                [[names[r["direction"]], r["layout"], r["swap_gb_s"], r["plain_gb_s"],
                  r["ratio"]] for r in result["bandwidth"]], console)
    console.print(f"workload: {wl['sessions']} concurrent sessions, prompts of ~"
                  f"{wl['prompt_len']} tokens, {wl['turns']} turns of {wl['new_tokens']} greedy "
                  f"tokens, {wl['tool_tokens'][0]}-{wl['tool_tokens'][1]} tool tokens appended "
                  f"between turns, seed {wl['seed']}; working set {wl['working_set_blocks']} "
                  f"blocks ({wl['working_set_bytes'] / 2**20:.1f} MiB), small pool = 1/"
                  f"{cfg['oversubscribe']} of it")
    rows = [[r["name"], r["kv_blocks"], r["host_blocks"], r["wall_s"], r["tok_s"], r["ratio"],
             r["swap_out_blocks"], r["swap_in_blocks"], r["dropped_blocks"], r["failed"],
             "reference" if r["identical"] is None else f"{r['identical']}/{wl['sessions']}"]
            for r in result["runs"]]
    print_table("multi-turn workload, one run each on a fresh engine (mlfq); device, host: "
                "pool sizes in blocks; out, in, dropped: blocks swapped out, in, dropped; "
                "identical: sessions whose final tokens equal the unconstrained run's",
                ["run", "device", "host", "wall s", "tok/s", "x unconstrained", "out", "in",
                 "dropped", "failed", "identical"], rows, console)
    print_checks(result["checks"], console)
