"""`agentos bench overhead`: where the host time of a decode step and of a syscall goes.

Decode: `sessions` sessions (default 1, 32 and 256) are prefilled and sample one token,
then generate `new_tokens` more greedily together; the engine's own counters, read before
and after, split the time per step into

- schedule: forming the batch (policy order, memory, swaps decided);
- prepare: the step's index tensors and attention metadata;
- forward: the model (on CUDA its launches, or with the device waited for: `--sync`);
- sample: the sampler and the outputs;
- bookkeeping: the rest of the step (tokens, journal, futures, stats, the policy);
- between steps: the loop thread outside step() (syscalls, handoffs, waking callers).

Host overhead per step = wall time per step - forward. The same single-session decode is
run beside `idle` idle sessions (their cost to a step must not grow with their number),
and through transformers' `generate` (decode only: (generate(n) - generate(1)) / (n - 1))
on the same weights; when llama-cpp-python is installed, this engine and llama.cpp decode
one session of a tiny-shaped random checkpoint converted with llama.cpp's own converter
(see llamacpp.py).

Syscalls: fork + close, snapshot, rollback and info of a `syscall_len`-token session, from
the caller: the direct path (the loop between steps: the call runs in the caller's
thread), the queue (a round trip through the loop thread), and the work alone (timed in
the loop thread), so handoff = queued - work.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from agentos.bench.common import (
    check,
    dtype_name,
    hf_greedy_kwargs,
    load_peer,
    median,
    new_console,
    on_engine_thread,
    print_checks,
    print_table,
    progress,
    random_prompt,
    ratio,
    set_threads,
    sync,
)
from agentos.bench.decode import _ours

PHASES = ("schedule", "prepare", "forward", "sample", "bookkeeping", "between")
HOST_TARGET_S = 1e-3  # host overhead per step of one session, at most (tiny model)
SYSCALL_TARGET_S = 50e-6  # fork and rollback at 512 tokens, from the caller, at most
IDLE_TARGET = 1.2  # decode beside the idle sessions, at most this times decode alone


@dataclass(slots=True)
class OverheadBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    sessions: list[int] = field(default_factory=lambda: [1, 32, 256])
    prompt_len: int = 512
    new_tokens: int = 64
    idle: int = 4000  # idle sessions beside one decoding session (0: skip)
    syscall_len: int = 512  # tokens of the session the syscalls act on
    turn_context: int = 2048  # llama.cpp peer: an agent's turn after this many tokens...
    turn_tokens: int = 16  # ...appending this many (a tool output), then one new token
    op_repeats: int = 200  # timed repeats of each syscall
    repeats: int = 3  # timed runs of each decode case (medians)
    peer: bool = True  # transformers' generate on the same weights
    llama_cpp: bool = True  # llama.cpp too, when installed (agentos/bench/llamacpp.py)
    sync: bool = False  # CUDA: wait for the device after each forward (device time)
    block_size: int = 16
    seed: int = 0
    threads: int | None = None
    cuda_graphs: bool = True

    def __post_init__(self):
        if (not self.sessions or min(self.sessions) < 1 or self.prompt_len < 1
                or self.new_tokens < 2 or self.repeats < 1 or self.op_repeats < 1
                or self.idle < 0 or self.syscall_len < 1 or self.turn_context < 1
                or self.turn_tokens < 1):
            raise ValueError("sessions, prompt_len, repeats, op_repeats, syscall_len, "
                             "turn_context and turn_tokens must be >= 1, new_tokens >= 2, "
                             "idle >= 0")


def run(bench: OverheadBench) -> dict:
    """Runs every part; returns the JSON-ready results (see `render`)."""
    return asyncio.run(_run(bench))


async def _run(bench: OverheadBench) -> dict:
    from agentos import AsyncEngine

    threads = set_threads(bench.threads)
    per = -(-(bench.prompt_len + bench.new_tokens + 2) // bench.block_size) + 1
    # the syscalls' session (and what its fork and snapshot write) may be the largest
    syscall_blocks = 2 * (-(-(bench.syscall_len + 2) // bench.block_size) + 1)
    kv_blocks = max(max(bench.sessions) * per, syscall_blocks) + bench.idle + 2 * per + 64
    async with AsyncEngine(model=bench.model, device=bench.device, dtype=bench.dtype,
                           block_size=bench.block_size, kv_blocks=kv_blocks,
                           max_batch_size=max(256, *bench.sessions),
                           max_batch_tokens=max(2048, bench.prompt_len),
                           cuda_graphs=bench.cuda_graphs) as engine:
        kernel = engine.kernel
        if bench.prompt_len + bench.new_tokens + 1 > kernel.max_model_len:
            raise ValueError(f"prompt_len + new_tokens exceed the model's context "
                             f"({kernel.max_model_len})")
        kernel.runner.sync_phases = bench.sync
        rng = random.Random(bench.seed)

        def prompts(n: int, length: int = bench.prompt_len) -> list[list[int]]:
            return [random_prompt(length, kernel.vocab_size, kernel.model_config.bos_token_id, rng)
                    for _ in range(n)]

        steps = len(bench.sessions) + bool(bench.idle) + 1 + bench.peer
        with progress(steps, "overhead parts") as advance:
            await _ours(engine, prompts(1), 4)  # warm-up: every path once
            cases = []
            for n in bench.sessions:
                cases.append(await _decode_case(engine, bench, lambda k=n: prompts(k)))
                advance()
            idle = None
            if bench.idle:
                idle = await _idle_case(engine, bench, prompts)
                advance()
            syscalls = await _syscalls(engine, bench, prompts(1, bench.syscall_len)[0])
            advance()
            peer = None
            if bench.peer:
                net = await on_engine_thread(engine, load_peer, bench.model, bench.device,
                                             kernel.dtype)
                # the single-session case's prompt: the greedy tokens must agree
                prompt = next((c["prompt"] for c in cases if c["sessions"] == 1), prompts(1)[0])
                peer = await on_engine_thread(engine, _hf_decode, net, bench, prompt)
                del net
                advance()
        dtype = kernel.dtype
    # NOTE: after the engine above is closed: one engine (one torch thread team) at a time
    llama = await _llama_cpp(bench, threads, rng) if bench.llama_cpp else None
    return _summarize(bench, dtype_name(dtype), threads, cases, idle, syscalls, peer, llama)


async def _llama_cpp(bench: OverheadBench, threads: int, rng: random.Random) -> dict:
    """One session's greedy decode by this engine and by llama.cpp on the same random
    weights (a checkpoint of the tiny model's shape that llama.cpp's converter reads, as
    an f32 GGUF), at the same thread count; and llama.cpp's sequence copy + removal of a
    syscall_len-token sequence, the counterpart of fork + close. {"missing": why} when
    llama.cpp is not installed."""
    import os
    import subprocess
    import sys
    import tempfile

    from agentos import AsyncEngine
    from agentos.bench import llamacpp

    reason = llamacpp.missing()
    if reason is not None:
        return {"missing": reason}
    with tempfile.TemporaryDirectory(prefix="agentos-llamacpp-") as tmp:
        # NOTE: written by a child process: torch work in this thread would leave it a
        # thread team of its own beside the engine's, and with libgomp every parallel op
        # of the engine then pays a sleep/wake handoff (2x slower decode on 2 cores)
        folder = os.path.join(tmp, "hf")
        subprocess.run([sys.executable, "-c", "import sys; from agentos.bench.llamacpp import "
                        "make_checkpoint; make_checkpoint(sys.argv[1], seed=int(sys.argv[2]))",
                        folder, str(bench.seed)], check=True, capture_output=True)
        gguf = await asyncio.to_thread(llamacpp.to_gguf, folder, os.path.join(tmp, "m.gguf"))
        prompt = random_prompt(bench.prompt_len, llamacpp.TINY_SHAPE["vocab_size"], llamacpp.BOS,
                               rng)
        # NOTE: the two sides take turns, one run each (llama.cpp's in a fresh child with its
        # own warm-up), so a drift of the machine's speed over the minute reaches both
        ours_runs, theirs_runs = [], []
        async with AsyncEngine(model=folder, device="cpu", dtype="float32",
                               block_size=bench.block_size) as engine:
            await _ours(engine, [prompt], 4)  # warm-up
            for _ in range(bench.repeats):
                ours_runs.append(await _timed_decode(engine, bench, [prompt]))
                theirs_runs.append(await asyncio.to_thread(
                    llamacpp.decode, gguf, prompt, bench.new_tokens, 1, threads))
            turn = await _turns(engine, bench, gguf, threads, rng)
        seq_us = await asyncio.to_thread(llamacpp.seq_copy_us, gguf, bench.syscall_len,
                                         bench.op_repeats)
    ours_tok_s = statistics.median(r["tok_s"] for r in ours_runs)
    theirs_tok_s = statistics.median(r["tok_s"] for r in theirs_runs)
    return {"ours_tok_s": ours_tok_s, "llama_cpp_tok_s": theirs_tok_s,
            "ratio": ratio(ours_tok_s, theirs_tok_s),
            "ratios": [ratio(a["tok_s"], b["tok_s"]) for a, b in zip(ours_runs, theirs_runs)],
            "tokens_equal": all(a["tokens"] == b["tokens"][1:]
                                for a, b in zip(ours_runs, theirs_runs)),
            "threads": threads, "seq_copy_us": seq_us, "session_tokens": bench.syscall_len,
            "turn": turn}


async def _turns(engine, bench: OverheadBench, gguf: str, threads: int,
                 rng: random.Random) -> dict:
    """An agent's turn after a context of turn_context tokens (and one generated):
    turn_tokens fresh tokens appended (a tool output) and one token generated, by this
    engine (one greedy generate of 1 with the chunk as its `append`, then a rollback to the
    context, untimed) and by llama.cpp (one evaluation of the chunk, its cells removed
    after); 5 fresh chunks
    a side, the same ones, so no chunk is ever in a prefix cache."""
    from agentos.bench import llamacpp

    vocab = llamacpp.TINY_SHAPE["vocab_size"]
    context = random_prompt(bench.turn_context, vocab, llamacpp.BOS, rng)
    chunks = [[rng.randrange(3, vocab) for _ in range(bench.turn_tokens)] for _ in range(6)]
    s = await engine.create_session(tokens=context)
    # NOTE: the context computed before the snapshot (else every rollback drops its KV);
    # the token this adds is llama.cpp's context too
    context += (await s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)).tokens
    base = await s.snapshot()
    ours, tokens = [], []
    for i, chunk in enumerate(chunks):  # the first is a warm-up
        t0 = time.perf_counter()
        g = await s.generate(max_tokens=1, temperature=0.0, ignore_eos=True, append=chunk)
        if i:
            ours.append(time.perf_counter() - t0)
            tokens.append(g.tokens[0])
        await s.rollback(base)
    await s.close()
    await base.delete()
    theirs = await asyncio.to_thread(llamacpp.append_turn, gguf, context, chunks[1:], threads)
    ours_ms, theirs_ms = 1e3 * statistics.median(ours), 1e3 * statistics.median(theirs["s"])
    return {"context": bench.turn_context, "tokens": bench.turn_tokens, "ours_ms": ours_ms,
            "llama_cpp_ms": theirs_ms, "ratio": ratio(theirs_ms, ours_ms),
            "tokens_equal": tokens == theirs["tokens"]}


def _counters(kernel) -> dict:
    """The step counters and the time, read in the loop thread between two steps."""
    st, ph = kernel.stats, kernel.runner.phase_s
    return {"t": time.perf_counter(), "steps": st["steps"], "step": st["step_time_s"],
            "schedule": st["sched_s"], **ph}


async def _timed_decode(engine, bench: OverheadBench, prompts: list[list[int]]) -> dict:
    """Per-step seconds of each phase over new_tokens - 1 decode steps of the prompts'
    sessions (prefilled and one token sampled first), and their tokens."""
    kernel = engine.kernel
    sessions = [s for s, _ in await _ours(engine, prompts, 1, close=False)]
    # NOTE: read between steps, in the loop thread: a caller woken by a step's tokens would
    # read them while that step's bookkeeping still runs
    before = await on_engine_thread(engine, _counters, kernel)
    gens = await asyncio.gather(*(s.generate(max_tokens=bench.new_tokens - 1, temperature=0.0,
                                             ignore_eos=True) for s in sessions))
    after = await on_engine_thread(engine, _counters, kernel)
    await asyncio.gather(*(s.close() for s in sessions))
    d = {k: after[k] - before[k] for k in after}
    wall = d["t"]
    n = max(1, d["steps"])
    per = {"sessions": len(prompts), "steps": d["steps"], "wall": wall / n, "step": d["step"] / n,
           "schedule": d["schedule"] / n, "prepare": d["prepare"] / n, "forward": d["forward"] / n,
           "sample": d["sample"] / n,
           "bookkeeping": (d["step"] - d["schedule"] - d["prepare"] - d["forward"] - d["sample"]) / n,
           "between": (wall - d["step"]) / n}
    per["host_overhead"] = per["wall"] - per["forward"]
    per["tok_s"] = len(prompts) * (bench.new_tokens - 1) / wall
    per["prompt"], per["tokens"] = prompts[0], gens[0].tokens  # the first session's
    return per


async def _decode_case(engine, bench: OverheadBench, new_prompts) -> dict:
    """The run of median wall time per step, whole (its phases add up), of `repeats`."""
    runs = [await _timed_decode(engine, bench, new_prompts()) for _ in range(bench.repeats)]
    runs.sort(key=lambda r: r["wall"])
    return {"runs": len(runs), **runs[len(runs) // 2]}


async def _idle_case(engine, bench: OverheadBench, prompts) -> dict:
    """One session's decode alone and beside bench.idle idle (prefilled) sessions,
    alternating; medians of wall time per step."""
    alone, beside = [], []
    idle: list = []
    for _ in range(bench.repeats):
        alone.append((await _timed_decode(engine, bench, prompts(1)))["wall"])
        if not idle:
            created = await asyncio.gather(*(engine.create_session(tokens=p)
                                             for p in prompts(bench.idle, 8)))
            idle = list(created)
            while engine.kernel.policy.has_work():  # their prompts' prefills: then they sleep
                await asyncio.sleep(0.01)
        beside.append((await _timed_decode(engine, bench, prompts(1)))["wall"])
    for i in range(0, len(idle), 256):
        await asyncio.gather(*(s.close() for s in idle[i:i + 256]))
    a, b = median(alone), median(beside)
    return {"idle_sessions": bench.idle, "alone_s": a, "beside_s": b, "ratio": b / a}


async def _syscalls(engine, bench: OverheadBench, prompt: list[int]) -> dict:
    """Median microseconds of each syscall from the caller, by the direct path and by the
    queue, and of its work alone in the loop thread."""
    kernel = engine.kernel
    s = await engine.create_session(tokens=prompt)
    await s.generate(max_tokens=1, temperature=0.0)
    snap = await s.snapshot()
    pid, sid = s.id, snap.id
    k, snaps = kernel, engine.snapshots

    def fork_close():
        (c,) = k.sys_fork(pid, 1)
        k.sys_close(c)

    work = {"fork + close": fork_close, "snapshot": lambda: snaps.sys_delete(snaps.sys_snapshot(pid)["id"]),
            "rollback": lambda: snaps.sys_rollback(pid, sid), "info": lambda: k.sys_info(pid)}

    async def direct_fork_close():
        (c,) = await s.fork(1)
        await c.close()

    async def direct_snapshot():
        await (await s.snapshot()).delete()

    direct = {"fork + close": direct_fork_close, "snapshot": direct_snapshot,
              "rollback": lambda: s.rollback(snap), "info": s.info}
    out = {}
    for name in work:
        fn = work[name]
        d = [await _timed_async(direct[name]) for _ in range(bench.op_repeats)]
        q = [await _timed_async(lambda f=fn: asyncio.wrap_future(kernel.call(f)))
             for _ in range(bench.op_repeats)]
        w = await on_engine_thread(engine, _timed_here, fn, bench.op_repeats)
        out[name] = {"direct_us": 1e6 * statistics.median(d), "queued_us": 1e6 * statistics.median(q),
                     "work_us": 1e6 * w, "handoff_us": 1e6 * (statistics.median(q) - w)}
    await snap.delete()
    await s.close()
    return {"session_tokens": len(prompt), "ops": out}


async def _timed_async(make) -> float:
    t0 = time.perf_counter()
    await make()
    return time.perf_counter() - t0


def _timed_here(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hf_decode(net, bench: OverheadBench, prompt: list[int]) -> dict:
    """transformers' greedy decode of one session: (generate(n) - generate(1)) / (n - 1)
    per token, medians of `repeats` runs; and its tokens."""
    import torch

    device = bench.device

    def gen(n: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=device)
            t0 = time.perf_counter()
            out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               **hf_greedy_kwargs(net))
            sync(device)
            return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()

    gen(2)  # warm-up
    per_token, tokens = [], []
    for _ in range(bench.repeats):
        one, _ = gen(1)
        full, tokens = gen(bench.new_tokens)
        per_token.append((full - one) / (bench.new_tokens - 1))
    return {"step": median(per_token), "tok_s": 1 / median(per_token), "tokens": tokens}


def _summarize(bench: OverheadBench, dtype: str, threads: int, cases: list[dict],
               idle: dict | None, syscalls: dict, peer: dict | None,
               llama: dict | None = None) -> dict:
    checks = []
    if llama is not None and "missing" not in llama:
        checks.append(check("one session's decode tokens/s >= llama.cpp's (same weights, f32)",
                            llama["ratio"] >= 1.0,
                            f"{llama['ours_tok_s']:.0f} vs {llama['llama_cpp_tok_s']:.0f} tok/s "
                            f"({llama['ratio']:.2f}x, {llama['threads']} threads); greedy tokens "
                            f"{'equal' if llama['tokens_equal'] else 'differ'}"))
    single = next((c for c in cases if c["sessions"] == 1), None)
    if single is not None and bench.model == "tiny":
        checks.append(check("host overhead per decode step of one session <= 1 ms (tiny)",
                            single["host_overhead"] <= HOST_TARGET_S,
                            f"{1e3 * single['host_overhead']:.3f} ms of {1e3 * single['wall']:.3f} "
                            f"ms per step"))
    if peer is not None and single is not None:
        # ours decodes new_tokens - 1 tokens after the first; HF's are all new_tokens
        same = single["tokens"] == peer["tokens"][1:]
        checks.append(check("one session's decode tokens/s >= transformers'",
                            single["tok_s"] >= peer["tok_s"],
                            f"{single['tok_s']:.0f} vs {peer['tok_s']:.0f} tok/s "
                            f"({ratio(single['tok_s'], peer['tok_s']):.2f}x); greedy tokens "
                            f"{'equal' if same else 'differ'}"))
    if idle is not None:
        checks.append(check(f"decode beside {idle['idle_sessions']} idle sessions within "
                            f"{IDLE_TARGET}x of decode alone", idle["ratio"] <= IDLE_TARGET,
                            f"{1e3 * idle['beside_s']:.3f} vs {1e3 * idle['alone_s']:.3f} ms per "
                            f"step ({idle['ratio']:.2f}x)"))
    if syscalls["session_tokens"] == 512:
        for name in ("fork + close", "rollback"):
            op = syscalls["ops"][name]
            limit = SYSCALL_TARGET_S * (2 if name == "fork + close" else 1)
            checks.append(check(f"{name} at 512 tokens from the caller <= {1e6 * limit:.0f} us",
                                op["direct_us"] <= 1e6 * limit,
                                f"{op['direct_us']:.0f} us (queued {op['queued_us']:.0f} us)"))
    return {"bench": "overhead", "config": {**asdict(bench), "dtype": dtype, "threads": threads},
            "decode": cases, "idle": idle, "syscalls": syscalls, "peer": peer,
            "llama_cpp": llama, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def render(result: dict, console=None) -> None:
    """Prints the breakdown tables and one PASS/FAIL line per target."""
    console = console or new_console()
    cfg = result["config"]
    rows = [[c["sessions"], 1e3 * c["wall"], *(1e3 * c[p] for p in PHASES),
             1e3 * c["host_overhead"], c["tok_s"]] for c in result["decode"]]
    peer = result["peer"]
    if peer is not None:
        rows.append(["HF generate, 1", 1e3 * peer["step"], *["-"] * len(PHASES), "-", peer["tok_s"]])
    print_table(f"agentos bench overhead: a decode step, ms ({cfg['model']}, {cfg['device']}, "
                f"{cfg['dtype']}, {cfg['prompt_len']}-token prompts, {cfg['threads']} threads)",
                ["sessions", "wall", *PHASES, "host overhead", "tok/s"], rows, console)
    idle = result["idle"]
    if idle is not None:
        console.print(f"beside {idle['idle_sessions']} idle sessions: {1e3 * idle['beside_s']:.3f} "
                      f"ms per step vs {1e3 * idle['alone_s']:.3f} alone ({idle['ratio']:.2f}x)")
    llama = result.get("llama_cpp")
    if llama is not None and "missing" in llama:
        console.print(f"llama.cpp peer skipped: {llama['missing']}")
    elif llama is not None:
        console.print(f"one session, same random weights ({llama['threads']} threads): "
                      f"{llama['ours_tok_s']:.0f} tok/s vs llama.cpp {llama['llama_cpp_tok_s']:.0f} "
                      f"({llama['ratio']:.2f}x; run by run, taking turns: "
                      f"{', '.join(f'{r:.2f}x' for r in llama['ratios'])}); "
                      f"llama.cpp copies a {llama['session_tokens']}-token "
                      f"sequence and removes it in {llama['seq_copy_us']:.1f} us")
        turn = llama["turn"]
        console.print(f"an agent's turn, {turn['tokens']} tokens appended after "
                      f"{turn['context']} and one generated: {turn['ours_ms']:.2f} ms vs "
                      f"llama.cpp {turn['llama_cpp_ms']:.2f} ({turn['ratio']:.2f}x, medians of "
                      f"5); first tokens {'equal' if turn['tokens_equal'] else 'differ'}")
    sc = result["syscalls"]
    print_table(f"syscalls on a {sc['session_tokens']}-token session, us (medians)",
                ["op", "direct", "queued", "work", "handoff"],
                [[name, op["direct_us"], op["queued_us"], op["work_us"], op["handoff_us"]]
                 for name, op in sc["ops"].items()], console)
    print_checks(result["checks"], console)
