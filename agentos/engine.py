"""In-process engines: `Engine` (blocking) and `AsyncEngine` (asyncio), one kernel each.

Both implement the typed operations of `agentos.backend`: each operation is built as a
kernel syscall (`_Syscall`: the kernel function, its arguments, what to make of its result)
and submitted to the kernel's loop thread. `Engine` waits for the result; `AsyncEngine`
awaits it, so many coroutines' generate calls run batched together in the same steps.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from agentos.backend import AsyncBackend, Backend, NamedTensors, Op, Operations
from agentos.kernel.config import Config
from agentos.kernel.errors import ContextLengthError, InvalidRequestError, StoreUnavailableError
from agentos.kernel.process import GenerationChunk
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Session, Snapshot

T = TypeVar("T")

DEFAULT_OWNER = "default"  # the tenant of sessions made without one (an open server, the SDK)
# a text longer than this many characters per token of the context is refused untokenized:
# no real text averages near it (about 4 in English), and tokenizing costs per character
MAX_CHARS_PER_TOKEN = 32

# Set by a caller that can answer a retried change without applying it again (the server,
# for a request with an Idempotency-Key): a change applied but not yet durable is then
# returned, and the journal position it waits for appended here, instead of raising.
pending_durable: ContextVar[list[int] | None] = ContextVar("pending_durable", default=None)


def _identity(x):
    return x


@dataclass(slots=True)
class _Syscall(Op[T]):
    """An operation as a kernel syscall: fn(*args) runs in the loop thread; post makes the
    caller's result of what it returned."""

    fn: Callable[..., Any]
    args: tuple
    post: Callable[[Any], T] = _identity
    # the latency label of /metrics (agentos_op_seconds{op=...}); None: not reported (a
    # streamed generate returns before it runs)
    timed: str | None = None
    # it changes sessions or snapshots: with a store it is acknowledged only once the
    # journal has made it durable
    changes: bool = False
    # fn returns a Future (a generate or score call in flight), whose result is awaited
    waits: bool = False
    # an asyncio caller went away while it waited: stop it (a generate keeps its tokens)
    on_cancel: Callable[[], Any] | None = None
    # it only edits the kernel's tables (no device work, no waiting on a step, no I/O):
    # it runs at once in the caller's thread when the loop is between steps (call_now)
    quick: bool = False


class _EngineBase(Operations):
    def __init__(self, model: str = "tiny", **options: Any):
        from agentos.kernel.core import Kernel
        from agentos.kernel.hooks import Hooks
        from agentos.metrics import EngineMetrics
        from agentos.snapshot.durable.store import open_store
        from agentos.snapshot.snapshot import SnapshotTable

        self.config = Config(model=model, **options)
        self.metrics = EngineMetrics()
        self.store = open_store(self.config.store, self.config.deployment)
        if self.store is not None:
            self.store.ping()  # recovery needs it: fail now (StoreUnavailableError), not later
        # the kernel's links up: the journal is set in the loop thread, before recovery
        self.hooks = Hooks(observer=self.metrics)
        self.kernel = Kernel(self.config, self.hooks)
        self.snapshots = SnapshotTable(self.kernel)
        self.hooks.snapshots = self.snapshots  # under memory pressure their pages go first
        self.tokenizer = self.kernel.tokenizer
        self.max_model_len = self.kernel.max_model_len  # context limit in tokens
        self.journal = None
        self.recovered: list[dict] = []  # what was loaded from the store at start
        if self.store is not None:
            from agentos.snapshot.durable.journal import Journal

            self.journal = Journal(self.store, self.config.worker_id)
            try:
                self.recovered = self.kernel.call(self._attach).result()
            except BaseException:
                self.kernel.shutdown()
                self.journal.close()
                raise

    def _attach(self) -> list[dict]:
        """Runs in the loop thread: journal every change from now on, after loading what
        the store holds for this worker."""
        assert self.journal is not None  # called only with a store
        self.hooks.journal = self.snapshots.journal = self.journal
        return self.journal.recover(self.kernel, self.snapshots)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Returns the token ids of text. Raises ContextLengthError, before tokenizing, for
        a text longer than MAX_CHARS_PER_TOKEN characters per token of the context."""
        limit = MAX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) > limit:
            raise ContextLengthError(f"text of {len(text)} characters is over the limit of "
                                     f"{limit} ({MAX_CHARS_PER_TOKEN} per token of the context)")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        """Returns the text of token ids. Raises InvalidRequestError for an id outside the
        model's vocabulary."""
        bad = [t for t in token_ids if not 0 <= t < self.kernel.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.kernel.vocab_size})")
        return self.tokenizer.decode(token_ids)

    def _stream(self) -> _Stream:
        """The chunks of a streamed generate, for this flavour of caller."""
        raise NotImplementedError

    # -- the operations as syscalls ------------------------------------------------------

    def _op_create(self, prompt: str | None, tokens: list[int] | None, seed: int | None,
                   owner: str = DEFAULT_OWNER) -> _Syscall[Session]:
        ids = self._tokens(prompt, tokens, add_special_tokens=True)
        # NOTE: not quick: the loop applies it and starts the prompt's prefill in the same
        # turn, before the caller's next call (usually generate) can arrive, as an agent's
        # next call finds it; and its token checks are as long as the prompt
        return _Syscall(self.kernel.sys_create, (ids, seed, owner), self._session,
                        "create", changes=True)

    def _op_session(self, session_id: str) -> _Syscall[Session]:
        return _Syscall(self.kernel.sys_info, (session_id,),
                        lambda i: self._session(i["id"], i["parent_id"]), quick=True)

    def _op_session_info(self, session_id: str) -> _Syscall[dict]:
        return _Syscall(self.kernel.sys_info, (session_id,), quick=True)

    def _op_list_sessions(self, ids: list[str] | None, owner: str | None) -> _Syscall[list[dict]]:
        return _Syscall(self.kernel.sys_list, (ids, owner), quick=True)

    def _op_num_tokens(self, ids: list[str]) -> _Syscall[int]:
        return _Syscall(self.kernel.sys_num_tokens, (ids,), quick=True)

    def _op_usage(self, owner: str) -> _Syscall[dict]:
        return _Syscall(self._sys_usage, (owner,))

    def _op_append(self, session_id: str, text: str | None,
                   tokens: list[int] | None) -> _Syscall[int]:
        ids = self._tokens(text, tokens, add_special_tokens=False)
        return _Syscall(self.kernel.sys_append, (session_id, ids), timed="append", changes=True)

    def _op_generate(self, session_id: str, params: SamplingParams, stream: bool,
                     append: str | list[int] | None = None,
                     compiled: Any = None) -> _Syscall[Any]:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        ids = None
        if isinstance(append, str):
            ids = self._tokens(append, None, False)
        elif append is not None:
            ids = self._tokens(None, append, False)
        k = self.kernel
        # NOTE: a constraint is compiled here, in the caller's thread, not in the loop
        # (AsyncEngine compiles it on a worker thread first: not on the event loop either)
        grammar = params.constraint
        if grammar is not None and compiled is None:
            compiled = k.grammars.compile(grammar)
        if not stream:
            return _Syscall(k.sys_generate, (session_id, params, None, compiled, ids),
                            timed="generate", changes=True, waits=True,
                            on_cancel=lambda: k.call(k.sys_abort, session_id))
        chunks = self._stream()
        return _Syscall(k.sys_generate, (session_id, params, chunks.on_token, compiled, ids),
                        lambda fut: chunks.attach(fut, lambda: k.call(k.sys_abort, session_id)),
                        changes=True)

    def _op_score(self, session_id: str, text: str | None,
                  tokens: list[int] | None) -> _Syscall[list[float]]:
        ids = self._tokens(text, tokens, add_special_tokens=False)
        return _Syscall(self.kernel.sys_score, (session_id, ids), lambda r: r[0], "score",
                        waits=True)

    def _op_next_token_logprobs(self, session_id: str, top_k: int,
                                candidates: list[int] | None) -> _Syscall[Any]:
        vocab = self.kernel.vocab_size
        if isinstance(candidates, (list, tuple)) and len(candidates) > vocab:
            raise InvalidRequestError(f"{len(candidates)} candidates: at most the vocabulary's "
                                      f"{vocab} tokens")
        return _Syscall(self.kernel.sys_score, (session_id, [], top_k, candidates),
                        lambda r: r[1], "next_token_logprobs", waits=True)

    def _op_fork(self, session_id: str, n: int) -> _Syscall[list[Session]]:
        return _Syscall(self.kernel.sys_fork, (session_id, n),
                        lambda ids: [self._session(c, session_id) for c in ids], "fork",
                        changes=True, quick=True)

    def _op_snapshot(self, session_id: str) -> _Syscall[Snapshot]:
        return _Syscall(self.snapshots.sys_snapshot, (session_id,), self._snapshot_handle,
                        "snapshot", changes=True, quick=True)

    def _op_rollback(self, session_id: str, snapshot_id: str) -> _Syscall[int]:
        # NOTE: another worker's snapshot is read from the store first: not quick
        return _Syscall(self.snapshots.sys_rollback, (session_id, snapshot_id),
                        timed="rollback", changes=True, quick=snapshot_id in self.snapshots.records)

    def _op_close_session(self, session_id: str) -> _Syscall[None]:
        return _Syscall(self.kernel.sys_close, (session_id,), timed="close", changes=True,
                        quick=True)

    def _op_tokens_and_mask(self, session_id: str) -> _Syscall[tuple[list[int], list[int]]]:
        return _Syscall(self.kernel.sys_tokens, (session_id,), quick=True)

    def _op_export(self, session_id: str, kv: bool) -> _Syscall[bytes]:
        return _Syscall(self.snapshots.sys_export, (session_id, kv), timed="export")

    def _op_import(self, data: bytes, owner: str = DEFAULT_OWNER) -> _Syscall[Session]:
        rec = _record(data)
        # NOTE: the record's open constraint compiles here (a 400 when it does not), not in
        # the loop
        compiled = self.kernel.grammars.compile(rec.grammar) if rec.grammar is not None else None
        return _Syscall(self.snapshots.sys_import, (rec, owner, compiled),
                        lambda r: self._session(r[0]), "import", changes=True)

    def _op_adopt(self, ids: list[str]) -> _Syscall[list[dict]]:
        return _Syscall(self._sys_adopt, (list(ids),), changes=True)

    def _op_list_snapshots(self, session_id: str | None,
                           owner: str | None) -> _Syscall[list[Snapshot]]:
        return _Syscall(self.snapshots.sys_list, (session_id, owner),
                        lambda infos: [self._snapshot_handle(i) for i in infos], quick=True)

    def _op_restore(self, snapshot_id: str) -> _Syscall[Session]:
        return _Syscall(self.snapshots.sys_restore, (snapshot_id,), self._session,
                        "restore", changes=True, quick=True)

    def _op_get_snapshot(self, snapshot_id: str) -> _Syscall[Snapshot]:
        return _Syscall(self.snapshots.sys_info, (snapshot_id,), self._snapshot_handle, quick=True)

    def _op_delete_snapshot(self, snapshot_id: str) -> _Syscall[None]:
        return _Syscall(self.snapshots.sys_delete, (snapshot_id,), timed="delete_snapshot",
                        changes=True, quick=True)

    def _op_update_weights(self, named_tensors: NamedTensors, version: int | None,
                           kv_policy: str) -> _Syscall[int]:
        items = list(named_tensors.items() if hasattr(named_tensors, "items") else named_tensors)
        return _Syscall(self.kernel.sys_update_weights, (items, version, kv_policy))

    def _op_pause(self, wait: bool) -> _Syscall[None]:
        if wait:
            return _Syscall(self.kernel.sys_pause_when_idle, (), waits=True)
        return _Syscall(self.kernel.sys_pause, ())

    def _op_resume(self) -> _Syscall[None]:
        return _Syscall(self.kernel.sys_resume, ())

    def _op_reset_prefix_cache(self) -> _Syscall[int]:
        return _Syscall(self.kernel.sys_reset_prefix_cache, ())

    def _op_abort(self) -> _Syscall[int]:
        return _Syscall(self.kernel.sys_abort_all, ())

    def _op_sleep(self, level: int) -> _Syscall[None]:
        return _Syscall(self.kernel.sys_sleep, (level,))

    def _op_wake_up(self) -> _Syscall[None]:
        return _Syscall(self.kernel.sys_wake_up, ())

    def _op_stats(self) -> _Syscall[dict]:
        return _Syscall(self._sys_stats, ())

    def _op_check(self) -> _Syscall[None]:
        return _Syscall(self.snapshots.sys_check, ())

    def _sys_stats(self) -> dict:
        st = self.kernel.sys_stats()
        st["snapshots"] = len(self.snapshots.records)
        if self.journal is not None:
            st["store"] = {"worker_id": self.config.worker_id, "up": self.journal.error is None,
                           "queued_writes": self.journal.recorded - self.journal.durable,
                           "refused_records": len(self.journal.errors), **self.journal.stats}
        return st

    def _sys_usage(self, owner: str) -> dict:
        procs = [p for p in self.kernel.procs.values() if p.owner == owner]
        return {"sessions": len(procs), "tokens": sum(p.num_tokens for p in procs),
                "snapshots": sum(r.owner == owner for r in self.snapshots.records.values())}

    def _sys_adopt(self, ids: list[str]) -> list[dict]:
        if self.journal is None:
            raise InvalidRequestError("this engine has no store to adopt sessions from")
        return self.journal.load(self.kernel, self.snapshots, ids)

    def _timed(self, op: _Syscall, t0: float) -> None:
        if op.timed is not None:
            self.metrics.op_seconds.labels(op.timed).observe(time.perf_counter() - t0)

    def _durable(self, op: _Syscall):
        """The journal when op changes state and there is one (checked first: while the
        store is down, changes are refused before anything is done)."""
        if self.journal is None or not op.changes:
            return None
        self.journal.check()
        return self.journal

    def _session(self, session_id: str, parent_id: str | None = None) -> Session:
        return Session(cast("Backend | AsyncBackend", self), session_id, parent_id)

    def _snapshot_handle(self, info: dict) -> Snapshot:
        return Snapshot(cast("Backend | AsyncBackend", self), info["id"], info["session_id"],
                        info["num_tokens"], info["device_blocks"], info["created_at"],
                        info["host_blocks"], info["owner"])

    def _tokens(self, text: str | None, tokens: list[int] | None, add_special_tokens: bool):
        """The ids of text or tokens. A list longer than the context is refused here, in the
        caller's thread: the loop thread checks every id, which for a list of millions
        held up every session's steps (200 ms for 2M ids)."""
        if (text is None) == (tokens is None):
            raise InvalidRequestError("give exactly one of text/prompt or tokens")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequestError("text must be a string")
            return self.encode(text, add_special_tokens)
        if isinstance(tokens, (list, tuple)) and len(tokens) > self.max_model_len:
            raise ContextLengthError(f"{len(tokens)} tokens exceed the context limit of "
                                     f"{self.max_model_len}")
        return tokens


class Engine(_EngineBase, Backend):
    """The engine in this process. Thread-safe: calls from many threads batch together.

    Use as a context manager, or call close(). Options are those of `Config`.
    """

    def _call(self, op: Op[T]) -> T:
        assert isinstance(op, _Syscall)
        t0 = time.perf_counter()
        journal = self._durable(op)
        result: Any
        done, result = self.kernel.call_now(op.fn, *op.args) if op.quick else (False, None)
        if not done:
            result = self.kernel.call(op.fn, *op.args).result()
        if op.waits:  # generate, score: the call's own completion
            result = result.result()
        if journal is not None:
            journal.sync().result()
        self._timed(op, t0)
        return op.post(result)

    # engine-only operations (the tenant is the server's to say; no HTTP route)

    def create_session(self, prompt: str | None = None, tokens: list[int] | None = None,
                       seed: int | None = None, owner: str = DEFAULT_OWNER) -> Session:
        """As Backend.create_session; `owner` (the tenant) keys its records in the store."""
        return self._call(self._op_create(prompt, tokens, seed, owner))

    def import_session(self, data: bytes, owner: str = DEFAULT_OWNER) -> Session:
        """As Backend.import_session; the new session belongs to `owner`."""
        return self._call(self._op_import(data, owner))

    def adopt(self, ids: list[str]) -> list[dict]:
        """Loads sessions and snapshots by id from the store (a dead worker's, on re-homing):
        their KV is recomputed from tokens when they run. Returns [{"id", "kind",
        "owner"}] of those loaded."""
        return self._call(self._op_adopt(ids))

    def num_tokens(self, ids: list[str]) -> int:
        """Returns the tokens held by those of the sessions `ids` that are live."""
        return self._call(self._op_num_tokens(ids))

    def usage(self, owner: str) -> dict:
        """What the tenant `owner` holds: {"sessions", "tokens", "snapshots"} (live
        sessions, their tokens, live snapshots)."""
        return self._call(self._op_usage(owner))

    def _stream(self) -> _Stream:  # noqa: D102
        return _Stream(self.journal)

    def close(self) -> None:
        self.kernel.shutdown()
        if self.journal is not None:
            self.journal.close()
            self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncEngine(_EngineBase, AsyncBackend):
    """The engine for asyncio code: the same methods, as awaitables.

    `async with AsyncEngine(model="tiny") as engine: ...`
    """

    async def generate(self, session_id: str, params: SamplingParams, stream: bool = False,
                       append: str | list[int] | None = None) -> Any:
        compiled = None
        if isinstance(params, SamplingParams) and (grammar := params.constraint) is not None:
            # a large grammar compiles for tens of milliseconds: not on the event loop
            compiled = await asyncio.to_thread(self.kernel.grammars.compile, grammar)
        if isinstance(append, str) and len(append) > 4096:  # tokenizing it: not on the loop
            append = await self.encode_async(append, False)
        return await self._call(self._op_generate(session_id, params, stream, append, compiled))

    async def _call(self, op: Op[T]) -> T:
        assert isinstance(op, _Syscall)
        t0 = time.perf_counter()
        journal = self._durable(op)
        # NOTE: a quick call runs on the event loop when the loop thread is between steps
        # (tens of microseconds of table edits, less than the handoff it saves); it never
        # waits there for a step to end
        result: Any
        done, result = (self.kernel.call_now(op.fn, *op.args, block=False) if op.quick
                        else (False, None))
        if not done:
            result = await asyncio.wrap_future(self.kernel.call(op.fn, *op.args))
        if op.waits:
            try:
                result = await asyncio.wrap_future(result)
            except asyncio.CancelledError:
                # the caller went away: stop generating, keep the tokens made so far (a
                # score call just runs out)
                if op.on_cancel is not None:
                    op.on_cancel()
                raise
        if journal is not None:
            await self._acknowledge(journal)
        self._timed(op, t0)
        return op.post(result)

    @staticmethod
    async def _acknowledge(journal) -> None:
        """Returns once the changes recorded so far are durable. Raises
        StoreUnavailableError when they cannot be made so now, unless the caller set
        `pending_durable`: then their journal position is added there."""
        target = journal.recorded
        try:
            await asyncio.wrap_future(journal.sync(target))
        except StoreUnavailableError:
            pending = pending_durable.get()
            if pending is None or journal.fenced:
                raise
            pending.append(target)

    async def create_session(self, prompt: str | None = None, tokens: list[int] | None = None,
                             seed: int | None = None, owner: str = DEFAULT_OWNER) -> Session:
        return await self._call(self._op_create(prompt, tokens, seed, owner))

    async def import_session(self, data: bytes, owner: str = DEFAULT_OWNER) -> Session:
        # decoding the record and compiling its constraint: not on the event loop
        return await self._call(await asyncio.to_thread(self._op_import, data, owner))

    async def adopt(self, ids: list[str]) -> list[dict]:
        return await self._call(self._op_adopt(ids))

    async def encode_async(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """As encode, in a worker thread when the text is long, so that tokenizing it does
        not hold up the event loop (every other request of a server)."""
        if len(text) <= 4096:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)

    async def num_tokens(self, ids: list[str]) -> int:
        return await self._call(self._op_num_tokens(ids))

    async def usage(self, owner: str) -> dict:
        return await self._call(self._op_usage(owner))

    def _stream(self) -> _AsyncStream:
        return _AsyncStream(asyncio.get_running_loop(), self.journal)

    async def close(self) -> None:
        await asyncio.to_thread(self.kernel.shutdown)
        if self.journal is not None:
            await asyncio.to_thread(self.journal.close)
            self.store.close()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _record(data: bytes):
    from agentos.snapshot.codec import Record

    if isinstance(data, Record):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequestError("a session record is bytes (from export_session)")
    return Record.unpack(bytes(data))


_END = object()


class _Stream:
    """The chunks of a streamed generate call, handed over from the loop thread as they
    come: an iterator. Closing it (or dropping it) before the call ends aborts the call;
    the tokens made so far stay in the session. Closing is idempotent."""

    def __init__(self, journal=None):
        self._queue: Any = queue.SimpleQueue()
        self._journal = journal  # chunks are handed out once their tokens are durable
        self._fut: Future | None = None
        self._abort: Callable[[], Any] | None = None
        self._finished = False

    def on_token(self, token: int | None, delta: str, logprob: float | None,
                 top: list[tuple[int, float]] | None = None) -> None:
        if token is not None or delta:  # runs in the loop thread
            self._put(GenerationChunk(token, delta, logprob, None, top))

    def _put(self, item) -> None:
        self._queue.put(item)

    def attach(self, fut: Future, abort: Callable[[], Any]) -> _Stream:
        self._fut, self._abort = fut, abort
        fut.add_done_callback(lambda _: self._put(_END))
        return self

    def _chunk(self, item) -> GenerationChunk:
        if item is not _END:
            return item
        self._finished = True
        assert self._fut is not None  # _END comes from the attached call
        return GenerationChunk(None, "", None, self._fut.result().finish_reason)  # or raises

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        if self._finished:
            raise StopIteration
        chunk = self._chunk(self._queue.get())
        if self._journal is not None:
            self._journal.sync().result()
        return chunk

    def close(self) -> None:
        if not self._finished and self._fut is not None:
            self._finished = True
            if not self._fut.done() and self._abort is not None:
                self._abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class _AsyncStream(_Stream):
    """The same as an async iterator: chunks go through the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, journal=None):
        super().__init__(journal)
        self._loop = loop
        self._queue = asyncio.Queue()

    def _put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._finished:
            raise StopAsyncIteration
        chunk = self._chunk(await self._queue.get())
        if self._journal is not None:
            await asyncio.wrap_future(self._journal.sync())
        return chunk

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
