"""The kernel: the process table, the syscall queue and the step loop.

One thread runs the loop. Clients submit syscalls (`call(fn, *args)` returns a Future),
which the loop applies between steps, so every operation sees a consistent state. A
syscall that raises `Defer` is retried after the next step (e.g. a fork waiting for its
parent's prefill, so the children share the prefilled pages). A syscall that only edits
tables may instead run in the caller's thread between two steps (`call_now`, under the
mutex the loop holds for each turn: see syscalls.py).

The kernel owns the processes and their states: a state changes only through
`Process.set_state`, checked against `process.TRANSITIONS`. Its syscalls are in four
files: this one (the loop, the step, sessions), calls.py (generate and score calls),
lifecycle.py (pause, weights, sleep) and views.py (info, lists, stats, KV bytes). It
holds a MemoryManager (memory.py), which owns the pages: allocator, page tables, prefix
cache, swap and eviction. What it knows of the layers above (the journal, the snapshots,
metrics) it is given at construction as hooks (hooks.py).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from agentos.kernel.calls import Calls
from agentos.kernel.config import Config
from agentos.kernel.costs import CostModel, measure_swap
from agentos.kernel.errors import (
    ConflictError,
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    NotFoundError,
    OutOfCapacityError,
)
from agentos.kernel.grammar import Compiler
from agentos.kernel.hooks import Hooks, KernelHooks, KernelJournal
from agentos.kernel.kalloc import BlockAllocator
from agentos.kernel.lifecycle import Lifecycle
from agentos.kernel.machine import Machine, fingerprint, load_machine
from agentos.kernel.memory import MemoryManager
from agentos.kernel.process import GenerateCall, Process, ProcState, ScoreCall
from agentos.kernel.runner.sampler import new_rng
from agentos.kernel.sched import Chunk, form_batch, make_policy
from agentos.kernel.syscalls import Defer, SyscallQueue
from agentos.kernel.views import Views
from agentos.kernel.vm import VM, PageTable


class Kernel(Calls, Lifecycle, Views):
    def __init__(self, config: Config, hooks: KernelHooks | None = None,
                 machine: Machine | None = None, costs: CostModel | None = None):
        """Without a machine: starts the loop thread, which loads the model and allocates
        the KV pools; waits for it and re-raises what loading raised (FileNotFoundError,
        ValueError, ...). With a machine (a simulation): no thread; the caller applies
        syscalls and calls step() itself. `costs` defaults to one measured on the machine.

        NOTE: all of the engine's torch work happens in the loop thread. With OpenMP
        (libgomp), every thread that runs a parallel op keeps its own pool of workers, and
        once the pools hold more threads than there are cores, every parallel op pays a
        sleep/wake handoff: small CPU ops ran 2-3x slower when the model was loaded in
        the caller's thread and run in the loop thread."""
        self.config = config
        self.hooks: KernelHooks = hooks if hooks is not None else Hooks()
        self.syscalls = SyscallQueue()
        self._thread: threading.Thread | None = None
        if machine is not None:
            self._boot(machine, costs)
            return
        ready: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(ready, costs), name="agentos-kernel",
                                        daemon=True)
        self._thread.start()
        ready.result()  # raises the loading error, if any

    def _main(self, ready: Future, costs: CostModel | None) -> None:
        try:
            self._boot(load_machine(self.config), costs)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def _boot(self, m: Machine, costs: CostModel | None) -> None:
        """The kernel's tables and counters over a machine."""
        config = self.config
        self.model, self.model_config, self.tokenizer = m.model, m.model_config, m.tokenizer
        self.runner, self.dtype, self.max_model_len = m.runner, m.dtype, m.max_model_len
        self.block_size, self.block_bytes = config.block_size, m.block_bytes
        self.policy = make_policy(config.scheduler)
        self.procs: dict[str, Process] = {}
        self._scratch: dict[str, Process] = {}  # score calls' forks of sessions, never listed
        self.weight_version = 0  # of the weights loaded now; recorded per generated token
        self._paused = False  # no steps run (pause, sleep); syscalls still apply
        self._asleep = False  # the KV pool is released
        self._drains: list[Future] = []  # pause(wait=True) callers: resolved once paused
        self._held: list[tuple] = []  # generate calls that arrived while draining
        self._fingerprint: tuple[int, str] | None = None
        self.eos_ids = frozenset(m.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.vocab_size = m.model_config.vocab_size
        self.grammars = Compiler(self.tokenizer, self.vocab_size, self.eos_ids)
        self.stats = {"steps": 0, "tokens_generated": 0, "tokens_prefilled": 0, "forks": 0,
                      "step_time_s": 0.0, "tokens_scored": 0, "idle_steps": 0, "swapped_s": 0.0,
                      "sched_s": 0.0}
        self._arrivals = itertools.count()
        self._seeds = new_rng(config.seed)
        self._aborts: dict[str, Process] = {}  # processes whose generate call was aborted
        if costs is None:  # measured before any page is handed out
            n = min(16, m.num_blocks, m.host_blocks)
            costs = CostModel(m.block_bytes, measure_swap(m.runner, n, m.block_bytes))
        self.memory = MemoryManager(config, m.num_blocks, m.host_blocks, m.block_bytes, costs,
                                    self.policy, self.procs, self.hooks.snapshot_records)

    @property
    def kalloc(self) -> BlockAllocator:
        """The memory manager's block allocator (physical pages)."""
        return self.memory.kalloc

    @property
    def vm(self) -> VM:
        """The memory manager's page-table operations (fork, free, remap)."""
        return self.memory.vm

    @property
    def journal(self) -> KernelJournal | None:
        """The journal the hooks give, if any: every change is recorded there."""
        return self.hooks.journal

    @property
    def asleep(self) -> bool:
        """Whether the KV pool is released (sleep): no KV bytes can be read or written."""
        return self._asleep

    # -- syscall plumbing ---------------------------------------------------------------

    def call(self, fn: Callable, *args) -> Future:
        """Queues fn(*args) to run in the loop thread between steps; returns its Future."""
        return self.syscalls.submit(fn, args)

    def call_now(self, fn: Callable, *args, block: bool = True) -> tuple[bool, Any]:
        """Runs fn(*args) in the caller's thread between the loop's steps, unless calls are
        queued (SyscallQueue.try_now; with `block`, after the step in progress; without,
        only if none is): (True, result), raising what fn raised, or (False, None) when it
        did not run (then `call` it). Only for calls that edit the kernel's tables: no
        device work, nothing that waits on a step."""
        if self._thread is None:  # a simulation applies its calls itself
            return False, None
        return self.syscalls.try_now(fn, args, self._commit_and_look, block)

    def _commit_and_look(self) -> bool:
        """After a direct call: commits its journal records; returns whether the loop has
        work to wake up for."""
        self._commit()
        return self.policy.has_work() or bool(self._aborts)

    def shutdown(self) -> None:
        """Stops the loop; pending and in-flight calls fail with EngineClosedError."""
        if self.syscalls.close() and self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        def idle() -> bool:  # read without the mutex (SyscallQueue.wait): atomic reads only
            return self._paused or not self.policy.has_work()

        mutex = self.syscalls.mutex  # see SyscallQueue.try_now
        while True:
            self.syscalls.let_waiters_in()
            if (calls := self.syscalls.wait(idle)) is None:
                break
            with mutex:
                self.syscalls.apply(calls)
                self._commit()  # before the step, so a syscall's answer does not wait for it
                try:
                    if not self._paused:
                        self.step()
                except Exception as e:  # a failed step must not leave callers hanging
                    self._fail_running(e)
                self.syscalls.retry()
                self._settle_drains()
                self._commit()
        error = EngineClosedError("engine is closed")
        with mutex:
            self.syscalls.drain(error)
            for *_, held in self._held:
                held.set_exception(error)
            for p in [*self.procs.values(), *self._scratch.values()]:
                if p.call is not None and not p.call.future.done():
                    p.call.future.set_exception(error)

    def _commit(self) -> None:
        if self.journal is not None:
            self.journal.commit()

    # -- the step -----------------------------------------------------------------------

    def step(self) -> None:
        """Runs one step: ends aborted calls, forms a batch (in the policy's order, memory
        following it), runs it and accounts for it. The loop thread calls it between
        syscalls; a kernel without a thread (a simulation) is stepped by its caller."""
        aborts, self._aborts = self._aborts, {}
        for p in aborts.values():
            if isinstance(p.call, GenerateCall) and p.call.aborted:
                self._finish(p, "abort")
        if not self.policy.has_work():
            return
        t0 = time.perf_counter()
        mem = self.memory.begin_step()
        try:
            chunks, blocked = form_batch(self.policy, self.memory, self.config.max_batch_tokens,
                                         self.config.max_batch_size)
        finally:
            self.stats["sched_s"] += time.perf_counter() - t0
            # decided swaps must happen even if no chunk runs
            self.runner.run_copies(self.memory.take_copies())
        mem.blocked = bool(blocked)
        for p in mem.satisfied:  # all its tokens came from the prefix cache
            self.policy.remove(p)
            p.set_state(self.memory.rest_state(p))
        if not chunks:  # work is queued but nothing could run
            self.stats["idle_steps"] += 1
            self._unblock(blocked)
            return
        self._run(chunks)
        self.policy.on_step(chunks)
        for p, cost in mem.charges:
            self.policy.charge(p, cost)
        self.stats["steps"] += 1
        seconds = time.perf_counter() - t0
        self.memory.costs.observe_step(seconds, chunks)
        self.stats["step_time_s"] += seconds
        if self.hooks.observer is not None:
            self.hooks.observer.step(seconds, len(chunks), sum(c.num_tokens for c in chunks))

    def _run(self, chunks: list[Chunk]) -> None:
        """Runs the batch's chunks and applies what they computed: KV, tokens, scores."""
        now = time.monotonic()
        observer = self.hooks.observer
        for c in chunks:
            p = c.proc
            if p.queued_at is not None:
                if observer is not None:
                    observer.queue_wait(now - p.queued_at)
                p.queue_wait_s += now - p.queued_at
                p.queued_at = None
            if p.resident_steps:
                p.resident_steps -= 1
        outs = self.runner.execute(chunks, self.memory.kalloc.slot)
        for c, out in zip(chunks, outs):
            p = c.proc
            if p.num_cached == 0:
                p.kv_version = self.weight_version
            p.num_cached = c.end
            p.last_active = time.time()
            self.memory.register_full(p, c.start, c.end)
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
                p.set_state(ProcState.RUNNABLE)
            else:
                self.policy.remove(p)
                p.set_state(ProcState.SLEEPING)
                if isinstance(p.call, ScoreCall):
                    self._end_score(p)

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
            p.set_state(self.memory.rest_state(p))

    def _fail_running(self, error: Exception) -> None:
        for p in list(self.policy.order()):
            if p.call is not None:
                self._finish(p, None, error)
            self.policy.remove(p)
            if p.state is not ProcState.ZOMBIE:  # a score call's scratch process is gone
                p.set_state(self.memory.rest_state(p))

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
                    kv_version: int | None, owner: str) -> Process:
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
        """Adds a recovered process, new (EMBRYO) and without pages: it is SWAPPED, its KV
        recomputed when it next runs (it is not queued until it has a call)."""
        assert p.pid not in self.procs and not p.table.num_blocks
        p.set_state(ProcState.SWAPPED)
        self.procs[p.pid] = p

    def fingerprint(self) -> str:
        """A digest of the model's configuration and weights (machine.fingerprint), kept
        until the weights change."""
        if self._fingerprint is None or self._fingerprint[0] != self.weight_version:
            self._fingerprint = (self.weight_version, fingerprint(self.model, self.model_config))
        return self._fingerprint[1]

    def wake(self, p: Process) -> None:
        """Queues p for the scheduler if it has work (a prefill or a generate call)."""
        if p.has_work():
            if p not in self.policy and p.state in (ProcState.SLEEPING, ProcState.SWAPPED):
                self.memory.costs.observe_wake(p)
            p.arrival = next(self._arrivals)
            self.policy.add(p)
            if p.queued_at is None:
                p.queued_at = time.monotonic()
            if p.pid in self.procs:
                self.memory.prefetch(p)
        if p.pid in self.procs and p.table.num_blocks:
            self.memory.track(p)
        p.set_state(self.memory.rest_state(p))

    def rng_for(self, seed: int | None) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return new_rng(seed, self.config.device)

    def sys_create(self, token_ids: list[int], seed: int | None, owner: str) -> str:
        token_ids = self.check_tokens(token_ids)
        if not token_ids:
            raise InvalidRequestError("a session needs at least one token")
        p = self.new_process(array("i", token_ids), array("b", bytes(len(token_ids))), PageTable(), 0,
                             self.rng_for(seed), None, None, owner)
        if self.journal is not None:
            self.journal.created(p)
        return p.pid

    def sys_append(self, pid: str, token_ids: list[int]) -> int:
        p = self.idle_proc(pid)
        return self.append_checked(p, self.check_tokens(token_ids, p.num_tokens))

    def append_checked(self, p: Process, token_ids: list[int]) -> int:
        """Appends ids check_tokens passed (mask 0), journals them and wakes p to prefill."""
        p.token_ids.extend(token_ids)
        p.mask.extend(bytes(len(token_ids)))
        if self.journal is not None:
            self.journal.appended(p, token_ids)
        self.wake(p)
        return p.num_tokens

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
            c.cache_scope = p.cache_scope
            c.grammar = p.grammar.copy() if p.grammar is not None else None
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
        p.set_state(ProcState.ZOMBIE)
        self.memory.register_tail(p)
        self.vm.free(p.table)
        del self.procs[pid]
        self.memory.untrack(p)
        self.stats["swapped_s"] += p.time_swapped(time.monotonic())
        if self.journal is not None:
            self.journal.closed(p)

    def write_kv(self, blocks: torch.Tensor) -> list[int]:
        """New device pages (one reference each) holding `blocks`, KV bytes of shape
        [n, *kv_block_shape]. The caller checks there is room (kalloc.num_free >= n)."""
        pages = self.kalloc.alloc(len(blocks))
        slots = torch.from_numpy(self.kalloc.slot[pages]).to(self.runner.kv.device)
        self.runner.kv[slots] = blocks.to(self.runner.kv.device)
        return pages


def _derive_seed(rng: torch.Generator, salt_a: int, salt_b: int) -> int:
    base = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device))
    return (base ^ (salt_a * 0x9E3779B97F4A7C15) ^ (salt_b * 0xC2B2AE3D27D4EB4F)) % (2**62)
