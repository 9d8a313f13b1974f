"""The kernel: the process table, the syscall queue and the step loop.

One thread runs the loop. Clients never touch kernel state: they submit syscalls
(`call(fn, *args)` returns a Future) which the loop applies between steps, so every
operation sees a consistent state and needs no locks. A syscall that raises `Defer` is
retried after the next step (e.g. a fork waiting for its parent's prefill to finish, so
the children share the prefilled pages instead of each computing them).

The Kernel is one object in three files: this one (the loop, the step, the process
syscalls), paging.py (memory for the scheduler: prefix cache, reserve, make room) and
lifecycle.py (pause, abort, weights, sleep).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import psutil
import torch

from agentos.kernel.config import Config
from agentos.kernel.errors import (
    ConflictError,
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    NotFoundError,
    OutOfCapacityError,
)
from agentos.kernel.kalloc import HOST, BlockAllocator
from agentos.kernel.lifecycle import Lifecycle
from agentos.kernel.paging import Paging
from agentos.kernel.process import GenerateCall, Generation, Process, ProcState, ScoreCall
from agentos.kernel.runner.loader import load_model
from agentos.kernel.runner.model_runner import ModelRunner
from agentos.kernel.runner.sampler import new_rng
from agentos.kernel.runner.tokenizer import IncrementalDetokenizer
from agentos.kernel.sampling_params import SamplingParams
from agentos.kernel.sched import form_batch, make_policy
from agentos.kernel.vm import VM, PageTable

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Defer(Exception):
    """Raised by a syscall that must wait for the next step; it is retried then."""


class Kernel(Paging, Lifecycle):
    def __init__(self, config: Config):
        """Starts the loop thread, which loads the model and allocates the KV pools; waits
        for it and re-raises what loading raised (FileNotFoundError, ValueError, ...).

        NOTE: all of the engine's torch work happens in the loop thread. With OpenMP
        (libgomp), every thread that runs a parallel op keeps its own pool of workers, and
        once the pools hold more threads than there are cores, every parallel op pays a
        sleep/wake handoff: small CPU ops ran 2-3x slower when the model was loaded in
        the caller's thread and run in the loop thread."""
        self.config = config
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._deferred: list[tuple[Callable, tuple, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        ready: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="agentos-kernel",
                                        daemon=True)
        self._thread.start()
        ready.result()  # raises the loading error, if any

    def _main(self, ready: Future) -> None:
        try:
            self._init()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def _init(self) -> None:
        config = self.config
        dtype = _DTYPES[config.dtype] if config.dtype else None
        self.model, self.model_config, self.tokenizer = load_model(config.model, config.device, dtype)
        self.dtype = next(self.model.parameters()).dtype
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.block_size = config.block_size
        self.block_bytes = ModelRunner.block_bytes(self.model, self.block_size, self.dtype)
        num_blocks = config.kv_blocks or self._auto_kv_blocks()
        host_blocks = config.host_blocks if config.host_blocks is not None else self._auto_host_blocks()
        self.kalloc = BlockAllocator(num_blocks, host_blocks)
        self.vm = VM(self.kalloc, config.block_size)
        if config.deterministic:
            from agentos.kernel.runner.batch_invariant import make_batch_invariant

            make_batch_invariant(self.model)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, config.device, self.dtype,
                                  host_blocks, config.deterministic, config.cuda_graphs,
                                  config.max_batch_size, self.max_model_len)
        self._init_state()

    def _init_state(self) -> None:
        """The kernel's tables and counters, once the model, the allocator and the runner
        are in place (a simulation supplies its own: agentos/bench/simulate.py)."""
        config, mc = self.config, self.model_config
        self.policy = make_policy(config.scheduler)
        self.procs: dict[str, Process] = {}
        self._scratch: dict[str, Process] = {}  # score calls' forks of sessions, never listed
        self.weight_version = 0  # of the weights loaded now; recorded per generated token
        self._paused = False  # no steps run (pause, sleep); syscalls still apply
        self._asleep = False  # the KV pool is released
        self.snapshots = None  # the SnapshotTable, once one is attached: its pages can be swapped
        self.journal = None  # the Journal, once one is attached: every change is recorded there
        # told each step's time and size and each queue wait (metrics), when set
        self.observer = None
        self._fingerprint: tuple[int, str] | None = None
        self.eos_ids = frozenset(mc.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.vocab_size = mc.vocab_size
        self.stats = {"steps": 0, "tokens_generated": 0, "tokens_prefilled": 0, "forks": 0,
                      "cow_copies": 0, "step_time_s": 0.0, "swap_out_blocks": 0,
                      "swap_in_blocks": 0, "dropped_blocks": 0, "prefix_hit_tokens": 0,
                      "tokens_scored": 0, "idle_steps": 0, "preemptions": 0,
                      "prefetched_blocks": 0, "swapped_s": 0.0, "sched_s": 0.0}
        self._arrivals = itertools.count()
        self._seeds = new_rng(config.seed)
        # per-step memory work: block copies in the order decided, pins on the pages of the
        # batch (never victims), victims not yet tried, blocks being computed this step
        self._copies: list[tuple[str, list[tuple[int, int]]]] = []
        self._batch: list[Process] = []  # processes granted memory in the step being formed
        self._satisfied: list[Process] = []  # queued processes the prefix cache left no work
        self._pinned = False  # whether _pins is kept for this step (memory ran short)
        self._pins = np.zeros(len(self.kalloc.refcount), dtype=np.int32)
        self._victims: list | None = None
        self._inflight: set[bytes] = set()
        self._aborts: dict[str, Process] = {}  # processes whose generate call was aborted
        self._init_costs()

    def _auto_kv_blocks(self) -> int:
        per_block = self.block_bytes
        if self.config.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.config.device))
            budget = int(free * 0.85)
        else:
            budget = min(2 << 30, psutil.virtual_memory().available // 4)
        return max(16, budget // per_block)

    def _auto_host_blocks(self) -> int:
        """Host swap tier from available RAM: a quarter of it, at most 16 GiB on CUDA
        (pinned memory is taken up front) and 4 GiB on CPU (where the device tier is RAM
        too, and both are touched lazily)."""
        cap = (16 << 30) if self.config.device.startswith("cuda") else (4 << 30)
        return min(cap, psutil.virtual_memory().available // 4) // self.block_bytes

    # -- syscall plumbing ---------------------------------------------------------------

    def call(self, fn: Callable, *args) -> Future:
        """Queues fn(*args) to run in the loop thread between steps; returns its Future."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                fut.set_exception(EngineClosedError("engine is closed"))
                return fut
            self._calls.append((fn, args, fut))
            self._cv.notify()
        return fut

    def shutdown(self) -> None:
        """Stops the loop; pending and in-flight calls fail with EngineClosedError."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._calls and not self._closed and (
                        self._paused or not self.policy.has_work()):
                    self._cv.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, args, fut in calls:
                self._apply(fn, args, fut)
            self._commit()  # before the step, so a syscall's answer does not wait for it
            try:
                if not self._paused:
                    self._step()
            except Exception as e:  # a failed step must not leave callers hanging
                self._fail_running(e)
            if self._deferred:
                retry, self._deferred = self._deferred, []
                for fn, args, fut in retry:
                    self._apply(fn, args, fut)
            self._commit()
        self._drain(EngineClosedError("engine is closed"))

    def _commit(self) -> None:
        if self.journal is not None:
            self.journal.commit()

    def _apply(self, fn, args, fut: Future) -> None:
        if fut.cancelled():
            return
        try:
            result = fn(*args)
        except Defer:
            self._deferred.append((fn, args, fut))
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            fut.set_exception(e)
        else:
            fut.set_result(result)

    def _drain(self, error: Exception) -> None:
        with self._cv:
            pending = list(self._calls) + self._deferred
            self._calls.clear()
            self._deferred = []
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(error)
        for p in [*self.procs.values(), *self._scratch.values()]:
            if p.call is not None and not p.call.future.done():
                p.call.future.set_exception(error)

    # -- the step -----------------------------------------------------------------------

    def _step(self) -> None:
        aborts, self._aborts = self._aborts, {}
        for p in aborts.values():
            if isinstance(p.call, GenerateCall) and p.call.aborted:
                self._finish(p, "abort")
        if not self.policy.has_work():
            return
        t0 = time.perf_counter()
        self._batch = []
        self._satisfied = []
        self._pinned = False
        self._victims = None
        self._inflight.clear()
        try:
            chunks, blocked = form_batch(self.policy, self, self.config.max_batch_tokens,
                                         self.config.max_batch_size)
        finally:
            self.stats["sched_s"] += time.perf_counter() - t0
            copies, self._copies = self._copies, []
            self.runner.run_copies(copies)  # decided swaps must happen even if no chunk runs
        self._short = bool(blocked)
        for p in self._satisfied:  # all its tokens came from the prefix cache
            self.policy.remove(p)
            p.state = self._rest_state(p)
        if not chunks:  # work is queued but nothing could run
            self.stats["idle_steps"] += 1
            self._unblock(blocked)
            return
        now = time.monotonic()
        for c in chunks:
            p = c.proc
            if p.queued_at is not None:
                if self.observer is not None:
                    self.observer.queue_wait(now - p.queued_at)
                p.queue_wait_s += now - p.queued_at
                p.queued_at = None
            if p.resident_steps:
                p.resident_steps -= 1
        outs = self.runner.execute(chunks, self.kalloc.slot)
        for c, out in zip(chunks, outs):
            p = c.proc
            if p.num_cached == 0:
                p.kv_version = self.weight_version
            p.num_cached = c.end
            p.last_active = time.time()
            self._register_full(p, c.start, c.end)
            if isinstance(p.call, ScoreCall):
                self.stats["tokens_scored"] += c.num_tokens
                if out is not None:
                    self._on_score(p, *out)
            elif c.sample:
                self.stats["tokens_generated"] += 1
                self.stats["tokens_prefilled"] += c.num_tokens - 1  # positions before the sampled one
                try:
                    self._on_token(p, *out)
                except Exception as e:  # e.g. a streaming callback that broke: this call only
                    if p.call is not None:
                        self._finish(p, None, e)
            else:
                self.stats["tokens_prefilled"] += c.num_tokens
            if p.has_work():
                p.state = ProcState.RUNNABLE
            else:
                self.policy.remove(p)
                p.state = ProcState.SLEEPING
                if isinstance(p.call, ScoreCall):
                    self._end_score(p)
        self.policy.on_step(chunks)
        charges, self._charges = self._charges, []
        for p, cost in charges:
            self.policy.charge(p, cost)
        self.stats["steps"] += 1
        seconds = time.perf_counter() - t0
        self._observe_step(seconds, chunks)
        self.stats["step_time_s"] += seconds
        if self.observer is not None:
            self.observer.step(seconds, len(chunks), sum(c.num_tokens for c in chunks))

    def _rest_state(self, p: Process) -> ProcState:
        """The state of a process that is not running: EMBRYO until it first ran, SWAPPED
        while some of its KV is on the host or dropped, else RUNNABLE or SLEEPING."""
        if p.state is ProcState.EMBRYO and p.num_cached == 0:
            return ProcState.EMBRYO
        if p.num_cached == 0 or len(self.vm.nonresident(p.table)):
            return ProcState.SWAPPED
        return ProcState.RUNNABLE if p.has_work() else ProcState.SLEEPING

    def _unblock(self, blocked: list[Process]) -> None:
        # NOTE: nothing could run and nothing is running, so no memory will come back by
        # waiting: fail the oldest generate call, park pure prefills until asked again.
        for p in blocked:
            if p.call is not None:
                self._finish(p, None, OutOfCapacityError(
                    f"out of KV blocks: session {p.pid} needs more than the "
                    f"{self.kalloc.num_free} free of {self.kalloc.num_blocks}"))
                return
            self.policy.remove(p)
            p.state = self._rest_state(p)

    def _fail_running(self, error: Exception) -> None:
        for p in list(self.policy.order()):
            if p.call is not None:
                self._finish(p, None, error)
            self.policy.remove(p)
            p.state = self._rest_state(p)

    def _on_token(self, p: Process, token: int, logprob: float) -> None:
        call = p.call
        p.token_ids.append(token)
        p.mask.append(1)
        p.num_generated += 1
        if not p.weight_runs or p.weight_runs[-1][1] != self.weight_version:
            p.weight_runs.append((p.num_tokens - 1, self.weight_version))
        call.tokens.append(token)
        call.weight_versions.append(self.weight_version)
        if self.journal is not None:
            self.journal.generated(p, token, not call.params.greedy, self.weight_version)
        if call.params.logprobs:
            call.logprobs.append(logprob)
        searched = len(call.text)
        call.text += call.detok.push(token)
        reason = None
        if token in call.stop_ids or call.params.stop and _cut_at_stop(call, searched):
            reason = "stop"
        elif len(call.tokens) >= call.params.max_tokens or p.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None and not call.stopped_by_string:
            call.text += call.detok.flush()
        if call.on_token is not None:
            call.on_token(token, _emit(call, final=reason is not None), logprob)
        if reason:
            self._finish(p, reason)

    def _finish(self, p: Process, reason: str | None, error: Exception | None = None) -> None:
        """Ends p's generate call with reason, waking its caller. With an error the call
        is undone instead (its tokens dropped, the RNG restored) and the caller gets it."""
        if isinstance(p.call, ScoreCall):
            self._end_score(p, error)
            return
        call, p.call = p.call, None
        if error is not None:
            del p.token_ids[call.start_len :]
            del p.mask[call.start_len :]
            p.num_generated -= len(call.tokens)
            p.num_cached = min(p.num_cached, call.start_len - 1)
            self.vm.truncate(p.table, p.num_cached)
            p.rng.set_state(call.start_rng)
            p.weight_runs = [r for r in p.weight_runs if r[0] < call.start_len]
        if self.journal is not None:
            self.journal.call_ended(p, sampled=not call.params.greedy and bool(call.tokens),
                                    undone=error is not None)
        if p.has_work():
            self.policy.add(p)
        else:
            self.policy.remove(p)
        p.state = self._rest_state(p)
        if error is not None:
            call.future.set_exception(error)
            return
        if reason == "abort":
            call.text += call.detok.flush()
            if call.on_token is not None:
                call.on_token(None, _emit(call, final=True), None)
        logprobs = list(call.logprobs) if call.params.logprobs else None
        call.future.set_result(Generation(list(call.tokens), call.text, logprobs, reason,
                                          list(call.weight_versions)))

    # -- syscalls (run in the loop thread) ---------------------------------------------

    def proc(self, pid: str) -> Process:
        p = self.procs.get(pid)
        if p is None:
            raise NotFoundError(f"no session {pid!r}")
        return p

    def idle_proc(self, pid: str) -> Process:
        """The process, if it is not generating (else ConflictError)."""
        p = self.proc(pid)
        if p.call is not None:
            raise ConflictError(f"session {pid!r} is generating; wait for it or close it")
        return p

    def check_tokens(self, token_ids: list[int], num_existing: int = 0) -> list[int]:
        if not isinstance(token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise InvalidRequestError("tokens must be a list of integers")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if num_existing + len(token_ids) > self.max_model_len:
            raise ContextLengthError(
                f"{num_existing + len(token_ids)} tokens exceed the context limit of "
                f"{self.max_model_len}")
        return list(token_ids)

    def new_process(self, token_ids: array, mask: array, table: PageTable,
                    num_cached: int, rng: torch.Generator, parent_id: str | None,
                    kv_version: int | None = None, owner: str = "default") -> Process:
        """A new process (given the KV of its first num_cached tokens, computed with weights
        kv_version, default the current ones), queued if it has work."""
        p = Process(pid="sess_" + uuid.uuid4().hex[:16], token_ids=token_ids, mask=mask,
                    table=table, rng=rng, parent_id=parent_id, num_cached=num_cached,
                    kv_version=self.weight_version if kv_version is None else kv_version,
                    owner=owner)
        self.procs[p.pid] = p
        self.wake(p)
        return p

    def install(self, p: Process) -> None:
        """Adds a recovered process as it is (its KV, if any, is recomputed when it next
        runs: it is not queued until it has a call)."""
        assert p.pid not in self.procs
        self.procs[p.pid] = p

    def fingerprint(self) -> str:
        """A digest of the model's configuration and weights (a strided sample of every
        tensor): KV bytes from another engine are used only when it matches."""
        if self._fingerprint is None or self._fingerprint[0] != self.weight_version:
            import dataclasses
            import hashlib

            h = hashlib.sha256(repr(sorted(dataclasses.asdict(self.model_config).items())).encode())
            for name, t in self.model.state_dict().items():
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                h.update(name.encode())
                h.update(repr(tuple(t.shape)).encode())
                h.update(flat[::step].float().cpu().numpy().tobytes())
            self._fingerprint = (self.weight_version, h.hexdigest()[:32])
        return self._fingerprint[1]

    def wake(self, p: Process) -> None:
        """Queues p for the scheduler if it has work (a prefill or a generate call)."""
        if p.has_work():
            if p not in self.policy and p.state in (ProcState.SLEEPING, ProcState.SWAPPED):
                self._observe_wake(p)
            p.arrival = next(self._arrivals)
            self.policy.add(p)
            if p.queued_at is None:
                p.queued_at = time.monotonic()
            if p.pid in self.procs:
                self.prefetch(p)
        if p.pid in self.procs and p.table.num_blocks:
            self._resident[p.pid] = p  # it may map device pages (a fork's, a snapshot's)
        p.state = self._rest_state(p)

    def rng_for(self, seed: int | None) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return new_rng(seed, self.config.device)

    def sys_create(self, token_ids: list[int], seed: int | None, owner: str = "default") -> str:
        token_ids = self.check_tokens(token_ids)
        if not token_ids:
            raise InvalidRequestError("a session needs at least one token")
        p = self.new_process(array("i", token_ids), array("b", bytes(len(token_ids))), PageTable(), 0,
                             self.rng_for(seed), None, owner=owner)
        if self.journal is not None:
            self.journal.created(p)
        return p.pid

    def sys_append(self, pid: str, token_ids: list[int]) -> int:
        p = self.idle_proc(pid)
        token_ids = self.check_tokens(token_ids, p.num_tokens)
        p.token_ids.extend(token_ids)
        p.mask.extend(bytes(len(token_ids)))
        if self.journal is not None:
            self.journal.appended(p, token_ids)
        self.wake(p)
        return p.num_tokens

    def sys_generate(self, pid: str, params: SamplingParams,
                     on_token: Callable[[int, str, float | None], None] | None = None) -> Future:
        p = self.idle_proc(pid)
        if p.num_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"session {pid!r} holds {p.num_tokens} tokens, the context limit is "
                f"{self.max_model_len}: nothing can be generated")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop token id {bad[0]} is outside the vocabulary")
        start_rng = p.rng.get_state()
        if params.seed is not None:
            p.rng.manual_seed(params.seed)
            if self.journal is not None:
                self.journal.reseeded(p)
        if p.num_cached >= p.num_tokens:  # the last token's logits are needed: recompute it
            p.num_cached = p.num_tokens - 1
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                        else self.eos_ids)
        p.call = GenerateCall(params=params, future=Future(), stop_ids=stop_ids,
                              detok=IncrementalDetokenizer(self.tokenizer), on_token=on_token,
                              start_len=p.num_tokens, start_rng=start_rng)
        self.wake(p)
        return p.call.future

    def sys_abort(self, pid: str) -> None:
        """Ends the session's generate call at the next step; tokens so far are kept."""
        p = self.procs.get(pid)
        if p is not None and p.call is not None:
            p.call.aborted = True
            self._aborts[pid] = p

    def sys_score(self, pid: str, token_ids: list[int], top_k: int = 0,
                  candidates: list[int] | None = None) -> Future:
        """Scores a continuation of the session without changing it: a scratch fork of the
        session (sharing its pages; its own tokens past them) computes the continuation's
        KV and logits, then is freed. Returns a Future of (logprob of each given token,
        NextTokenLogprobs after them or None). Waits (Defer) for the session's prefill.
        Raises InvalidRequestError / ContextLengthError / ConflictError; changes nothing."""
        p = self.idle_proc(pid)
        token_ids = self.check_tokens(token_ids, p.num_tokens)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {top_k!r}")
        if candidates is not None:
            candidates = self.check_tokens(candidates)
        if not token_ids and not top_k and candidates is None:
            raise InvalidRequestError("nothing to score: give tokens, or top_k or candidates")
        if p.has_work() and p in self.policy:
            raise Defer  # share the session's prefilled pages
        fut: Future = Future()
        # NOTE: logits are not kept, so the session's last position is computed again (into
        # a copy of its block when it is cached)
        s = Process(pid="score_" + uuid.uuid4().hex[:16], token_ids=p.token_ids + array("i", token_ids),
                    mask=p.mask + array("b", bytes(len(token_ids))), table=self.vm.fork(p.table),
                    rng=p.rng, parent_id=p.pid, num_cached=min(p.num_cached, p.num_tokens - 1),
                    kv_version=p.kv_version)
        s.call = ScoreCall(fut, p.num_tokens, top_k, candidates)
        self._scratch[s.pid] = s
        self.wake(s)
        return fut

    def _on_score(self, p: Process, logprobs: list[float], dist) -> None:
        p.call.logprobs.extend(logprobs)
        if dist is not None:
            p.call.dist = dist

    def _end_score(self, p: Process, error: Exception | None = None) -> None:
        """Ends a score call: frees its scratch process and wakes the caller."""
        call, p.call = p.call, None
        self.policy.remove(p)
        p.state = ProcState.ZOMBIE
        self.vm.free(p.table)
        del self._scratch[p.pid]
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result((call.logprobs, call.dist))

    def sys_fork(self, pid: str, n: int) -> list[str]:
        if not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"n must be an integer >= 1, got {n!r}")
        p = self.idle_proc(pid)
        if p.has_work() and p in self.policy:
            raise Defer  # let the prefill finish so the children share its pages
        children = []
        state = p.rng.get_state()
        for i in range(n):
            rng = torch.Generator(device=self.config.device)
            rng.set_state(state)
            # NOTE: children draw distinct random streams, derived from the parent's state
            # NOTE: from the session's own state and counters, never the engine's, so a
            # recovered session forks exactly as the uninterrupted one would
            rng.manual_seed(_derive_seed(rng, p.num_generated, p.num_forks + i))
            c = self.new_process(p.token_ids[:], p.mask[:], self.vm.fork(p.table),
                                 p.num_cached, rng, p.pid, p.kv_version, p.owner)
            c.weight_runs = p.weight_runs[:]
            children.append(c)
        self.stats["forks"] += n
        p.num_forks += n
        if self.journal is not None:
            self.journal.forked(p, children)
        return [c.pid for c in children]

    def sys_close(self, pid: str) -> None:
        p = self.proc(pid)
        if p.call is not None:
            self._finish(p, "abort")
        self.policy.remove(p)
        p.state = ProcState.ZOMBIE
        self.vm.free(p.table)
        del self.procs[pid]
        self._resident.pop(pid, None)
        self.stats["swapped_s"] += p.time_swapped(time.monotonic())
        if self.journal is not None:
            self.journal.closed(p)

    def page_tables(self) -> list[PageTable]:
        """The page tables of every live session and score call (snapshots hold others)."""
        return [p.table for p in self.procs.values()] + [p.table for p in self._scratch.values()]

    def sys_tokens(self, pid: str) -> tuple[list[int], list[int]]:
        p = self.proc(pid)
        return p.token_ids.tolist(), p.mask.tolist()

    def sys_info(self, pid: str) -> dict[str, Any]:
        return self.info(self.proc(pid))

    def info(self, p: Process) -> dict[str, Any]:
        host = int((self.kalloc.tier[p.table.block_ids] == HOST).sum())
        state = p.state
        if host and state in (ProcState.SLEEPING, ProcState.RUNNABLE):
            state = ProcState.SWAPPED  # pages it shares went out with another session's
        return {
            "id": p.pid, "parent_id": p.parent_id, "state": state.value, "level": p.level,
            "num_tokens": p.num_tokens, "num_cached": p.num_cached,
            "num_generated": p.num_generated, "device_blocks": p.table.num_blocks - host,
            "host_blocks": host, "created_at": p.created_at, "last_active": p.last_active,
            "kv_version": p.kv_version if p.num_cached else self.weight_version,
            "owner": p.owner, **self._paging_info(p, time.monotonic()),
        }

    @staticmethod
    def _paging_info(p: Process, now: float) -> dict[str, Any]:
        wait = p.queue_wait_s + (now - p.queued_at if p.queued_at is not None else 0.0)
        return {"swap_count": p.swap_count, "swapped_s": p.time_swapped(now),
                "queue_wait_s": wait}

    def sys_list(self, pids: list[str] | None = None) -> list[dict[str, Any]]:
        """Info of every live session, or of those of `pids` that are live."""
        if pids is None:
            return [self.info(p) for p in self.procs.values()]
        return [self.info(self.procs[pid]) for pid in pids if pid in self.procs]

    def sys_num_tokens(self, pids: list[str]) -> int:
        """Tokens held by those of `pids` that are live."""
        return sum(len(self.procs[pid].token_ids) for pid in pids if pid in self.procs)

    def sys_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        by_state: dict[str, int] = {}
        for p in self.procs.values():
            by_state[p.state.value] = by_state.get(p.state.value, 0) + 1
        by_level: dict[str, int] = {}
        for p in self.policy.order():
            by_level[str(p.level)] = by_level.get(str(p.level), 0) + 1
        all_levels: dict[str, int] = {}
        for p in self.procs.values():
            all_levels[str(p.level)] = all_levels.get(str(p.level), 0) + 1
        k = self.kalloc
        return {
            "kv": {"device_blocks_total": k.num_blocks, "device_blocks_used": k.num_used,
                   "device_blocks_cached": len(k.lru), "host_blocks_total": k.host.num_slots,
                   "host_blocks_used": k.host.num_used, "block_size": self.block_size,
                   "block_bytes": self.block_bytes, "prefix_cache_blocks": len(k.cached),
                   "prefix_cache_evictions": k.evictions},
            "sessions": {"total": len(self.procs), "by_state": by_state, "by_level": all_levels},
            "scheduler": self.policy.name,
            "queue": {"runnable": sum(by_level.values()), "by_level": by_level},
            "weight_version": self.weight_version, "paused": self._paused, "asleep": self._asleep,
            **{k: v for k, v in self.stats.items()},
            # over every session, closed ones included: seconds spent off the device
            "swapped_s": self.stats["swapped_s"] + sum(
                p.time_swapped(now) for p in self.procs.values()),
        }


def _derive_seed(rng: torch.Generator, salt_a: int, salt_b: int) -> int:
    base = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device))
    return (base ^ (salt_a * 0x9E3779B97F4A7C15) ^ (salt_b * 0xC2B2AE3D27D4EB4F)) % (2**62)


def _cut_at_stop(call: GenerateCall, searched: int) -> bool:
    """Ends the text at the earliest stop string, if one has appeared. Returns whether."""
    stop = call.params.stop
    start = max(0, searched - max(len(s) for s in stop) + 1)  # a new match ends past `searched`
    hits = [i for i in (call.text.find(s, start) for s in stop) if i >= 0]
    if not hits:
        return False
    call.text = call.text[: min(hits)]
    call.stopped_by_string = True
    return True


def _emit(call: GenerateCall, final: bool) -> str:
    """The text delta safe to stream now: held back while it could start a stop string."""
    hold = 0 if final or not call.params.stop else max(len(s) for s in call.params.stop) - 1
    upto = max(len(call.text) - hold, call.emitted)
    delta = call.text[call.emitted : upto]
    call.emitted = upto
    return delta
