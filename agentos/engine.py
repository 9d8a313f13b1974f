"""In-process engines: `Engine` (blocking) and `AsyncEngine` (asyncio), one kernel each.

Both turn each public operation into a kernel syscall (see `_prepare`), submitted to the
kernel's loop thread. `Engine` waits for the result; `AsyncEngine` awaits it, so many
coroutines' generate calls run batched together in the same steps.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from agentos.kernel.config import Config
from agentos.kernel.errors import InvalidRequestError
from agentos.kernel.process import GenerationChunk
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Backend, Session, Snapshot

# operations that change sessions or snapshots: with a store they are acknowledged only
# once the journal has made them durable
_CHANGES = frozenset({"create", "append", "generate", "fork", "snapshot", "rollback", "restore",
                      "close", "delete_snapshot", "import", "adopt"})


# operations whose latency /metrics reports (agentos_op_seconds{op=...}); a streamed
# generate returns before it runs, so it is left out
_TIMED = frozenset({"create", "append", "generate", "fork", "snapshot", "rollback", "restore",
                    "close", "delete_snapshot", "export", "import", "score", "next_token_logprobs"})


class _EngineBase(Backend):
    def __init__(self, model: str = "tiny", **options: Any):
        from agentos.kernel.core import Kernel
        from agentos.metrics import EngineMetrics
        from agentos.snapshot.durable.store import open_store
        from agentos.snapshot.snapshot import SnapshotTable

        self.config = Config(model=model, **options)
        self.metrics = EngineMetrics()
        self.store = open_store(self.config.store, self.config.deployment)
        if self.store is not None:
            self.store.ping()  # recovery needs it: fail now (StoreUnavailableError), not later
        self.kernel = Kernel(self.config)
        self.kernel.observer = self.metrics
        self.snapshots = SnapshotTable(self.kernel)
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
        self.kernel.journal = self.snapshots.journal = self.journal
        return self.journal.recover(self.kernel, self.snapshots)

    # the public operations come from Backend; these run here

    def num_tokens(self, ids: list[str]):
        """Returns the tokens held by those of the sessions `ids` that are live."""
        return self._op("num_tokens", ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        """Returns the text of token ids. Raises InvalidRequestError for an id outside the
        model's vocabulary."""
        bad = [t for t in token_ids if not 0 <= t < self.kernel.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.kernel.vocab_size})")
        return self.tokenizer.decode(token_ids)

    # -- syscalls ---------------------------------------------------------------------

    def _prepare(self, name: str, *args) -> tuple[Callable, tuple, Callable[[Any], Any], bool]:
        """Maps an operation to (syscall, args, post-processing of its result, waits): with
        `waits` the syscall returns a Future (a generate call) whose result is awaited
        before post-processing."""
        if name == "generate":
            pid, params, stream = args
            if not isinstance(params, SamplingParams):
                raise InvalidRequestError("params must be a SamplingParams")
            if not stream:
                return self.kernel.sys_generate, (pid, params), _identity, True
            stream = self._stream()
            return (self.kernel.sys_generate, (pid, params, stream.on_token),
                    lambda fut: stream.attach(fut, lambda: self.kernel.call(self.kernel.sys_abort, pid)),
                    False)
        if name in ("score", "next_token_logprobs"):
            if name == "score":
                pid, text, tokens = args
                call_args = (pid, self._tokens(text, tokens, add_special_tokens=False))
                return self.kernel.sys_score, call_args, lambda r: r[0], True
            pid, top_k, candidates = args
            return self.kernel.sys_score, (pid, [], top_k, candidates), lambda r: r[1], True
        return (*self._prepare_plain(name, *args), False)

    def _prepare_plain(self, name: str, *args) -> tuple[Callable, tuple, Callable[[Any], Any]]:
        k, snaps = self.kernel, self.snapshots
        same = _identity
        if name == "create":
            prompt, tokens, seed, *owner = args
            ids = self._tokens(prompt, tokens, add_special_tokens=True)
            return k.sys_create, (ids, seed, *owner), lambda pid: Session(self, pid)
        if name == "export":
            return snaps.sys_export, args, same
        if name == "import":
            data, owner = args
            return snaps.sys_import, (_record(data), owner), lambda r: Session(self, r[0])
        if name == "adopt":
            return self._sys_adopt, args, same
        if name == "append":
            pid, text, tokens = args
            return k.sys_append, (pid, self._tokens(text, tokens, add_special_tokens=False)), same
        if name == "fork":
            pid, n = args
            return k.sys_fork, (pid, n), lambda ids: [Session(self, c, pid) for c in ids]
        if name == "snapshot":
            return snaps.sys_snapshot, args, self._snapshot_handle
        if name == "rollback":
            return snaps.sys_rollback, args, same
        if name == "restore":
            return snaps.sys_restore, args, lambda pid: Session(self, pid)
        if name == "delete_snapshot":
            return snaps.sys_delete, args, same
        if name == "get_snapshot":
            return snaps.sys_info, args, self._snapshot_handle
        if name == "list_snapshots":
            return snaps.sys_list, args, lambda infos: [self._snapshot_handle(i) for i in infos]
        if name == "close":
            return k.sys_close, args, same
        if name == "tokens":
            return k.sys_tokens, args, lambda r: r[0]
        if name == "mask":
            return k.sys_tokens, args, lambda r: r[1]
        if name == "tokens_and_mask":
            return k.sys_tokens, args, same
        if name == "info":
            return k.sys_info, args, same
        if name == "get":
            return k.sys_info, args, lambda i: Session(self, i["id"], i["parent_id"])
        if name == "list":
            return k.sys_list, args, same
        if name == "num_tokens":
            return k.sys_num_tokens, args, same
        if name == "stats":
            return self._sys_stats, args, same
        if name == "check":
            return snaps.sys_check, args, same
        if name == "update_weights":
            weights, version, kv_policy = args
            items = list(weights.items() if hasattr(weights, "items") else weights)
            return k.sys_update_weights, (items, version, kv_policy), same
        if name in ("pause", "resume", "abort", "sleep", "wake_up"):
            fn = {"pause": k.sys_pause, "resume": k.sys_resume, "abort": k.sys_abort_all,
                  "sleep": k.sys_sleep, "wake_up": k.sys_wake_up}[name]
            return fn, args, same
        raise AssertionError(f"unknown operation {name}")

    def _sys_stats(self) -> dict:
        st = self.kernel.sys_stats()
        st["snapshots"] = len(self.snapshots.records)
        if self.journal is not None:
            st["store"] = {"worker_id": self.config.worker_id, "up": self.journal.error is None,
                           "queued_writes": self.journal.recorded - self.journal.durable,
                           "refused_records": len(self.journal.errors), **self.journal.stats}
        return st

    def _sys_adopt(self, ids: list[str]) -> list[dict]:
        if self.journal is None:
            raise InvalidRequestError("this engine has no store to adopt sessions from")
        return self.journal.load(self.kernel, self.snapshots, list(ids))

    # -- engine-only operations (not over HTTP) --------------------------------------------

    def create_session(self, prompt: str | None = None, tokens: list[int] | None = None,
                       seed: int | None = None, owner: str = "default"):
        """As Backend.create_session; `owner` (the tenant) keys its records in the store."""
        return self._op("create", prompt, tokens, seed, owner)

    def import_session(self, data: bytes, owner: str = "default"):
        """As Backend.import_session; the new session belongs to `owner`."""
        return self._op("import", data, owner)

    def adopt(self, ids: list[str]):
        """Loads sessions and snapshots by id from the store (a dead worker's, on re-homing):
        their KV is recomputed from tokens when they run. Returns [{"id", "kind",
        "owner"}] of those loaded."""
        return self._op("adopt", ids)

    def _timed(self, name: str, t0: float, waited: bool) -> None:
        if name in _TIMED and (waited or name != "generate"):
            self.metrics.op_seconds.labels(name).observe(time.perf_counter() - t0)

    def _durable(self, name: str):
        """The journal when `name` changes state and there is one (checked first: while
        the store is down, changes are refused before anything is done)."""
        if self.journal is None or name not in _CHANGES:
            return None
        self.journal.check()
        return self.journal

    def _snapshot_handle(self, info: dict) -> Snapshot:
        return Snapshot(self, info["id"], info["session_id"], info["num_tokens"],
                        info["device_blocks"], info["created_at"], info["host_blocks"])

    def _tokens(self, text: str | None, tokens: list[int] | None, add_special_tokens: bool):
        if (text is None) == (tokens is None):
            raise InvalidRequestError("give exactly one of text/prompt or tokens")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequestError("text must be a string")
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return tokens


class Engine(_EngineBase):
    """The engine in this process. Thread-safe: calls from many threads batch together.

    Use as a context manager, or call close(). Options are those of `Config`.
    """

    def _op(self, name: str, *args):
        t0 = time.perf_counter()
        fn, call_args, post, waits = self._prepare(name, *args)
        journal = self._durable(name)
        result = self.kernel.call(fn, *call_args).result()
        if waits:  # generate: the call's own completion
            result = result.result()
        if journal is not None:
            journal.sync().result()
        self._timed(name, t0, waits)
        return post(result)

    def _stream(self) -> _Stream:
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


class AsyncEngine(_EngineBase):
    """The engine for asyncio code: the same methods, as awaitables.

    `async with AsyncEngine(model="tiny") as engine: ...`
    """

    is_async = True

    def _op(self, name: str, *args):
        return self._run(name, *args)

    async def _run(self, name: str, *args):
        t0 = time.perf_counter()
        fn, call_args, post, waits = self._prepare(name, *args)
        journal = self._durable(name)
        result = await asyncio.wrap_future(self.kernel.call(fn, *call_args))
        if waits:
            try:
                result = await asyncio.wrap_future(result)
            except asyncio.CancelledError:
                # the caller went away: stop generating, keep the tokens made so far (a
                # score call just runs out)
                if name == "generate":
                    self.kernel.call(self.kernel.sys_abort, call_args[0])
                raise
        if journal is not None:
            await asyncio.wrap_future(journal.sync())
        self._timed(name, t0, waits)
        return post(result)

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


def _identity(x):
    return x


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

    def on_token(self, token: int | None, delta: str, logprob: float | None) -> None:
        if token is not None or delta:  # runs in the loop thread
            self._put(GenerationChunk(token, delta, logprob))

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
            if not self._fut.done():
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
