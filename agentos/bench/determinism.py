"""`agentos bench determinism`: what batch invariance costs, and that it holds.

A seeded workload of `sessions` concurrent sessions (random prompts of `min_prompt` to
`max_prompt` tokens, each generating `new_tokens` tokens at temperature 1 with its own
seed) runs on fresh engines with `deterministic=False` and `deterministic=True`, the two
modes alternating over `repeats` runs. Each run is timed wall clock from the first
generate call to the last token; tokens/s = generated tokens / seconds; the overhead is
the ratio of the medians.

The checks: in deterministic mode, the first session generated alone and inside the
batch gives the same tokens and bit-identical logprobs, and two runs of the whole batch
agree bit for bit. The same comparison in the default mode is reported (its logprobs
usually differ in the last bits: batched kernels sum in a different order).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

from agentos.bench.common import check, median, new_console, print_checks, print_table, ratio, set_threads


@dataclass(slots=True)
class DeterminismBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None
    sessions: int = 32  # concurrent sessions
    min_prompt: int = 32
    max_prompt: int = 512
    new_tokens: int = 64  # tokens each session generates (end of sequence ignored)
    repeats: int = 3  # runs per mode (medians)
    max_batch_tokens: int = 512  # the step's token budget: prefills are chunked under load
    block_size: int = 16
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if min(self.sessions, self.min_prompt, self.new_tokens, self.repeats) < 1:
            raise ValueError("sessions, min_prompt, new_tokens and repeats must be >= 1")
        if self.max_prompt < self.min_prompt:
            raise ValueError("max_prompt must be >= min_prompt")


def _workload(b: DeterminismBench) -> list[list[int]]:
    # ids below 256: bytes for `tiny`, ordinary ids in any HF vocabulary
    rng = random.Random(b.seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(b.min_prompt, b.max_prompt))]
            for _ in range(b.sessions)]


async def _run(b: DeterminismBench, deterministic: bool, prompts: list[list[int]]):
    """Generates for every prompt concurrently on a fresh engine; returns (Generations,
    seconds)."""
    from agentos import AsyncEngine, SamplingParams

    kv = sum(len(p) + b.new_tokens for p in prompts) // b.block_size + 4 * len(prompts) + 64
    async with AsyncEngine(b.model, device=b.device, dtype=b.dtype, kv_blocks=kv,
                           block_size=b.block_size, host_blocks=0,
                           max_batch_tokens=b.max_batch_tokens, deterministic=deterministic) as e:
        sessions = [await e.create_session(tokens=p) for p in prompts]
        t0 = time.perf_counter()
        gens = await asyncio.gather(*(
            s.generate(params=SamplingParams(max_tokens=b.new_tokens, temperature=1.0,
                                             seed=b.seed + i, ignore_eos=True))
            for i, s in enumerate(sessions)))
        return gens, time.perf_counter() - t0


def run(b: DeterminismBench) -> dict:
    threads = set_threads(b.threads)
    prompts = _workload(b)
    times: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, list] = {False: [], True: []}
    for _ in range(b.repeats):
        for det in (False, True):
            gens, secs = asyncio.run(_run(b, det, prompts))
            times[det].append(secs)
            outs[det].append(gens)
    alone = {det: asyncio.run(_run(b, det, prompts[:1]))[0][0] for det in (False, True)}
    tokens = b.sessions * b.new_tokens
    modes = {}
    for det in (False, True):
        batch = outs[det][0][0]
        modes["deterministic" if det else "default"] = {
            "runs_s": times[det], "median_s": median(times[det]),
            "tok_s": tokens / median(times[det]),
            "alone_equals_batch_tokens": alone[det].tokens == batch.tokens,
            "alone_equals_batch_logprobs": alone[det].logprobs == batch.logprobs,
            "alone_vs_batch_max_logprob_diff": max(abs(x - y) for x, y in
                                                   zip(alone[det].logprobs, batch.logprobs)),
            "runs_identical": all([(g.tokens, g.logprobs) for g in r] ==
                                  [(g.tokens, g.logprobs) for g in outs[det][0]] for r in outs[det]),
        }
    det, plain = modes["deterministic"], modes["default"]
    overhead = ratio(det["median_s"], plain["median_s"])
    checks = [
        check("deterministic: alone == inside the batch (tokens, logprobs bit for bit)",
              det["alone_equals_batch_tokens"] and det["alone_equals_batch_logprobs"],
              f"max logprob difference {det['alone_vs_batch_max_logprob_diff']:.1e}"),
        check("deterministic: repeated batch runs identical", det["runs_identical"],
              f"{b.repeats} runs"),
    ]
    return {"bench": "determinism", "config": {**asdict(b), "threads": threads}, "modes": modes,
            "overhead": overhead, "checks": checks, "passed": all(c["passed"] for c in checks)}


def render(result: dict) -> None:
    console = new_console()
    rows = [[name, m["median_s"], m["tok_s"], m["alone_equals_batch_tokens"],
             m["alone_equals_batch_logprobs"], m["alone_vs_batch_max_logprob_diff"], m["runs_identical"]]
            for name, m in result["modes"].items()]
    c = result["config"]
    print_table(f"{c['sessions']} sessions x {c['new_tokens']} tokens, temperature 1, seeded",
                ["mode", "median s", "tok/s", "alone==batch tokens", "logprobs bitwise",
                 "max lp diff", "runs identical"], rows, console)
    console.print(f"deterministic mode costs {result['overhead']:.2f}x the default's time "
                  "(median of runs)")
    print_checks(result["checks"], console)
