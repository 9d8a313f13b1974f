"""`agentos bench decode`: generation throughput against transformers' `generate`.

Two cases: a batch (many concurrent sessions, driven with AsyncEngine and asyncio.gather
so their steps batch) against `model.generate` at the same batch size, and one session
against batch 1. Both sides start from token ids and are timed wall clock from the
request to the last token, prefill included: tokens/s = generated tokens / seconds. Runs
alternate between the two sides so background load hits both alike. Greedy decoding on
identical weights must give identical tokens; the agreement is reported.

Each repeat also times a one-token run of each side on fresh prompts: its time is the
batch's prefill (the time to its first tokens), and the rest of the full run's time is its
decode steps, reported as tokens/s of their own: sessions * (new_tokens - 1) / (median
full run - median one-token run). So the table shows which phase a ratio comes from.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

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


@dataclass(slots=True)
class DecodeBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    repeats: int = 3  # timed runs per side and case
    sessions: int = 32  # sessions of the batch case (and HF batch size)
    prompt_len: int = 128  # tokens per prompt
    new_tokens: int = 64  # tokens generated per session
    single: bool = True  # also run the one-session case
    peer: bool = True  # also measure transformers
    block_size: int = 16
    max_batch_tokens: int = 2048
    seed: int = 0  # seeds the random prompts
    threads: int | None = None  # torch intra-op threads; None: torch's default
    cuda_graphs: bool = True  # decode steps replay captured CUDA graphs (CUDA only)

    def __post_init__(self):
        if self.sessions < 1 or self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise ValueError("sessions, prompt_len, new_tokens and repeats must be >= 1")


def run(bench: DecodeBench) -> dict:
    """Runs the benchmark; returns the JSON-ready results (see `render`)."""
    return asyncio.run(_run(bench))


async def _run(bench: DecodeBench) -> dict:
    from agentos import AsyncEngine

    threads = set_threads(bench.threads)
    per_session = -(-(bench.prompt_len + bench.new_tokens) // bench.block_size) + 1
    kv_blocks = bench.sessions * per_session + 64
    cases = [("batch", bench.sessions)] + ([("single", 1)] if bench.single else [])
    async with AsyncEngine(model=bench.model, device=bench.device, dtype=bench.dtype,
                           block_size=bench.block_size, kv_blocks=kv_blocks,
                           max_batch_tokens=bench.max_batch_tokens,
                           cuda_graphs=bench.cuda_graphs) as engine:
        kernel = engine.kernel
        if bench.prompt_len + bench.new_tokens > kernel.max_model_len:
            raise ValueError(f"prompt_len + new_tokens exceed the model's context "
                             f"({kernel.max_model_len})")
        dtype = kernel.dtype
        rng = random.Random(bench.seed)

        def new_prompts(n: int) -> list[list[int]]:
            # NOTE: fresh prompts for every run, so no side reuses a cached prefix
            return [random_prompt(bench.prompt_len, kernel.vocab_size,
                                  kernel.model_config.bos_token_id, rng) for _ in range(n)]

        # the peer runs on the engine's thread: one OpenMP pool (see on_engine_thread)
        net = await on_engine_thread(engine, load_peer, bench.model, bench.device,
                                     dtype) if bench.peer else None
        results = []
        with progress(len(cases) * bench.repeats, "decode runs") as advance:
            for name, num_sessions in cases:
                # warm-up: both sides once at this batch size (a few tokens touch every path)
                warm = new_prompts(num_sessions)
                await _ours(engine, warm, min(bench.new_tokens, 4))
                if net is not None:
                    await on_engine_thread(engine, _hf, net, warm, min(bench.new_tokens, 4),
                                           bench.device)
                ours_s, hf_s, ours_tokens, hf_tokens = [], [], [], []  # tokens: all runs' rows
                firsts: dict[str, list[float]] = {"ours": [], "hf": []}  # one-token runs
                for _ in range(bench.repeats):
                    batch = new_prompts(num_sessions)
                    tokens, t = await _timed_ours(engine, batch, bench.new_tokens)
                    ours_s.append(t)
                    ours_tokens += tokens
                    if net is not None:
                        tokens, t = await _timed_hf(engine, net, batch, bench)
                        hf_s.append(t)
                        hf_tokens += tokens
                    if bench.new_tokens > 1:
                        batch = new_prompts(num_sessions)
                        firsts["ours"].append((await _timed_ours(engine, batch, 1))[1])
                        if net is not None:
                            firsts["hf"].append((await _timed_hf(engine, net, batch, bench,
                                                                 1))[1])
                    advance()
                results.append(_case(name, num_sessions, bench, ours_s, hf_s, ours_tokens,
                                     hf_tokens if net is not None else None, firsts))
    return _summarize(bench, dtype, threads, results)


async def _timed_ours(engine, prompts: list[list[int]], new_tokens: int):
    """Returns (each session's new tokens, wall seconds from the creates to the last token)."""
    t0 = time.perf_counter()
    gens = await _ours(engine, prompts, new_tokens, close=False)
    seconds = time.perf_counter() - t0
    await asyncio.gather(*(s.close() for s, _ in gens))
    return [g.tokens for _, g in gens], seconds


async def _ours(engine, prompts: list[list[int]], new_tokens: int, close: bool = True):
    """Creates a session per prompt and generates greedily in all of them at once.
    Returns [(session, generation)]; closes the sessions when `close`."""
    sessions = await asyncio.gather(*(engine.create_session(tokens=p) for p in prompts))
    gens = await asyncio.gather(*(
        s.generate(max_tokens=new_tokens, temperature=0.0, ignore_eos=True) for s in sessions))
    if close:
        await asyncio.gather(*(s.close() for s in sessions))
    return list(zip(sessions, gens))


async def _timed_hf(engine, net, prompts: list[list[int]], bench: DecodeBench,
                    new_tokens: int | None = None):
    """_hf on the engine's thread: (each row's new tokens, wall seconds)."""
    t0 = time.perf_counter()
    tokens = await on_engine_thread(engine, _hf, net, prompts, new_tokens or bench.new_tokens,
                                    bench.device)
    return tokens, time.perf_counter() - t0


def _hf(net, prompts: list[list[int]], new_tokens: int, device: str) -> list[list[int]]:
    """transformers' greedy generate on the batch; returns the new tokens of each row."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor(prompts, device=device)
        out = net.generate(ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=new_tokens, **hf_greedy_kwargs(net))
        sync(device)
        return out[:, ids.shape[1]:].tolist()


def _case(name: str, num_sessions: int, bench: DecodeBench, ours_s: list[float],
          hf_s: list[float], ours_tokens: list[list[int]],
          hf_tokens: list[list[int]] | None, firsts: dict[str, list[float]]) -> dict:
    """One case's record: medians as tokens/s, the prefill / decode split, and greedy
    agreement over every run's rows."""
    generated = num_sessions * bench.new_tokens
    ours_tps = generated / median(ours_s)
    hf_tps = generated / median(hf_s) if hf_s else float("nan")
    case = {"name": name, "sessions": num_sessions, "prompt_len": bench.prompt_len,
            "new_tokens": bench.new_tokens, "ours_tok_s": ours_tps, "hf_tok_s": hf_tps,
            "ratio": ratio(ours_tps, hf_tps), "ours_runs_s": ours_s, "hf_runs_s": hf_s,
            "ours_first_runs_s": firsts["ours"], "hf_first_runs_s": firsts["hf"],
            **_split(num_sessions, bench.new_tokens, ours_s, hf_s, firsts),
            "agreement": None, "identical_sequences": None, "compared_sequences": None,
            "first_mismatch": None}
    if hf_tokens is not None:
        pairs = list(zip(ours_tokens, hf_tokens))
        same = sum(a == b for x, y in pairs for a, b in zip(x, y))
        case["agreement"] = same / sum(len(y) for _, y in pairs)
        case["identical_sequences"] = sum(x == y for x, y in pairs)
        case["compared_sequences"] = len(pairs)
        for row, (x, y) in enumerate(pairs):
            pos = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
            if pos is not None:
                case["first_mismatch"] = {"row": row, "position": pos, "ours": x[pos],
                                          "hf": y[pos]}
                break
    return case


def _split(num_sessions: int, new_tokens: int, ours_s: list[float], hf_s: list[float],
           firsts: dict[str, list[float]]) -> dict:
    """The prefill seconds (median one-token run) of each side, their ratio (HF / ours:
    above 1 when ours is faster), and the decode steps' tokens/s and ratio; NaN where a
    side or the one-token runs are missing."""
    nan = float("nan")
    out = {"ours_prefill_s": nan, "hf_prefill_s": nan, "prefill_ratio": nan,
           "ours_decode_tok_s": nan, "hf_decode_tok_s": nan, "decode_ratio": nan}
    decoded = num_sessions * (new_tokens - 1)
    for side, full in (("ours", ours_s), ("hf", hf_s)):
        if firsts[side] and full:
            first = median(firsts[side])
            out[f"{side}_prefill_s"] = first
            rest = median(full) - first
            out[f"{side}_decode_tok_s"] = decoded / rest if rest > 0 else nan
    out["prefill_ratio"] = ratio(out["hf_prefill_s"], out["ours_prefill_s"])
    out["decode_ratio"] = ratio(out["ours_decode_tok_s"], out["hf_decode_tok_s"])
    return out


def _summarize(bench: DecodeBench, dtype, threads: int, cases: list[dict]) -> dict:
    checks = []
    for c in cases:
        if c["hf_runs_s"]:
            checks.append(check(
                f"{c['name']} ({c['sessions']} sessions) tokens/s >= HF generate",
                c["ratio"] >= 1.0, f"{c['ours_tok_s']:.0f} vs {c['hf_tok_s']:.0f} tok/s "
                f"({c['ratio']:.2f}x)"))
            checks.append(check(
                f"{c['name']} greedy tokens equal HF's", c["agreement"] == 1.0,
                f"{100 * c['agreement']:.1f}% of tokens, {c['identical_sequences']}/"
                f"{c['compared_sequences']} sequences identical (all runs)"))
    return {"bench": "decode", "config": {**asdict(bench), "dtype": dtype_name(dtype),
                                            "threads": threads},
            "cases": cases, "checks": checks, "passed": all(c["passed"] for c in checks)}


def render(result: dict, console=None) -> None:
    """Prints the results as a rich table plus one PASS/FAIL line per target."""
    console = console or new_console()
    cfg = result["config"]
    rows = [[c["name"], c["sessions"], c["ours_tok_s"], c["hf_tok_s"], c["ratio"],
             c.get("prefill_ratio", float("nan")), c.get("decode_ratio", float("nan")),
             "-" if c["agreement"] is None else f"{100 * c['agreement']:.1f}%"]
            for c in result["cases"]]
    print_table(f"greedy decode, {cfg['prompt_len']}-token prompts, {cfg['new_tokens']} new "
                f"tokens each, median of {cfg['repeats']}; model {cfg['model']}, "
                f"{cfg['device']}, {cfg['dtype']}, {cfg['threads']} threads; the ratio "
                "split into the prefill (one-token runs) and the decode steps after it",
                ["case", "sessions", "ours tok/s", "HF tok/s", "ours / HF", "prefill",
                 "decode steps", "same tokens"], rows, console)
    for c in result["cases"]:
        if c["first_mismatch"] is not None:
            m = c["first_mismatch"]
            console.print(f"{c['name']}: first mismatch in row {m['row']} at token "
                          f"{m['position']}: ours {m['ours']}, HF {m['hf']}")
    print_checks(result["checks"], console)
