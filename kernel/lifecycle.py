"""The engine's lifecycle syscalls: pause and resume, abort every call, load new weights,
and sleep and wake up (release and re-create the KV pool; the memory manager moves the
pages). A part of the Kernel (a base class of it, holding no state of its own); every
method runs in the loop thread.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from agentos.kernel.errors import ConflictError, InvalidRequestError
from agentos.kernel.process import GenerateCall, Process, ProcState


class Lifecycle:
    def sys_pause(self) -> None:
        """Stops running steps: generate and score calls wait where they are (their state is
        kept); other syscalls still apply. Idempotent."""
        self._paused = True

    def sys_pause_when_idle(self) -> Future:
        """pause(wait=True): calls in flight run to their end while generate calls that
        arrive meanwhile are held (they start at resume); then steps stop. Returns a
        Future resolved once paused (at once when nothing is in flight)."""
        future: Future = Future()
        self._drains.append(future)
        self._settle_drains()
        return future

    def _settle_drains(self) -> None:
        """Pauses and resolves the waiting pause(wait=True) callers once no generate or
        score call is in flight. The loop calls it after every step."""
        if not self._drains:
            return
        if any(p.call is not None for p in [*self.procs.values(), *self._scratch.values()]):
            return
        self._paused = True
        drains, self._drains = self._drains, []
        for f in drains:
            f.set_result(None)

    def _release_held(self) -> None:
        """Starts the generate calls held while a pause(wait=True) drained, in arrival
        order; one that cannot start now (its session closed, say) fails alone."""
        held, self._held = self._held, []
        for pid, params, on_token, compiled, outer in held:
            if outer.cancelled():
                continue  # its caller left while it was held
            try:
                inner = self._start_generate(pid, params, on_token, compiled)
            except Exception as e:
                outer.set_exception(e)
                continue
            inner.add_done_callback(lambda f, outer=outer: _chain(f, outer))

    def sys_resume(self) -> None:
        """Runs steps again after pause (not while asleep: wake_up does); a pause(wait=True)
        still draining is called off (its callers return) and held calls start."""
        if self._asleep:
            raise ConflictError("the engine is asleep; wake_up() first")
        drains, self._drains = self._drains, []
        for f in drains:
            f.set_result(None)
        self._release_held()
        self._paused = False

    def sys_abort_all(self) -> int:
        """Ends every generate call in flight now with finish_reason "abort"; the tokens made
        so far, and their KV, stay in the sessions. Returns how many were ended."""
        self._release_held()  # calls held by a draining pause end too
        calls = [p for p in self.procs.values() if isinstance(p.call, GenerateCall)]
        for p in calls:
            self._finish(p, "abort")
        return len(calls)

    def sys_update_weights(self, weights: list[tuple[str, torch.Tensor]], version: int | None,
                           kv_policy: str = "recompute") -> int:
        """Loads HF-named tensors (all or some of the model's) between steps. Returns the new
        weight version (`version`, or the current one plus one).

        kv_policy "recompute": every cached page is stale: sessions and snapshots keep their
        tokens and their KV is recomputed with the new weights when they next run, so no
        token is sampled from KV of old weights. "keep": sessions go on with the KV they
        have (their `kv_version` tells), only the prefix cache is emptied so new sessions
        never share old KV. Raises InvalidRequestError (changing nothing) for an unknown
        name, a wrong shape or a bad policy."""
        if kv_policy not in ("recompute", "keep"):
            raise InvalidRequestError(f"kv_policy must be 'recompute' or 'keep', got {kv_policy!r}")
        if version is not None and (not isinstance(version, int) or version < 0):
            raise InvalidRequestError(f"version must be an integer >= 0, got {version!r}")
        try:
            self.model.update_hf_weights(weights)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        self.weight_version = self.weight_version + 1 if version is None else version
        if kv_policy == "recompute":
            self.memory.drop_all(self._kv_holders())
            for p in [*self.procs.values(), *self._scratch.values()]:
                if p.state is not ProcState.RUNNABLE:
                    p.set_state(self.memory.rest_state(p))
        self.memory.flush_cache(self.weight_version)
        return self.weight_version

    def _kv_holders(self) -> list:
        """Everything that maps pages: sessions, score calls' scratch forks, snapshots."""
        return [*self.procs.values(), *self._scratch.values(), *self.hooks.snapshot_records()]

    def sys_sleep(self, level: int = 1) -> None:
        """Releases the device KV pool: pages move to the host tier while it has room, the
        rest are dropped (recomputed from tokens later); steps stop until wake_up. Level 2
        also moves the weights to host memory (on an accelerator). Idempotent."""
        if level not in (1, 2):
            raise InvalidRequestError(f"level must be 1 or 2, got {level!r}")
        self._paused = self._asleep = True
        self.memory.flush_cache(self.weight_version)
        for h in self.memory.release(self._kv_holders()):
            if isinstance(h, Process):
                h.set_state(self.memory.rest_state(h))
        self.runner.run_copies(self.memory.take_copies())
        self.runner.release_kv(weights=level == 2)

    def sys_reset_prefix_cache(self) -> int:
        """Empties the prefix cache (vLLM's reset_prefix_cache): no later session maps a
        page cached so far; pages mapped now stay with their sessions. Returns how many
        cached pages were forgotten."""
        n = len(self.memory.kalloc.cached)
        self.memory.flush_cache(self.weight_version)
        return n

    def sys_wake_up(self) -> None:
        """Allocates the KV pool again (and brings the weights back) and resumes steps;
        sessions swap in or recompute as they run. Idempotent."""
        if self._asleep:
            self.runner.restore_kv()
            self._asleep = False
        self._paused = False


def _chain(inner: Future, outer: Future) -> None:
    """Hands a held call's result (or error) to the Future its caller waits on."""
    if outer.cancelled():
        return
    if inner.exception() is not None:
        outer.set_exception(inner.exception())
    else:
        outer.set_result(inner.result())
