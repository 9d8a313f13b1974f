"""`agentos bench rl`: GRPO-shaped multi-turn rollouts, the way remote-engine RL clients
(verl's agent loop, SkyRL) drive a server: every turn sends the whole history as token
ids to `/inference/v1/generate`, then a tool answers after a pause.

G groups of n trajectories (each group: one prompt, n samples), T turns each: generate
up to M tokens, append a tool result of K tokens after a pause of P ms, go on. The same
workload runs against `agentos serve` twice in one run: as it is, and with the prefix
cache off (`--no-prefix-cache`), where every turn recomputes its whole history and the n
samples of a group share nothing: the peer is AgentOS without forking and continuation.
The report: rollout tokens/s (sampled tokens over the wall time of a rollout step), the
trainer-visible latency (the wall time of a rollout step: every group done), the
positions the engine prefilled (computed before a sampled token), and the ratios.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass

from agentos.bench.api import run_server
from agentos.bench.common import check, new_console, print_checks, print_table, ratio


@dataclass(slots=True)
class RLBench:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    groups: int = 4  # G
    samples: int = 8  # n per group
    turns: int = 3  # T
    prompt_len: int = 256
    max_tokens: int = 16  # M per turn
    tool_tokens: int = 24  # K
    tool_pause_ms: float = 50.0  # P
    steps: int = 2  # rollout steps per configuration (the median is reported)
    kv_blocks: int = 4096
    seed: int = 0
    startup_timeout_s: float = 120.0

    def __post_init__(self):
        if min(self.groups, self.samples, self.turns, self.prompt_len, self.max_tokens,
               self.steps) < 1 or self.tool_tokens < 0 or self.tool_pause_ms < 0:
            raise ValueError("groups, samples, turns, prompt_len, max_tokens and steps must "
                             "be >= 1; tool_tokens and tool_pause_ms >= 0")


def run(bench: RLBench) -> dict:
    """Runs both configurations; returns JSON-ready results (see `render`)."""
    results = {}
    for name, flags in (("agentos", []), ("no prefix cache", ["--no-prefix-cache"])):
        args = ["--model", bench.model, "--device", bench.device, "--kv-blocks",
                str(bench.kv_blocks), "--log-level", "error", *flags]
        if bench.dtype is not None:
            args += ["--dtype", bench.dtype]
        with run_server(args, None, None, bench.startup_timeout_s) as url:
            asyncio.run(_step(url, bench, -1))  # warm-up: first steps, code paths
            steps = [asyncio.run(_step(url, bench, k)) for k in range(bench.steps)]
        results[name] = {"wall_s": statistics.median(s["wall_s"] for s in steps),
                         "tokens": steps[0]["tokens"],
                         "computed": statistics.median(s["computed"] for s in steps),
                         "turn_p50_s": statistics.median(s["turn_p50_s"] for s in steps)}
        r = results[name]
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    ours, peer = results["agentos"], results["no prefix cache"]
    speedup = ratio(ours["tokens_per_s"], peer["tokens_per_s"])
    latency = ratio(ours["wall_s"], peer["wall_s"])
    computed = ratio(ours["computed"], peer["computed"])
    checks = [check("fewer positions prefilled than without the prefix cache",
                    ours["computed"] < peer["computed"], f"{computed:.2f}x")]
    return {"bench": "rl", "config": asdict(bench), "results": results,
            "tokens_per_s_ratio": speedup, "latency_ratio": latency, "computed_ratio": computed,
            "checks": checks, "passed": all(c["passed"] for c in checks)}


async def _step(url: str, bench: RLBench, step: int) -> dict:
    """One rollout step (new prompts each): every trajectory of every group, concurrently."""
    import httpx

    rng = random.Random(f"{bench.seed}/{step}")
    prompts = [[rng.randrange(3, 250) for _ in range(bench.prompt_len)] for _ in range(bench.groups)]
    turn_s: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600.0, trust_env=False,
                                 limits=httpx.Limits(max_connections=None)) as client:
        before = (await client.get("/v1/system")).json()["stats"]["tokens_prefilled"]
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(
            _trajectory(client, bench, prompts[g], (step + 1) * 10_000 + g * bench.samples + i,
                        turn_s)
            for g in range(bench.groups) for i in range(bench.samples)))
        wall = time.perf_counter() - t0
        after = (await client.get("/v1/system")).json()["stats"]["tokens_prefilled"]
    return {"wall_s": wall, "tokens": sum(outs), "computed": after - before,
            "turn_p50_s": statistics.median(turn_s)}


async def _trajectory(client, bench: RLBench, prompt: list[int], seed: int,
                      turn_s: list[float]) -> int:
    rng = random.Random(seed)
    history, sampled = list(prompt), 0
    seed %= 2**31
    for turn in range(bench.turns):
        t0 = time.perf_counter()
        r = await client.post("/inference/v1/generate", json={
            "token_ids": history, "sampling_params": {
                "max_tokens": bench.max_tokens, "temperature": 1.0, "ignore_eos": True,
                "seed": seed * 1000 + turn, "logprobs": 1}})
        r.raise_for_status()
        turn_s.append(time.perf_counter() - t0)
        out = r.json()["choices"][0]["token_ids"]
        sampled += len(out)
        history += out
        if turn + 1 < bench.turns:
            await asyncio.sleep(bench.tool_pause_ms / 1000)  # the tool runs
            history += [rng.randrange(3, 250) for _ in range(bench.tool_tokens)]
    return sampled


def render(result: dict) -> None:
    console = new_console()
    rows = [(name, r["tokens"], r["wall_s"], r["tokens_per_s"], r["turn_p50_s"], r["computed"])
            for name, r in result["results"].items()]
    print_table("Rollout step (median of steps)", ("server", "sampled tokens", "step s",
                                                   "tokens/s", "turn p50 s", "prefilled"),
                rows, console)
    print_table("AgentOS over the peer", ("ratio", "value"), [
        ("rollout tokens/s", result["tokens_per_s_ratio"]),
        ("trainer-visible latency (step wall time)", result["latency_ratio"]),
        ("positions prefilled", result["computed_ratio"])], console)
    print_checks(result["checks"], console)
