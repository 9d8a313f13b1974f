"""Engine pools on Ray: N engines as Ray actors behind one backend.

    import ray
    from agentos.ray import EnginePool

    ray.init()
    pool = EnginePool(num_engines=4, model="path/to/checkpoint")   # num_gpus=1 each on GPU
    worker = RolloutWorker(pool)             # or rollout_func(pool) for TRL, or search
    group = await worker.generate_group("2+2=", n=16)
    await pool.update_weights(model.state_dict(), version=1)        # one ray.put for all

`EnginePool` is an asyncio backend (the methods of `AsyncEngine`), so every handle and
tool of AgentOS works over it. Each actor (`EngineActor`) owns an `AsyncEngine`.

- **Sticky routing**: a session's KV lives on one actor, so everything that shares it
  stays there: its forks, its snapshots, sessions restored from them. New sessions go to
  the actor with the fewest live sessions of this pool.
- **Weights**: `update_weights` puts the tensors in Ray's object store once and every
  actor loads them from there (not one copy per actor through the caller).
- **A dead actor**: Ray restarts it (`max_restarts`). With a store (`store=
  "redis://..."`), each actor journals under its own deployment name and the restarted
  one recovers its sessions from it, so a call that failed is retried once on the new
  actor. Without a store the sessions are gone: the call raises `EngineLostError` naming
  them, and the pool forgets them.

Streamed generates (`stream=True`) come from the actor chunk by chunk through a Ray
streaming generator; closing the stream aborts the call (its tokens stay).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from agentos.backend import AsyncBackend, NamedTensors, Op
from agentos.kernel.errors import AgentOSError
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Session, Snapshot


class EngineLostError(AgentOSError):
    """The actor that held these sessions died and they could not be recovered."""


@dataclasses.dataclass(slots=True)
class _RayOp(Op):
    """An operation for the pool: the AsyncEngine method and its arguments, and which
    session or snapshot decides the actor (None: the least loaded; "all": every actor)."""

    name: str
    args: tuple
    route: str | None = None
    all: bool = False


class EngineActor:
    """A Ray actor's body: an AsyncEngine, and the pool's operations by name. Handles are
    sent back as plain tuples (the pool makes its own handles of them)."""

    def __init__(self, model: str, options: dict):
        from agentos.engine import AsyncEngine

        self.engine = AsyncEngine(model, **options)

    async def call(self, name: str, *args) -> Any:
        if name in ("encode", "decode"):
            return getattr(self.engine, name)(*args)
        return _plain(await getattr(self.engine, name)(*args))

    async def stream(self, session_id: str, params: SamplingParams,
                     append: str | list[int] | None = None):
        """A streamed generate, chunk by chunk (a Ray streaming generator); cancelled by
        the caller, it aborts the call, which keeps the tokens it made."""
        chunks = await self.engine.generate(session_id, params, stream=True, append=append)
        try:
            async for chunk in chunks:
                yield dataclasses.astuple(chunk)
        finally:
            await chunks.aclose()

    def ready(self) -> bool:
        return True


def _plain(x: Any) -> Any:
    if isinstance(x, Session):
        return ("session", x.id, x.parent_id)
    if isinstance(x, Snapshot):
        return ("snapshot", x.id, x.session_id, x.num_tokens, x.device_blocks, x.created_at,
                x.host_blocks, x.owner)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


class EnginePool(AsyncBackend):
    """N AsyncEngines as Ray actors behind one asyncio backend; see the module docstring."""

    def __init__(self, num_engines: int = 2, model: str = "tiny", num_cpus: float | None = None,
                 num_gpus: float | None = None, max_restarts: int = 4, **options: Any):
        import ray

        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        if num_gpus is None:
            num_gpus = 1 if str(options.get("device", "cpu")).startswith("cuda") else 0
        if num_cpus is None:
            num_cpus = 0 if num_gpus else 0.5
        self.store = options.get("store")
        deployment = options.pop("deployment", "agentos-pool")
        actor = ray.remote(EngineActor).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                max_restarts=max_restarts)
        self.actors = [actor.remote(model, {**options, "deployment": f"{deployment}-{i}"})
                       for i in range(num_engines)]
        ray.get([a.ready.remote() for a in self.actors])
        self.home: dict[str, int] = {}  # session or snapshot id -> its actor
        self.live = [0] * num_engines  # live sessions this pool placed on each actor

    # -- operations: each names the AsyncEngine method and who routes it ---------------

    def _op_create(self, prompt, tokens, seed) -> _RayOp:
        return _RayOp("create_session", (prompt, tokens, seed))

    def _op_session(self, session_id):
        return _RayOp("session", (session_id,), session_id)

    def _op_session_info(self, session_id):
        return _RayOp("session_info", (session_id,), session_id)

    def _op_list_sessions(self, ids, owner):
        return _RayOp("list_sessions", (ids, owner), all=True)

    def _op_append(self, session_id, text, tokens):
        return _RayOp("append", (session_id, text, tokens), session_id)

    def _op_generate(self, session_id, params: SamplingParams, stream: bool, append=None):
        if stream:
            return _RayOp("stream", (session_id, params, append), session_id)
        return _RayOp("generate", (session_id, params, False, append), session_id)

    def _op_score(self, session_id, text, tokens):
        return _RayOp("score", (session_id, text, tokens), session_id)

    def _op_next_token_logprobs(self, session_id, top_k, candidates):
        return _RayOp("next_token_logprobs", (session_id, top_k, candidates), session_id)

    def _op_fork(self, session_id, n):
        return _RayOp("fork", (session_id, n), session_id)

    def _op_snapshot(self, session_id):
        return _RayOp("snapshot", (session_id,), session_id)

    def _op_rollback(self, session_id, snapshot_id):
        return _RayOp("rollback", (session_id, snapshot_id), session_id)

    def _op_close_session(self, session_id):
        return _RayOp("close_session", (session_id,), session_id)

    def _op_tokens_and_mask(self, session_id):
        return _RayOp("tokens_and_mask", (session_id,), session_id)

    def _op_export(self, session_id, kv):
        return _RayOp("export_session", (session_id, kv), session_id)

    def _op_import(self, data):
        return _RayOp("import_session", (data,))

    def _op_list_snapshots(self, session_id, owner):
        if session_id is not None:
            return _RayOp("list_snapshots", (session_id, owner), session_id)
        return _RayOp("list_snapshots", (None, owner), all=True)

    def _op_restore(self, snapshot_id):
        return _RayOp("restore", (snapshot_id,), snapshot_id)

    def _op_get_snapshot(self, snapshot_id):
        return _RayOp("get_snapshot", (snapshot_id,), snapshot_id)

    def _op_delete_snapshot(self, snapshot_id):
        return _RayOp("delete_snapshot", (snapshot_id,), snapshot_id)

    def _op_update_weights(self, named_tensors: NamedTensors, version, kv_policy):
        import ray

        weights = dict(named_tensors)  # (name, tensor) pairs or a dict: one object for all
        return _RayOp("update_weights", (ray.put(weights), version, kv_policy), all=True)

    def _op_pause(self, wait):
        return _RayOp("pause", (wait,), all=True)

    def _op_resume(self):
        return _RayOp("resume", (), all=True)

    def _op_abort(self):
        return _RayOp("abort", (), all=True)

    def _op_sleep(self, level):
        return _RayOp("sleep", (level,), all=True)

    def _op_wake_up(self):
        return _RayOp("wake_up", (), all=True)

    def _op_reset_prefix_cache(self):
        return _RayOp("reset_prefix_cache", (), all=True)

    def _op_stats(self):
        return _RayOp("stats", (), all=True)

    def _op_check(self):
        return _RayOp("check", (), all=True)

    # -- carrying them out --------------------------------------------------------------

    async def _call(self, op: _RayOp) -> Any:  # type: ignore[override]
        if op.all:
            results = await asyncio.gather(*(self._on(i, op) for i in range(len(self.actors))))
            return _merge(op.name, results)
        if op.route is None:
            i = min(range(len(self.actors)), key=self.live.__getitem__)
        elif op.route in self.home:
            i = self.home[op.route]
        else:  # an id this pool never placed: the engines answer as they would (NotFound)
            i = 0
        return await self._on(i, op)

    async def _on(self, i: int, op: _RayOp) -> Any:
        from ray.exceptions import RayActorError

        if op.name == "stream":
            chunks = self.actors[i].stream.options(num_returns="streaming").remote(*op.args)
            return _PoolStream(chunks, i)
        try:
            result = await self.actors[i].call.remote(op.name, *op.args)
        except RayActorError:
            if self.store is None:
                lost = sorted(k for k, v in self.home.items() if v == i)
                for k in lost:
                    del self.home[k]
                self.live[i] = 0
                raise EngineLostError(f"engine {i} died; without a store its sessions and "
                                      f"snapshots are lost: {', '.join(lost) or 'none'}") from None
            await self._restarted(i)  # by Ray, its sessions recovered from the store
            result = await self.actors[i].call.remote(op.name, *op.args)
        return self._wrap(result, i, op)

    async def _restarted(self, i: int, timeout_s: float = 120.0) -> None:
        """Waits until Ray has restarted actor i (its engine recovered from the store)."""
        from ray.exceptions import RayActorError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await self.actors[i].ready.remote()
                return
            except RayActorError:
                if loop.time() > deadline:
                    raise EngineLostError(f"engine {i} died and did not come back within "
                                          f"{timeout_s:g} s") from None
                await asyncio.sleep(0.5)

    def _wrap(self, result: Any, i: int, op: _RayOp) -> Any:
        if op.name == "close_session":
            if self.home.pop(op.args[0], None) is not None:
                self.live[i] -= 1
        elif op.name == "delete_snapshot":
            self.home.pop(op.args[0], None)
        return self._handles(result, i)

    def _handles(self, x: Any, i: int) -> Any:
        if isinstance(x, list):
            return [self._handles(v, i) for v in x]
        if isinstance(x, tuple) and x and x[0] == "session":
            if x[1] not in self.home:
                self.home[x[1]] = i
                self.live[i] += 1
            return Session(self, x[1], x[2])
        if isinstance(x, tuple) and x and x[0] == "snapshot":
            self.home.setdefault(x[1], i)
            return Snapshot(self, *x[1:])
        return x

    def encode(self, text: str, add_special_tokens: bool = False):
        return self.actors[0].call.remote("encode", text, add_special_tokens)

    def decode(self, token_ids: list[int]):
        return self.actors[0].call.remote("decode", token_ids)

    def shutdown(self) -> None:
        """Ends the actors (their engines with them)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


class _PoolStream:
    """A streamed generate from an actor: an async iterator of GenerationChunks (the
    AsyncEngine's stream, carried by a Ray streaming generator). aclose() cancels it,
    which aborts the call on the actor."""

    def __init__(self, refs, actor: int):
        self._refs = refs
        self._actor = actor
        self._closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        from ray.exceptions import RayActorError

        from agentos.kernel.process import GenerationChunk

        if self._closed:
            raise StopAsyncIteration
        try:
            ref = await self._refs.__anext__()
            return GenerationChunk(*await ref)
        except StopAsyncIteration:
            self._closed = True
            raise
        except RayActorError:
            self._closed = True
            raise EngineLostError(f"engine {self._actor} died during a streamed generate; "
                                  "the tokens it made are in the session if it comes back "
                                  "from the store") from None

    async def aclose(self) -> None:
        import ray

        if not self._closed:
            self._closed = True
            ray.cancel(self._refs)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _merge(name: str, results: list) -> Any:
    """One answer of every actor's: lists joined, counts added, stats per engine."""
    if name in ("list_sessions", "list_snapshots"):
        return [x for r in results for x in r]
    if name in ("abort", "reset_prefix_cache"):
        return sum(results)
    if name == "update_weights":
        return results[0]
    if name == "stats":
        return {"engines": results}
    return None


__all__ = ["EngineActor", "EngineLostError", "EnginePool"]
