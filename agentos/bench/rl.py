"""`agentos bench rl`: GRPO-shaped multi-turn rollouts, the way RL frameworks' agent loops
drive their engines: every turn sends the whole history as token ids, then a tool
answers after a pause. `--client http` (default) posts the turns to `agentos serve`'s
`/inference/v1/generate` (SkyRL's remote-engine path); `--client verl` sends them
through verl's own LLMServerClient and load balancer to AgentOS replicas on Ray (verl's
agent-loop path; needs `agentos[verl]`).

G groups of n trajectories (each group: one prompt, n samples), T turns each: generate
up to M tokens, append a tool result of K tokens after a pause of P ms, go on. The same
workload runs twice in one run: against AgentOS as it is, and with the prefix cache off
(`--no-prefix-cache`), where every turn recomputes its whole history and the n
samples of a group share nothing: the peer is AgentOS without forking and continuation.
The report: rollout tokens/s (sampled tokens over the wall time of a rollout step), the
trainer-visible latency (the wall time of a rollout step: every group done), the
positions the engine prefilled (computed before a sampled token), and the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    client: str = "http"  # "http": /inference/v1/generate; "verl": verl's LLMServerClient
    replicas: int = 2  # verl: AgentOS replicas (Ray actors) behind verl's load balancer

    def __post_init__(self):
        if self.client not in ("http", "verl"):
            raise ValueError(f"client must be 'http' or 'verl', not {self.client!r}")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if min(self.groups, self.samples, self.turns, self.prompt_len, self.max_tokens,
               self.steps) < 1 or self.tool_tokens < 0 or self.tool_pause_ms < 0:
            raise ValueError("groups, samples, turns, prompt_len, max_tokens and steps must "
                             "be >= 1; tool_tokens and tool_pause_ms >= 0")


def run(bench: RLBench) -> dict:
    """Runs both configurations; returns JSON-ready results (see `render`)."""
    results = {}
    for name, prefix_cache in (("agentos", True), ("no prefix cache", False)):
        with (_http_target(bench, prefix_cache) if bench.client == "http"
              else _verl_target(bench, prefix_cache)) as target:
            asyncio.run(_step(target, bench, -1))  # warm-up: first steps, code paths
            steps = [asyncio.run(_step(target, bench, k)) for k in range(bench.steps)]
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


class _Target:
    """Where the turns go: `generate(request_id, history, sampling) -> token ids` and the
    positions the engines have prefilled so far; open/close bracket a step's event loop."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, request_id: str, history: list[int], sampling: dict) -> list[int]:
        raise NotImplementedError

    async def prefilled(self) -> int:
        raise NotImplementedError


@contextlib.contextmanager
def _http_target(bench: RLBench, prefix_cache: bool):
    """`agentos serve` in a subprocess; turns POSTed to /inference/v1/generate."""
    import httpx

    args = ["--model", bench.model, "--device", bench.device, "--kv-blocks",
            str(bench.kv_blocks), "--log-level", "error"]
    args += [] if prefix_cache else ["--no-prefix-cache"]
    if bench.dtype is not None:
        args += ["--dtype", bench.dtype]

    class Http(_Target):
        async def open(self):
            self.client = httpx.AsyncClient(base_url=url, timeout=600.0, trust_env=False,
                                            limits=httpx.Limits(max_connections=None))

        async def close(self):
            await self.client.aclose()

        async def generate(self, request_id, history, sampling):
            r = await self.client.post("/inference/v1/generate", json={
                "token_ids": history, "sampling_params": sampling},
                headers={"X-Session-ID": request_id})
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        async def prefilled(self):
            r = await self.client.get("/v1/system")
            return r.json()["stats"]["tokens_prefilled"]

    with run_server(args, None, None, bench.startup_timeout_s) as url:
        yield Http()


@contextlib.contextmanager
def _verl_target(bench: RLBench, prefix_cache: bool):
    """verl's own LLMServerManager, GlobalRequestLoadBalancer and LLMServerClient over
    `replicas` AgentOS replicas (Ray actors, `agentos.integrations.verl`): the path a
    verl agent loop's turns take. Needs verl (`agentos[verl]`)."""
    import ray
    from omegaconf import OmegaConf
    from verl.workers.config import RolloutConfig
    from verl.workers.rollout.llm_server import LLMServerManager

    from agentos.integrations.verl import config_section, server_name

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    options = {"kv_blocks": bench.kv_blocks, "device": bench.device}
    if bench.dtype is not None:
        options["dtype"] = bench.dtype
    rollout = config_section(RolloutConfig(
        name="agentos", nnodes=1, n_gpus_per_node=bench.replicas, tensor_model_parallel_size=1,
        prompt_length=bench.prompt_len,
        response_length=bench.turns * (bench.max_tokens + bench.tool_tokens),
        max_num_seqs=max(256, bench.groups * bench.samples), max_num_batched_tokens=2048,
        enable_prefix_caching=prefix_cache, engine_kwargs={"agentos": options}))
    config = OmegaConf.create({"actor_rollout_ref": {
        "rollout": rollout, "model": {"path": bench.model, "local_path": bench.model}}})
    manager = LLMServerManager.create(config)
    client = manager.get_client()

    class Verl(_Target):
        async def generate(self, request_id, history, sampling):
            out = await client.generate(request_id, prompt_ids=history,
                                        sampling_params=dict(sampling, logprobs=True))
            return out.token_ids

        async def prefilled(self):
            stats = await asyncio.gather(*(h.stats.remote() for h in manager.server_handles))
            return sum(s["tokens_prefilled"] for s in stats)

    try:
        yield Verl()
    finally:  # free the actor names for the next configuration
        for h in [*manager.server_handles, manager.global_load_balancer]:
            ray.kill(h)
        for rank in range(bench.replicas):
            while True:
                try:
                    ray.get_actor(server_name(rank))
                except ValueError:
                    break
                time.sleep(0.05)


async def _step(target: _Target, bench: RLBench, step: int) -> dict:
    """One rollout step (new prompts each): every trajectory of every group, concurrently."""
    rng = random.Random(f"{bench.seed}/{step}")
    prompts = [[rng.randrange(3, 250) for _ in range(bench.prompt_len)] for _ in range(bench.groups)]
    turn_s: list[float] = []
    await target.open()
    try:
        before = await target.prefilled()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(
            _trajectory(target, bench, prompts[g], (step + 1) * 10_000 + g * bench.samples + i,
                        turn_s, f"{step}/{g}/{i}")
            for g in range(bench.groups) for i in range(bench.samples)))
        wall = time.perf_counter() - t0
        after = await target.prefilled()
    finally:
        await target.close()
    return {"wall_s": wall, "tokens": sum(outs), "computed": after - before,
            "turn_p50_s": statistics.median(turn_s)}


async def _trajectory(target: _Target, bench: RLBench, prompt: list[int], seed: int,
                      turn_s: list[float], request_id: str) -> int:
    rng = random.Random(seed)
    history, sampled = list(prompt), 0
    seed %= 2**31
    for turn in range(bench.turns):
        t0 = time.perf_counter()
        out = await target.generate(request_id, history, {
            "max_tokens": bench.max_tokens, "temperature": 1.0, "ignore_eos": True,
            "seed": seed * 1000 + turn, "logprobs": 1})
        turn_s.append(time.perf_counter() - t0)
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
