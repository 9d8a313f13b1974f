"""AgentOS as the rollout engine of TRL's `GRPOTrainer`.

    from trl import GRPOConfig, GRPOTrainer
    from agentos import Engine
    from agentos.integrations.trl import rollout_func

    engine = Engine(model="path/to/the/same/checkpoint")
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                          train_dataset=..., rollout_func=rollout_func(engine))

The backend is any of AgentOS's: `Engine` in-process, `Client` against `agentos serve`
(its key must be an admin to push weights), or their async forms. What the callable does
on each of the trainer's generation calls:

- Groups: TRL's sampler repeats each prompt `num_generations` times in a row. Each run of
  equal prompts is one group: its prompt is prefilled once and forked (the forks share its
  KV pages), and every fork samples one completion.
- Prompts are tokenized with the trainer's own processing class (chat template and
  `chat_template_kwargs` for conversational prompts, as TRL does), and the token ids are
  sent: the ids the trainer computes its loss on are the ids the engine continued.
- Sampling follows the trainer's arguments: `temperature`, `top_p`, `top_k` (0 or -1: off),
  `min_p`, `repetition_penalty` and `max_completion_length`; `generation_kwargs` is a
  clear ValueError, never silently dropped.
- Weights: whenever the trainer's `global_step` differs from the last one pushed (the first
  call included), the trainer's parameters go to the engine (HF names; weight version =
  the step; a PEFT model's adapters merged into its base weights first) before anything
  is sampled, with `kv_policy` "recompute", so every completion
  is sampled from the weights of the step that asked for it. `versions` records each push.
- Multi-turn: with `agent_fn` (an `agentos.rl.AgentFn`: `await agent_fn(rollout_session)`,
  generating and appending tool output), each completion is the whole multi-turn
  response and `env_mask` (0 on appended tokens) goes back to TRL, which leaves those
  tokens out of the loss.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from agentos.kernel.sampling_params import SamplingParams
from agentos.rl import AgentFn, RolloutWorker, Trajectory


@dataclass(slots=True)
class WeightPush:
    step: int  # the trainer's global_step
    version: int  # the engine's weight version after the push
    tensors: int
    seconds: float


class TRLRollout:
    """The callable `GRPOTrainer(rollout_func=...)` takes; see the module docstring."""

    def __init__(self, backend, agent_fn: AgentFn | None = None, sync_weights: bool = True,
                 kv_policy: str = "recompute"):
        self.worker = RolloutWorker(backend)
        self.agent_fn = agent_fn
        self.sync_weights = sync_weights
        self.kv_policy = kv_policy
        self.versions: list[WeightPush] = []
        self.synced_step: int | None = None
        self._loop = asyncio.new_event_loop()  # one loop for every call (async backends too)

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        if self.sync_weights:
            self.push_weights(trainer)
        sampling = sampling_from_args(trainer.args)
        groups = repeated_runs(prompts)
        ids = [prompt_ids(trainer, p) for p, _ in groups]
        async def rollouts() -> list[list[Trajectory]]:
            return list(await asyncio.gather(*(
                self.worker.generate_group(i, n, sampling, agent_fn=self.agent_fn,
                                           keep_aborted=False)
                for i, (_, n) in zip(ids, groups))))

        runs = self._run(rollouts())
        done: list[Trajectory] = [t for group in runs for t in group]
        out: dict[str, Any] = {"prompt_ids": [t.prompt_ids for t in done],
                               "completion_ids": [t.response_ids for t in done],
                               "logprobs": [t.rollout_logprobs for t in done]}
        if self.agent_fn is not None:
            out["env_mask"] = [t.response_mask for t in done]
        return out

    def push_weights(self, trainer, force: bool = False) -> WeightPush | None:
        """Pushes the trainer's parameters to the engine when its step changed since the last
        push (or with force); returns the push, or None when the engine was current."""
        step = int(trainer.state.global_step)
        if step == self.synced_step and not force:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        t0 = time.perf_counter()
        if hasattr(model, "peft_config"):
            weights = merged_peft_weights(model)
        else:  # parameters, not state_dict: no buffers, and a tied weight once
            weights = {name: p.detach() for name, p in model.named_parameters()}
        version = self._run(self.worker.update_weights(weights, version=step,
                                                       kv_policy=self.kv_policy))
        push = WeightPush(step, version, len(weights), time.perf_counter() - t0)
        self.versions.append(push)
        self.synced_step = step
        return push

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        self._loop.close()


def merged_peft_weights(model) -> dict[str, Any]:
    """A PEFT model's weights under the base model's HF names, its adapters merged in
    (merge_adapter, a copy, unmerge_adapter: the trainer's model is left as it was).
    Adapter tensors are left out; `modules_to_save` copies stand for their module."""
    model.merge_adapter()
    try:
        weights = {}
        for name, p in model.named_parameters():
            if model.prefix in name or ".original_module." in name:
                continue  # the adapters themselves, and a replaced module's old copy
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            for adapter in model.peft_config:
                name = name.replace(f".modules_to_save.{adapter}.", ".")
            weights[name] = p.detach().clone()
        return weights
    finally:
        model.unmerge_adapter()


def rollout_func(backend, agent_fn: AgentFn | None = None, sync_weights: bool = True,
                 kv_policy: str = "recompute") -> TRLRollout:
    """The `rollout_func` for TRL's GRPOTrainer over an AgentOS backend (Engine, Client,
    AsyncEngine or AsyncClient); see the module docstring."""
    return TRLRollout(backend, agent_fn, sync_weights, kv_policy)


def repeated_runs(prompts: list) -> list[tuple[Any, int]]:
    """Consecutive equal prompts as (prompt, count), in order: TRL repeats each prompt
    num_generations times in a row, and each run becomes one forked group."""
    runs: list[tuple[Any, int]] = []
    for p in prompts:
        if runs and runs[-1][0] == p:
            runs[-1] = (p, runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def prompt_ids(trainer, prompt) -> list[int]:
    """The token ids TRL itself would make of one prompt: the chat template (with the
    trainer's chat_template and chat_template_kwargs, a generation prompt added) for a
    conversation, the processing class's plain encoding for text."""
    processor = trainer.processing_class
    if isinstance(prompt, str):
        return list(processor(text=[prompt])["input_ids"][0])
    if not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
        raise TypeError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")
    encoded = processor.apply_chat_template(
        conversation=[prompt], chat_template=getattr(trainer, "chat_template", None),
        add_generation_prompt=True, tokenize=True, return_dict=True,
        **(getattr(trainer, "chat_template_kwargs", None) or {}))
    return list(encoded["input_ids"][0])


def sampling_from_args(args) -> SamplingParams:
    """SamplingParams from a GRPOConfig. Raises ValueError for what AgentOS does not take
    (`generation_kwargs`: rather than sampling from another distribution than asked)."""
    if getattr(args, "generation_kwargs", None):
        raise ValueError(f"AgentOS rollouts do not take generation_kwargs "
                         f"({args.generation_kwargs}); set the trainer's sampling arguments")
    top_k = getattr(args, "top_k", 0) or 0
    max_tokens = getattr(args, "max_completion_length", None)
    if max_tokens is None:
        raise ValueError("set max_completion_length: AgentOS rollouts need a bound")
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(args.temperature),
                          top_p=float(getattr(args, "top_p", 1.0) or 1.0),
                          top_k=0 if top_k < 0 else int(top_k),
                          min_p=float(getattr(args, "min_p", None) or 0.0),
                          repetition_penalty=float(getattr(args, "repetition_penalty", 1.0)
                                                   or 1.0), logprobs=True)
