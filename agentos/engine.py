"""In-process engines: `Engine` (blocking) and `AsyncEngine` (asyncio), one kernel each.

Both turn each public operation into a kernel syscall (see `_prepare`), submitted to the
kernel's loop thread. `Engine` waits for the result; `AsyncEngine` awaits it, so many
coroutines' generate calls run batched together in the same steps.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from agentos.kernel.config import Config
from agentos.kernel.errors import InvalidRequestError
from agentos.kernel.process import GenerationChunk
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Backend, Session, Snapshot


class _EngineBase(Backend):
    def __init__(self, model: str = "tiny", **options: Any):
        from agentos.kernel.core import Kernel
        from agentos.snapshot.snapshot import SnapshotTable

        self.config = Config(model=model, **options)
        self.kernel = Kernel(self.config)
        self.snapshots = SnapshotTable(self.kernel)
        self.tokenizer = self.kernel.tokenizer
        self.max_model_len = self.kernel.max_model_len  # context limit in tokens

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
            sink = self._sink()
            return (self.kernel.sys_generate, (pid, params, sink.on_token),
                    lambda fut: sink.iterate(fut, lambda: self.kernel.call(self.kernel.sys_abort, pid)),
                    False)
        return (*self._prepare_plain(name, *args), False)

    def _prepare_plain(self, name: str, *args) -> tuple[Callable, tuple, Callable[[Any], Any]]:
        k, snaps = self.kernel, self.snapshots
        same = _identity
        if name == "create":
            prompt, tokens, seed = args
            ids = self._tokens(prompt, tokens, add_special_tokens=True)
            return k.sys_create, (ids, seed), lambda pid: Session(self, pid)
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
        raise AssertionError(f"unknown operation {name}")

    def _sys_stats(self) -> dict:
        st = self.kernel.sys_stats()
        st["snapshots"] = len(self.snapshots.records)
        return st

    def _snapshot_handle(self, info: dict) -> Snapshot:
        return Snapshot(self, info["id"], info["session_id"], info["num_tokens"],
                        info["device_blocks"], info["created_at"])

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
        fn, call_args, post, waits = self._prepare(name, *args)
        result = self.kernel.call(fn, *call_args).result()
        if waits:  # generate: the call's own completion
            result = result.result()
        return post(result)

    def _sink(self) -> _QueueSink:
        return _QueueSink()

    def close(self) -> None:
        self.kernel.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncEngine(_EngineBase):
    """The engine for asyncio code: the same methods, as awaitables.

    `async with AsyncEngine(model="tiny") as engine: ...`
    """

    def _op(self, name: str, *args):
        return self._run(name, *args)

    async def _run(self, name: str, *args):
        fn, call_args, post, waits = self._prepare(name, *args)
        result = await asyncio.wrap_future(self.kernel.call(fn, *call_args))
        if waits:
            try:
                result = await asyncio.wrap_future(result)
            except asyncio.CancelledError:
                # the caller went away: stop generating, keep the tokens made so far
                self.kernel.call(self.kernel.sys_abort, call_args[0])
                raise
        return post(result)

    def _sink(self) -> _AsyncSink:
        return _AsyncSink(asyncio.get_running_loop())

    async def close(self) -> None:
        await asyncio.to_thread(self.kernel.shutdown)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _identity(x):
    return x


_END = object()


class _QueueSink:
    """Carries a streamed generate's tokens from the loop thread to a blocking iterator."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def on_token(self, token: int | None, delta: str, logprob: float | None) -> None:
        if token is not None or delta:
            self.queue.put(GenerationChunk(token, delta, logprob))

    def iterate(self, fut: Future, abort: Callable[[], Any]) -> Iterator[GenerationChunk]:
        fut.add_done_callback(lambda _: self.queue.put(_END))
        return self._events(fut, abort)

    def _events(self, fut: Future, abort) -> Iterator[GenerationChunk]:
        try:
            while (item := self.queue.get()) is not _END:
                yield item
            yield GenerationChunk(None, "", None, fut.result().finish_reason)
        finally:
            if not fut.done():  # the consumer stopped early: end the call, keep its tokens
                abort()


class _AsyncSink(_QueueSink):
    """The same for an async iterator: tokens are handed to the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def on_token(self, token: int | None, delta: str, logprob: float | None) -> None:
        if token is not None or delta:
            self.loop.call_soon_threadsafe(self.queue.put_nowait,
                                           GenerationChunk(token, delta, logprob))

    def iterate(self, fut: Future, abort: Callable[[], Any]) -> AsyncIterator[GenerationChunk]:
        fut.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, _END))
        return self._aevents(fut, abort)

    async def _aevents(self, fut: Future, abort) -> AsyncIterator[GenerationChunk]:
        try:
            while (item := await self.queue.get()) is not _END:
                yield item
            yield GenerationChunk(None, "", None, fut.result().finish_reason)
        finally:
            if not fut.done():
                abort()
