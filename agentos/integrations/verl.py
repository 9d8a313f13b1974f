"""AgentOS as a rollout backend of verl (0.9): `actor_rollout_ref.rollout.name=agentos`.

Installing agentos next to verl registers it through verl's plugin entry point
(`verl.plugins`, loaded when `verl` is imported): the replica class under the name
"agentos" in `RolloutReplicaRegistry`, and the trainer-side adapter under
("agentos", "async") in the rollout registry. Nothing else changes in a verl script:

    python -m verl.trainer.main_ppo actor_rollout_ref.rollout.name=agentos \\
        actor_rollout_ref.rollout.tensor_model_parallel_size=1 ...

The pieces, each verl's contract:

- `AgentOSServer`: the Ray actor verl's `LLMServerClient` (through its
  `GlobalRequestLoadBalancer`) sends `generate(prompt_ids, sampling_params, request_id)`
  to, answering a `TokenOutput`. verl re-sends a conversation's whole history every turn
  under a fresh request id; each call runs on a session of its own, and the KV the last
  turn left in the prefix cache is mapped, so a turn computes only its new tokens.
  The control plane: wake_up/sleep, abort_all_requests/resume_generation, abort_request,
  clear_kv_cache (the prefix cache), release/resume_kv_cache, set_global_steps,
  update_weights.
- `AgentOSReplica`: one server actor per replica (tensor parallel size 1), placed on the
  node of the replica's workers (hybrid and colocated modes) with their device, or, in
  standalone mode on a machine without GPUs, as a CPU actor.
- `ServerAdapter`: the trainer-side rollout in hybrid mode: `update_weights(generator)`
  goes through the object store once (every rank consumes the generator, since FSDP's
  gathers are collective; the replica's rank 0 sends), `resume`/`release` wake and
  sleep the server.

Engine options come from the rollout config (`max_model_len` or prompt + response
length, `max_num_seqs`, `max_num_batched_tokens`, `dtype`, `enable_prefix_caching`) and
from `engine_kwargs.agentos` (any `agentos serve` option, e.g. `kv_blocks`). Sampling
options verl sends that AgentOS lacks, multimodal inputs and a non-zero `priority` are a
ValueError naming them, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import (
    RolloutMode,
    RolloutReplica,
    RolloutReplicaRegistry,
    TokenOutput,
)

logger = logging.getLogger(__name__)

NAME = "agentos"
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                 "ignore_eos"}


def server_name(replica_rank: int, node_rank: int = 0, suffix: str = "") -> str:
    return f"{NAME}_server_{replica_rank}_{node_rank}{suffix}"


class AgentOSServer:
    """The server actor's body (see the module docstring). `limits`: max_model_len,
    prompt_length and response_length (verl's default max_tokens), and the defaults
    verl's config sets: repetition_penalty, ignore_eos, seed (full_determinism)."""

    def __init__(self, model: str, options: dict, replica_rank: int = 0,
                 limits: dict | None = None, free_cache_engine: bool = True,
                 sleep_level: int = 1):
        from agentos.engine import AsyncEngine

        self.engine = AsyncEngine(model, **options)
        self.replica_rank = replica_rank
        self.limits = dict(limits or {})
        self.max_model_len = min(self.limits.get("max_model_len") or 1 << 62,
                                 self.engine.max_model_len)
        self.free_cache_engine = free_cache_engine
        self.sleep_level = sleep_level
        self.global_steps: int | None = None
        self._calls: dict[str, asyncio.Task] = {}  # request id -> its generate
        self._aborted: set[str] = set()

    def ready(self) -> bool:
        return True

    # -- data plane ----------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any],
                       request_id: str, image_data: list | None = None,
                       video_data: list | None = None, audio_data: list | None = None,
                       mm_processor_kwargs: dict | None = None, priority: int = 0,
                       **kwargs: Any) -> TokenOutput:
        media = {k: v for k, v in (("image_data", image_data), ("video_data", video_data),
                                   ("audio_data", audio_data),
                                   ("mm_processor_kwargs", mm_processor_kwargs)) if v}
        if media:
            raise ValueError(f"AgentOS serves text models: {', '.join(media)} not supported")
        if priority:
            raise ValueError("priority is not supported: AgentOS schedules by its MLFQ")
        if kwargs:
            raise ValueError(f"unsupported generate arguments: {', '.join(sorted(kwargs))}")
        prompt = [int(t) for t in prompt_ids]
        params = self.sampling(prompt, dict(sampling_params))
        s = await self.engine.create_session(tokens=prompt)
        call = asyncio.ensure_future(s.generate(params=params))
        self._calls[request_id] = call
        try:
            g = await call
            stop_reason = "aborted" if g.finish_reason == "abort" else "completed"
            tokens, logprobs = g.tokens, g.logprobs
        except asyncio.CancelledError:
            if request_id not in self._aborted:
                raise
            # abort_request: the call ended with the tokens it made, which its session holds
            all_tokens, _ = await self.engine.tokens_and_mask(s.id)
            tokens, logprobs, stop_reason = all_tokens[len(prompt):], None, "aborted"
        finally:
            self._calls.pop(request_id, None)
            self._aborted.discard(request_id)
            await self.engine.close_session(s.id)
        return TokenOutput(token_ids=tokens, log_probs=logprobs if params.logprobs else None,
                           stop_reason=stop_reason,
                           extra_fields={"global_steps": self.global_steps})

    def sampling(self, prompt: list[int], sp: dict[str, Any]):
        """AgentOS SamplingParams from verl's dict, the way verl's vLLM server reads it:
        max_tokens (or max_new_tokens) else the configured response length, clamped to
        the context left; logprobs as a flag."""
        from agentos.kernel.sampling_params import SamplingParams

        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room to generate "
                             f"within max_model_len {self.max_model_len}")
        if "max_tokens" in sp:
            max_tokens = sp.pop("max_tokens")
        elif "max_new_tokens" in sp:
            max_tokens = sp.pop("max_new_tokens")
        else:
            response = self.limits.get("response_length") or room
            prompt_len = self.limits.get("prompt_length") or 0
            max_tokens = min(response, prompt_len + response - len(prompt)) if prompt_len \
                else response
        logprobs = sp.pop("logprobs", False)
        unknown = set(sp) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"sampling options AgentOS does not have: {', '.join(sorted(unknown))}")
        for key in ("repetition_penalty", "ignore_eos", "seed"):
            if self.limits.get(key) is not None:
                sp.setdefault(key, self.limits[key])
        if isinstance(sp.get("stop"), str):
            sp["stop"] = [sp["stop"]]
        sp = {k: v for k, v in sp.items() if v is not None}
        return SamplingParams(max_tokens=max(1, min(int(max_tokens), room)),
                              logprobs=logprobs is not None and logprobs is not False, **sp)

    # -- control plane -------------------------------------------------------------------

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.engine.wake_up()
        await self.engine.reset_prefix_cache()

    async def sleep(self) -> None:
        if self.free_cache_engine:
            await self.engine.sleep(self.sleep_level)

    async def clear_kv_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    async def release_kv_cache(self) -> None:
        if self.free_cache_engine:
            await self.engine.sleep(1)  # the KV pool only; the weights stay

    async def resume_kv_cache(self) -> None:
        await self.engine.wake_up()

    async def abort_all_requests(self, reset_prefix_cache: bool = True) -> dict[str, Any]:
        """Ends every call in flight (they answer with the tokens they made, stop_reason
        "aborted") and pauses: later calls wait until resume_generation()."""
        ids = list(self._calls)
        await self.engine.pause()
        aborted = await self.engine.abort()
        if reset_prefix_cache:
            await self.engine.reset_prefix_cache()
        return {"aborted_count": aborted, "request_ids": ids}

    async def resume_generation(self) -> None:
        await self.engine.resume()

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        call = self._calls.get(request_id)
        if call is None:
            return {"aborted": False, "request_id": request_id,
                    "error": f"Request {request_id} not found"}
        self._aborted.add(request_id)
        call.cancel()
        if reset_prefix_cache:
            await self.engine.reset_prefix_cache()
        return {"aborted": True, "request_id": request_id}

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def update_weights(self, weights: Any, version: int | None = None,
                             kv_policy: str = "recompute") -> int:
        """HF-named tensors (a dict, pairs, or the object-store reference of either) into
        the engine; the prefix cache is emptied with them. Returns the weight version."""
        return await self.engine.update_weights(weights, version, kv_policy)

    async def start_profile(self, **kwargs: Any) -> None:
        logger.warning("AgentOS does not run verl's profiler; start_profile does nothing")

    async def stop_profile(self) -> None:
        return None

    async def stats(self) -> dict:
        return await self.engine.stats()


class AgentOSReplica(RolloutReplica):
    """verl's rollout replica for AgentOS: one `AgentOSServer` per replica."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.world_size != 1:
            raise ValueError("AgentOS runs one engine per replica: set tensor, data and pipeline "
                             f"parallel sizes to 1 (their product is {self.world_size})")

    def rollout_worker_use_gpu(self) -> bool:
        import torch

        return torch.cuda.is_available()

    async def init_standalone(self) -> None:
        if self.rollout_worker_use_gpu():
            return await super().init_standalone()
        self.rollout_mode = RolloutMode.STANDALONE  # no GPUs: the server is a CPU actor
        await self.launch_servers()

    def engine_options(self, device: str) -> dict:
        c = self.config
        options = {"device": device, "dtype": None if device == "cpu" else c.dtype,
                   "max_batch_size": c.max_num_seqs,
                   "max_batch_tokens": c.max_num_batched_tokens,
                   "prefix_cache": c.enable_prefix_caching}
        if c.max_model_len:
            options["max_model_len"] = c.max_model_len
        options.update((c.engine_kwargs or {}).get(NAME) or {})
        return options

    async def launch_servers(self) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        model = getattr(self.model_config, "local_path", None)
        if not model:  # a config section, not yet an HFModelConfig: fetch as verl does
            from verl.utils.fs import copy_to_local

            model = copy_to_local(self.model_config.path)
        c = self.config
        limits = {"max_model_len": c.max_model_len, "prompt_length": c.prompt_length,
                  "response_length": c.response_length,
                  "repetition_penalty": c.repetition_penalty, "ignore_eos": c.ignore_eos,
                  "seed": self.replica_rank + c.seed if c.full_determinism else None}
        name = server_name(self.replica_rank, 0, self.name_suffix)
        actor = ray.remote(AgentOSServer)
        hybrid = self.rollout_mode in (RolloutMode.HYBRID, RolloutMode.COLOCATED)
        if self.workers:  # beside the replica's workers, on their node and device
            node_id, device_id = await self.workers[0].__ray_call__.remote(
                lambda w: (ray.get_runtime_context().get_node_id(),
                           (ray.get_runtime_context().get_accelerator_ids().get("GPU") or [None])[0]))
            env = {"CUDA_VISIBLE_DEVICES": str(device_id)} if device_id is not None else {}
            actor = actor.options(
                name=name, max_concurrency=self.max_concurrency, num_cpus=0, num_gpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
                                          **env}})
            device = "cuda" if device_id is not None else "cpu"
        else:
            gpu = self.rollout_worker_use_gpu()
            actor = actor.options(name=name, max_concurrency=self.max_concurrency,
                                  num_cpus=0 if gpu else 0.5, num_gpus=1 if gpu else 0)
            device = "cuda" if gpu else "cpu"
        server = actor.remote(model, self.engine_options(device), self.replica_rank, limits,
                              c.free_cache_engine, 2 if hybrid and device == "cuda" else 1)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # the load balancer's key for this replica

    async def abort_all_requests(self) -> dict[str, Any]:
        results = await asyncio.gather(*(s.abort_all_requests.remote() for s in self.servers))
        return {"aborted_count": sum(r["aborted_count"] for r in results),
                "request_ids": [i for r in results for i in r["request_ids"]]}

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        results = await asyncio.gather(*(s.abort_request.remote(request_id) for s in self.servers))
        return next((r for r in results if r.get("aborted")), results[0])

    async def set_global_steps(self, global_steps: int) -> None:
        await asyncio.gather(*(s.set_global_steps.remote(global_steps) for s in self.servers))


class ServerAdapter(BaseRollout):
    """The trainer-side rollout of hybrid mode (see the module docstring)."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.has_server = rank % world == 0
        self.server_handle = None

    def _server(self):
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]) -> None:
        if self.has_server and self.config.free_cache_engine:
            await self._server().wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.has_server and self.config.free_cache_engine:
            await self._server().sleep.remote()

    async def update_weights(self, weights, global_steps: int | None = None,
                             wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"AgentOS takes full named tensors, not {wire_format!r}")
        tensors = {}
        for name, tensor in weights:  # every rank iterates: the gathers inside are collective
            if self.has_server:
                tensors[name] = tensor.detach().to("cpu", copy=True)
        if not self.has_server:
            return
        server = self._server()
        await server.update_weights.remote(ray.put(tensors), global_steps)
        if global_steps is not None:
            await server.set_global_steps.remote(global_steps)


def config_section(config: Any):
    """A verl config dataclass (e.g. `RolloutConfig(name="agentos", ...)`) as the DictConfig
    verl's scripts pass around, every section naming its `_target_` as verl's yaml files
    do (verl turns sections back into dataclasses through hydra's instantiate)."""
    from omegaconf import DictConfig, OmegaConf

    def name(node) -> None:
        if not isinstance(node, DictConfig) or node._is_none():
            return
        kind = OmegaConf.get_type(node)
        if "_target_" in node and not node._target_ and kind is not dict:
            node._target_ = f"{kind.__module__}.{kind.__qualname__}"
        for key in node:
            name(node._get_node(key))

    section = OmegaConf.structured(config)
    name(section)
    return section


def register() -> None:
    """Makes "agentos" a rollout name verl knows (idempotent)."""
    RolloutReplicaRegistry.register(NAME, lambda: AgentOSReplica)
    _ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.ServerAdapter"


register()

__all__ = ["AgentOSReplica", "AgentOSServer", "ServerAdapter", "config_section", "register"]
