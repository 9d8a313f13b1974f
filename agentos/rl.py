"""RL rollouts over forkable sessions: groups, multi-turn agents, weight sync.

A `RolloutWorker` drives any backend (Engine, AsyncEngine, Client, AsyncClient) with the
same code. Its methods are coroutines; with a blocking backend each call runs in a
thread, so the branches of a group still reach the engine together and batch.

    worker = RolloutWorker(engine)
    group = await worker.generate_group("2+2=", n=16, sampling=SamplingParams(max_tokens=8))
    ... train on [t.to_verl() for t in group] ...
    await worker.update_weights(model.state_dict(), version=1)

A group prefills its prompt once and forks it n ways (the children share the prompt's
pages). Each `Trajectory` carries what a trainer needs: response tokens with a mask (1 =
sampled by the model, 0 = tool or environment output), the logprob and weight version of
every sampled token, the reward, and why it stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agentos.kernel.process import Generation
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Session, call_op

_STOP_REASONS = {"stop": "stop", "length": "length", "abort": "aborted"}


@dataclass(slots=True)
class Trajectory:
    """One rollout. Response lists are aligned: one entry per response token."""

    group_id: str
    repetition_id: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)  # 1 = model token, 0 = tool/env
    rollout_logprobs: list[float] = field(default_factory=list)  # 0.0 where the mask is 0
    weight_versions: list[int | None] = field(default_factory=list)  # None where the mask is 0
    reward: float | None = None
    stop_reason: str = "stop"  # "stop", "length" or "aborted"
    num_turns: int = 0  # generate calls
    metrics: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None  # the live session of an aborted rollout (see resume)

    def add_tokens(self, token_ids: list[int]) -> None:
        """Records given tokens (tool or environment output: mask 0)."""
        self.response_ids += token_ids
        self.response_mask += [0] * len(token_ids)
        self.rollout_logprobs += [0.0] * len(token_ids)
        self.weight_versions += [None] * len(token_ids)

    def add_generation(self, g: Generation) -> None:
        """Records a generate call's tokens (mask 1) with their logprobs and versions."""
        if g.logprobs is None:
            raise ValueError("rollouts need logprobs: generate with logprobs=True")
        self.response_ids += g.tokens
        self.response_mask += [1] * len(g.tokens)
        self.rollout_logprobs += g.logprobs
        self.weight_versions += g.weight_versions or [None] * len(g.tokens)
        self.num_turns += 1
        self.stop_reason = _STOP_REASONS[g.finish_reason]

    def to_verl(self) -> dict:
        """The fields of verl's agent-loop output (a plain dict)."""
        return {"prompt_ids": list(self.prompt_ids), "response_ids": list(self.response_ids),
                "response_mask": list(self.response_mask),
                "response_logprobs": list(self.rollout_logprobs), "reward_score": self.reward,
                "num_turns": self.num_turns,
                "metrics": {**self.metrics, "stop_reason": self.stop_reason}}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def to_trl(trajectories: list[Trajectory]) -> dict:
    """A batch in the shape TRL's GRPO `rollout_func` returns: per-sample lists of prompt
    ids, completion ids and logprobs, plus extra fields (passed on to reward functions)."""
    return {"prompt_ids": [t.prompt_ids for t in trajectories],
            "completion_ids": [t.response_ids for t in trajectories],
            "logprobs": [t.rollout_logprobs for t in trajectories],
            "env_mask": [t.response_mask for t in trajectories],
            "reward": [t.reward for t in trajectories]}


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """GRPO advantages: each reward minus the group mean, over the group's std."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    return [(r - mean) / (std + eps) for r in rewards]


class RolloutSession:
    """The session an agent function drives: generate and append are recorded into the
    trajectory (sampled tokens with mask 1, appended ones with mask 0)."""

    def __init__(self, worker: RolloutWorker, session: Session, trajectory: Trajectory,
                 sampling: SamplingParams):
        self._worker = worker
        self.session = session
        self.trajectory = trajectory
        self.sampling = sampling

    async def generate(self, append: str | list[int] | None = None, **overrides) -> Generation:
        """Generates with the rollout's sampling parameters (fields may be overridden).
        `append` (text or token ids: a tool's output) is appended first, in the same call
        (see Session.generate), and recorded as append() records it."""
        params = dataclasses.replace(self.sampling, **overrides)
        if isinstance(append, str):
            append = await self._worker._do(self._worker.backend.encode, append)
        g = await self._worker._do(self.session.generate, params=params, append=append)
        if append:
            self.trajectory.add_tokens(list(append))
        self.trajectory.add_generation(g)
        return g

    async def append(self, text: str | None = None, tokens: list[int] | None = None) -> None:
        if tokens is None:
            tokens = await self._worker._do(self._worker.backend.encode, text)
        await self._worker._do(self.session.append, tokens=tokens)
        self.trajectory.add_tokens(list(tokens))

    async def text(self) -> str:
        """The response so far as text."""
        return await self._worker._do(self._worker.backend.decode, self.trajectory.response_ids)


AgentFn = Callable[[RolloutSession], Awaitable[Any]]
RewardFn = Callable[[Trajectory], Any]


class RolloutWorker:
    """Rollouts over a backend; see the module docstring."""

    def __init__(self, backend, max_threads: int = 256):
        self.backend = backend
        # NOTE: a blocking backend's calls each hold a thread while the engine batches
        # them; asyncio's default executor (a handful of threads) would cap the batch
        self._pool = None if backend.is_async else ThreadPoolExecutor(max_threads, "agentos-rollout")

    async def _do(self, fn: Callable, *args, **kwargs):
        return await call_op(fn, *args, pool=self._pool, **kwargs)

    async def generate_group(self, prompt: str | list[int], n: int,
                             sampling: SamplingParams | None = None, group_id: str | None = None,
                             reward_fn: RewardFn | None = None, agent_fn: AgentFn | None = None,
                             keep_aborted: bool = True) -> list[Trajectory]:
        """Rolls out n repetitions of one prompt: prefilled once, forked n ways.

        Without agent_fn each repetition is one generate call with `sampling`; with it,
        `await agent_fn(rollout_session)` drives a multi-turn rollout (appending tool
        output, generating). A seeded `sampling` gives repetition i the seed `seed + i`.
        `reward_fn(trajectory)` (sync or async) sets each reward. Sessions are closed at
        the end, except those of aborted rollouts with keep_aborted (see `continue_rollout`).
        Returns the trajectories in repetition order."""
        sampling = sampling or SamplingParams()
        group_id = group_id or "grp_" + uuid.uuid4().hex[:12]
        root = await self._create(prompt)
        try:
            prompt_ids = await self._do(root.get_tokens)
            children = await self._do(root.fork, n)
        finally:
            await self._do(root.close)  # the children hold the prompt's pages

        async def one(i: int, s: Session) -> Trajectory:
            params = sampling if sampling.seed is None else dataclasses.replace(
                sampling, seed=sampling.seed + i)
            t = Trajectory(group_id, i, list(prompt_ids), session_id=s.id)
            try:
                rs = RolloutSession(self, s, t, params)
                if agent_fn is None:
                    await rs.generate()
                else:
                    await agent_fn(rs)
                if reward_fn is not None:
                    t.reward = await call_op(reward_fn, t)
            finally:
                if not (keep_aborted and t.stop_reason == "aborted"):
                    t.session_id = None
                    await self._do(s.close)
            return t

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(children))))

    async def continue_rollout(self, trajectory: Trajectory, sampling: SamplingParams,
                     reward_fn: RewardFn | None = None, close: bool = True) -> Trajectory:
        """Continues an aborted single-call rollout on its kept session (its KV is still
        there) until the rest of `sampling.max_tokens`; returns the same trajectory."""
        if trajectory.session_id is None:
            raise ValueError("the trajectory has no live session to resume")
        s = await self._do(self.backend.session, trajectory.session_id)
        generated = sum(trajectory.response_mask)
        left = max(1, sampling.max_tokens - generated)
        rs = RolloutSession(self, s, trajectory, dataclasses.replace(sampling, max_tokens=left,
                                                                     seed=None))
        await rs.generate()
        if reward_fn is not None:
            trajectory.reward = await call_op(reward_fn, trajectory)
        if close and trajectory.stop_reason != "aborted":
            await self._do(s.close)
            trajectory.session_id = None
        return trajectory

    async def _create(self, prompt: str | list[int]) -> Session:
        if isinstance(prompt, str):
            return await self._do(self.backend.create_session, prompt=prompt)
        return await self._do(self.backend.create_session, tokens=list(prompt))

    # -- the engine (weight sync and lifecycle) ---------------------------------------

    async def update_weights(self, named_tensors, version: int | None = None,
                             kv_policy: str = "recompute") -> int:
        """Loads a trainer's weights into the engine; see Backend.update_weights."""
        return await self._do(self.backend.update_weights, named_tensors, version, kv_policy)

    async def pause(self) -> None:
        await self._do(self.backend.pause)

    async def resume(self) -> None:
        await self._do(self.backend.resume)

    async def abort(self) -> int:
        """Ends every generate call in flight: their rollouts stop with "aborted" and keep
        their sessions (and KV) for `continue_rollout`."""
        return await self._do(self.backend.abort)

    async def sleep(self, level: int = 1) -> None:
        await self._do(self.backend.sleep, level)

    async def wake_up(self) -> None:
        await self._do(self.backend.wake_up)
