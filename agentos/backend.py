"""The operations every backend offers, typed: `Backend` (blocking: `Engine`, `Client`) and
`AsyncBackend` (asyncio: `AsyncEngine`, `AsyncClient`).

Each operation is one method. A backend supplies two things: for each operation, how to
build it (the `_op_*` methods of `Operations`, returning an `Op`: a syscall for the
in-process engines, one HTTP call for the clients), and how to carry an op out (`_call`:
wait for it, or await it). The public methods are written once per flavour, below, so
the blocking and the asyncio backends have the same methods with the same arguments and
result types; `Session` and `Snapshot` handles call them.

Adding an operation: its `_op_*` method here (abstract), in `_EngineBase` (the syscall)
and in `_ClientBase` (the HTTP call), its public method in both flavours, and its route.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union

from agentos.kernel.process import Generation, GenerationChunk, NextTokenLogprobs
from agentos.kernel.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from agentos.session import Session, Snapshot

T = TypeVar("T")

# named tensors in Hugging Face names: a mapping, or (name, tensor) pairs
NamedTensors = Union["Mapping[str, torch.Tensor]", "Iterable[tuple[str, torch.Tensor]]"]


class Op(Generic[T]):
    """One operation, built and ready to be carried out by its backend; its result is a T
    (a backend's own subclass says how: a syscall, an HTTP call)."""

    __slots__ = ()


def snapshot_id(snapshot: Snapshot | str) -> str:
    return snapshot if isinstance(snapshot, str) else snapshot.id


class Operations(ABC):
    """How a backend builds each operation. Every method returns an Op; nothing runs
    until `_call` carries it out."""

    @abstractmethod
    def _op_create(self, prompt: str | None, tokens: list[int] | None,
                   seed: int | None) -> Op[Session]: ...

    @abstractmethod
    def _op_session(self, session_id: str) -> Op[Session]: ...

    @abstractmethod
    def _op_session_info(self, session_id: str) -> Op[dict]: ...

    @abstractmethod
    def _op_list_sessions(self, ids: list[str] | None, owner: str | None) -> Op[list[dict]]: ...

    @abstractmethod
    def _op_append(self, session_id: str, text: str | None,
                   tokens: list[int] | None) -> Op[int]: ...

    @abstractmethod
    def _op_generate(self, session_id: str, params: SamplingParams, stream: bool,
                     append: str | list[int] | None = None) -> Op[Any]: ...

    @abstractmethod
    def _op_score(self, session_id: str, text: str | None,
                  tokens: list[int] | None) -> Op[list[float]]: ...

    @abstractmethod
    def _op_next_token_logprobs(self, session_id: str, top_k: int,
                                candidates: list[int] | None) -> Op[NextTokenLogprobs]: ...

    @abstractmethod
    def _op_fork(self, session_id: str, n: int) -> Op[list[Session]]: ...

    @abstractmethod
    def _op_snapshot(self, session_id: str) -> Op[Snapshot]: ...

    @abstractmethod
    def _op_rollback(self, session_id: str, snapshot_id: str) -> Op[int]: ...

    @abstractmethod
    def _op_close_session(self, session_id: str) -> Op[None]: ...

    @abstractmethod
    def _op_tokens_and_mask(self, session_id: str) -> Op[tuple[list[int], list[int]]]: ...

    @abstractmethod
    def _op_export(self, session_id: str, kv: bool) -> Op[bytes]: ...

    @abstractmethod
    def _op_import(self, data: bytes) -> Op[Session]: ...

    @abstractmethod
    def _op_list_snapshots(self, session_id: str | None,
                           owner: str | None) -> Op[list[Snapshot]]: ...

    @abstractmethod
    def _op_restore(self, snapshot_id: str) -> Op[Session]: ...

    @abstractmethod
    def _op_get_snapshot(self, snapshot_id: str) -> Op[Snapshot]: ...

    @abstractmethod
    def _op_delete_snapshot(self, snapshot_id: str) -> Op[None]: ...

    @abstractmethod
    def _op_update_weights(self, named_tensors: NamedTensors, version: int | None,
                           kv_policy: str) -> Op[int]: ...

    @abstractmethod
    def _op_pause(self, wait: bool) -> Op[None]: ...

    @abstractmethod
    def _op_resume(self) -> Op[None]: ...

    @abstractmethod
    def _op_abort(self) -> Op[int]: ...

    @abstractmethod
    def _op_sleep(self, level: int) -> Op[None]: ...

    @abstractmethod
    def _op_wake_up(self) -> Op[None]: ...

    @abstractmethod
    def _op_reset_prefix_cache(self) -> Op[int]: ...

    @abstractmethod
    def _op_stats(self) -> Op[dict]: ...

    @abstractmethod
    def _op_check(self) -> Op[None]: ...


class Backend(Operations):
    """A blocking backend: each method returns its result."""

    is_async = False

    @abstractmethod
    def _call(self, op: Op[T]) -> T:
        """Carries op out and returns its result."""

    def create_session(self, prompt: str | None = None, tokens: list[int] | None = None,
                       seed: int | None = None) -> Session:
        """Creates a session from a prompt (tokenized with special tokens, e.g. BOS) or
        token ids, and starts prefilling it in the background. Returns a Session."""
        return self._call(self._op_create(prompt, tokens, seed))

    def session(self, session_id: str) -> Session:
        """Returns the handle of a live session (NotFoundError if there is none)."""
        return self._call(self._op_session(session_id))

    def session_info(self, session_id: str) -> dict:
        """A dict: state, level, token counts, blocks, parent, and its paging and
        scheduling history (swap_count, swapped_s, queue_wait_s)."""
        return self._call(self._op_session_info(session_id))

    def list_sessions(self, ids: list[str] | None = None, owner: str | None = None) -> list[dict]:
        """Returns a dict per live session (as session_info): all of them, or those of
        `ids` that are live; only the tenant `owner`'s when given (over HTTP a key sees
        only its own tenant's anyway)."""
        return self._call(self._op_list_sessions(ids, owner))

    def append(self, session_id: str, text: str | None = None,
               tokens: list[int] | None = None) -> int:
        """Appends given tokens (mask 0: tool output, user turns); returns the token count."""
        return self._call(self._op_append(session_id, text, tokens))

    def generate(self, session_id: str, params: SamplingParams, stream: bool = False,
                 append: str | list[int] | None = None
                 ) -> Generation | Iterator[GenerationChunk]:
        """Generates at the end of the session (see Session.generate): a Generation, or
        with stream=True an iterator of GenerationChunk. `append` (text or token ids) is
        appended first, in the same call."""
        return self._call(self._op_generate(session_id, params, stream, append))

    def score(self, session_id: str, text: str | None = None,
              tokens: list[int] | None = None) -> list[float]:
        """The logprob of each token of a continuation given the session (unchanged)."""
        return self._call(self._op_score(session_id, text, tokens))

    def next_token_logprobs(self, session_id: str, top_k: int = 20,
                            candidates: list[int] | None = None) -> NextTokenLogprobs:
        """The most likely next tokens and the logprobs of candidates; changes nothing."""
        return self._call(self._op_next_token_logprobs(session_id, top_k, candidates))

    def fork(self, session_id: str, n: int = 1) -> list[Session]:
        """n new sessions equal to this one, sharing its pages copy-on-write."""
        return self._call(self._op_fork(session_id, n))

    def snapshot(self, session_id: str) -> Snapshot:
        """Captures the session; the Snapshot outlives it until deleted."""
        return self._call(self._op_snapshot(session_id))

    def rollback(self, session_id: str, snapshot: Snapshot | str) -> int:
        """Makes the session equal to the snapshot; returns its token count."""
        return self._call(self._op_rollback(session_id, snapshot_id(snapshot)))

    def close_session(self, session_id: str) -> None:
        """Ends the session (aborting a generate in flight) and frees its pages."""
        return self._call(self._op_close_session(session_id))

    def tokens_and_mask(self, session_id: str) -> tuple[list[int], list[int]]:
        """The session's token ids and mask (1: generated, 0: given), read together."""
        return self._call(self._op_tokens_and_mask(session_id))

    def export_session(self, session_id: str, kv: bool = False) -> bytes:
        """The session's record as bytes (see Session.export)."""
        return self._call(self._op_export(session_id, kv))

    def import_session(self, data: bytes) -> Session:
        """Returns a new Session from a record made by export (here or on another
        deployment); its KV is used when it was made by the same weights and layout, else
        its tokens are prefilled. Raises CodecError for a corrupted or unknown-version
        record, InvalidRequestError when its tokens do not fit this model."""
        return self._call(self._op_import(data))

    def list_snapshots(self, session_id: str | None = None,
                       owner: str | None = None) -> list[Snapshot]:
        """The live snapshots taken of the session, or all of them (those of closed
        sessions too); only the tenant `owner`'s when given."""
        return self._call(self._op_list_snapshots(session_id, owner))

    def restore(self, snapshot: Snapshot | str) -> Session:
        """Returns a new Session equal to the snapshot."""
        return self._call(self._op_restore(snapshot_id(snapshot)))

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """Returns the Snapshot handle of a live snapshot (NotFoundError if there is none)."""
        return self._call(self._op_get_snapshot(snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Releases the snapshot and its hold on KV blocks."""
        return self._call(self._op_delete_snapshot(snapshot_id))

    def update_weights(self, named_tensors: NamedTensors, version: int | None = None,
                       kv_policy: str = "recompute") -> int:
        """Loads new weights (HF names: a dict or (name, tensor) pairs, all or some of the
        model's) into the running engine between steps; returns the new weight version.

        kv_policy "recompute" makes every cached page stale (sessions keep their tokens; no
        token is ever sampled from KV of old weights); "keep" goes on with the KV sessions
        have. Every generated token records the weight version that sampled it."""
        return self._call(self._op_update_weights(named_tensors, version, kv_policy))

    def pause(self, wait: bool = False) -> None:
        """Stops stepping: calls in flight wait (nothing is lost) until resume(). wait: calls
        in flight run to their end first (generate calls arriving meanwhile are held until
        resume), and this returns once the engine is paused."""
        return self._call(self._op_pause(wait))

    def resume(self) -> None:
        return self._call(self._op_resume())

    def abort(self) -> int:
        """Ends every generate call in flight with finish_reason "abort"; their tokens and
        KV stay in the sessions, so they can be continued. Returns how many were ended."""
        return self._call(self._op_abort())

    def sleep(self, level: int = 1) -> None:
        """Releases the KV pool (sessions survive as tokens, or on the host tier); level 2
        also moves the weights off the accelerator. Calls wait until wake_up()."""
        return self._call(self._op_sleep(level))

    def wake_up(self) -> None:
        return self._call(self._op_wake_up())

    def reset_prefix_cache(self) -> int:
        """Empties the prefix cache: later sessions share no KV computed so far (sessions
        keep what they map). Returns how many cached pages were forgotten."""
        return self._call(self._op_reset_prefix_cache())

    def stats(self) -> dict:
        """Returns {"kv": {device_blocks_total, device_blocks_used, ...}, "sessions": ...}."""
        return self._call(self._op_stats())

    def check(self) -> None:
        """Asserts the memory invariants (refcounts equal mapped entries plus snapshot holds)."""
        return self._call(self._op_check())

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str: ...


class AsyncBackend(Operations):
    """An asyncio backend: the methods of Backend, as coroutines (see Backend for each)."""

    is_async = True

    @abstractmethod
    async def _call(self, op: Op[T]) -> T:
        """Carries op out; its result."""

    async def create_session(self, prompt: str | None = None, tokens: list[int] | None = None,
                             seed: int | None = None) -> Session:
        return await self._call(self._op_create(prompt, tokens, seed))

    async def session(self, session_id: str) -> Session:
        return await self._call(self._op_session(session_id))

    async def session_info(self, session_id: str) -> dict:
        return await self._call(self._op_session_info(session_id))

    async def list_sessions(self, ids: list[str] | None = None,
                            owner: str | None = None) -> list[dict]:
        return await self._call(self._op_list_sessions(ids, owner))

    async def append(self, session_id: str, text: str | None = None,
                     tokens: list[int] | None = None) -> int:
        return await self._call(self._op_append(session_id, text, tokens))

    async def generate(self, session_id: str, params: SamplingParams, stream: bool = False,
                       append: str | list[int] | None = None
                       ) -> Generation | AsyncIterator[GenerationChunk]:
        return await self._call(self._op_generate(session_id, params, stream, append))

    async def score(self, session_id: str, text: str | None = None,
                    tokens: list[int] | None = None) -> list[float]:
        return await self._call(self._op_score(session_id, text, tokens))

    async def next_token_logprobs(self, session_id: str, top_k: int = 20,
                                  candidates: list[int] | None = None) -> NextTokenLogprobs:
        return await self._call(self._op_next_token_logprobs(session_id, top_k, candidates))

    async def fork(self, session_id: str, n: int = 1) -> list[Session]:
        return await self._call(self._op_fork(session_id, n))

    async def snapshot(self, session_id: str) -> Snapshot:
        return await self._call(self._op_snapshot(session_id))

    async def rollback(self, session_id: str, snapshot: Snapshot | str) -> int:
        return await self._call(self._op_rollback(session_id, snapshot_id(snapshot)))

    async def close_session(self, session_id: str) -> None:
        return await self._call(self._op_close_session(session_id))

    async def tokens_and_mask(self, session_id: str) -> tuple[list[int], list[int]]:
        return await self._call(self._op_tokens_and_mask(session_id))

    async def export_session(self, session_id: str, kv: bool = False) -> bytes:
        return await self._call(self._op_export(session_id, kv))

    async def import_session(self, data: bytes) -> Session:
        return await self._call(self._op_import(data))

    async def list_snapshots(self, session_id: str | None = None,
                             owner: str | None = None) -> list[Snapshot]:
        return await self._call(self._op_list_snapshots(session_id, owner))

    async def restore(self, snapshot: Snapshot | str) -> Session:
        return await self._call(self._op_restore(snapshot_id(snapshot)))

    async def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return await self._call(self._op_get_snapshot(snapshot_id))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        return await self._call(self._op_delete_snapshot(snapshot_id))

    async def update_weights(self, named_tensors: NamedTensors, version: int | None = None,
                             kv_policy: str = "recompute") -> int:
        return await self._call(self._op_update_weights(named_tensors, version, kv_policy))

    async def pause(self, wait: bool = False) -> None:
        return await self._call(self._op_pause(wait))

    async def resume(self) -> None:
        return await self._call(self._op_resume())

    async def abort(self) -> int:
        return await self._call(self._op_abort())

    async def sleep(self, level: int = 1) -> None:
        return await self._call(self._op_sleep(level))

    async def wake_up(self) -> None:
        return await self._call(self._op_wake_up())

    async def reset_prefix_cache(self) -> int:
        return await self._call(self._op_reset_prefix_cache())

    async def stats(self) -> dict:
        return await self._call(self._op_stats())

    async def check(self) -> None:
        return await self._call(self._op_check())

    # NOTE: the in-process engine tokenizes in the caller's thread (no loop thread, no
    # await); a client asks its server. Callers that serve both await what is awaitable
    # (`agentos.session.call_op`)
    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False
               ) -> list[int] | Awaitable[list[int]]: ...

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str | Awaitable[str]: ...


if TYPE_CHECKING:
    def _implemented() -> None:
        """For the type checker (mypy runs in CI): an operation some backend does not build
        makes its class abstract, and these calls errors."""
        from agentos.client import AsyncClient, Client
        from agentos.engine import AsyncEngine, Engine

        backends: list[Backend] = [Engine(), Client()]
        async_backends: list[AsyncBackend] = [AsyncEngine(), AsyncClient()]
        del backends, async_backends
