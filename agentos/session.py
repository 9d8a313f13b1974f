"""Session and Snapshot handles: the same methods in-process and over HTTP.

A handle holds an id and a backend (an Engine, AsyncEngine, Client or AsyncClient: see
`agentos.backend`) and calls the backend's typed methods with its id. A blocking
backend's methods return results and an asyncio backend's return awaitables, so one class
serves both: `s.generate(...)` with an Engine, `await s.generate(...)` with an AsyncEngine.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from agentos.kernel.sampling_params import SamplingParams

if TYPE_CHECKING:
    from agentos.backend import AsyncBackend, Backend


def _then(result: Any, f: Callable[[Any], Any]) -> Any:
    """f(result), or for an awaitable result an awaitable of f(await result)."""
    if inspect.isawaitable(result):
        async def later():
            return f(await result)
        return later()
    return f(result)


class Session:
    """An agent session (a process of the engine)."""

    def __init__(self, backend: Backend | AsyncBackend, id: str, parent_id: str | None = None):
        self._backend = backend
        self.id = id
        self.parent_id = parent_id

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def generate(self, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
                 stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                 logprobs: bool = True, params: SamplingParams | None = None,
                 stream: bool = False, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, json_schema: dict | bool | None = None,
                 grammar: str | None = None, regex: str | None = None,
                 append: str | list[int] | None = None):
        """Generates up to max_tokens tokens at the end of the session and appends them.

        Returns a Generation (tokens, text, logprobs, finish_reason: "stop", "length" or
        "abort"). `seed` reseeds the session's RNG first; without it the session's own
        random stream continues (and is restored by rollback). Raises InvalidRequestError
        for bad parameters, ConflictError if the session is already generating.

        With stream=True returns an iterator (an async iterator on async backends) of
        GenerationChunk: one per token, then one with finish_reason. Leaving the iteration
        early ends the call; the tokens made so far stay in the session.

        At most one constraint: `json_schema` (a JSON schema; True: any JSON object), a Lark
        `grammar` or a `regex`; only text it allows is generated, and the call stops once it
        is complete. Cut short (max_tokens), it stays open: the next call with the same
        constraint continues it, also in forks and after a rollback.

        `append` (text, tokenized without special tokens, or token ids) is appended first
        (mask 0), as `append()` would, in the same call: an agent's turn (a tool's output,
        then the model's answer) is one round trip, and the first token comes from the
        appended tokens' prefill step. Called apart, the generate usually arrives once that
        step has begun, and takes a step of its own. A refused call appends nothing.
        """
        if params is None:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed, stop=stop or [],
                                    stop_token_ids=stop_token_ids or [],
                                    ignore_eos=ignore_eos, logprobs=logprobs, min_p=min_p,
                                    repetition_penalty=repetition_penalty,
                                    presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty,
                                    logit_bias=logit_bias or {}, json_schema=json_schema,
                                    grammar=grammar, regex=regex)
        return self._backend.generate(self.id, params, stream, append)

    def score(self, text: str | None = None, tokens: list[int] | None = None):
        """Returns the logprob of each token of a continuation (text, tokenized without
        special tokens, or token ids) given the session's tokens, under the model's
        distribution. The session is unchanged; its cached KV is used (not prefilled again).
        Raises InvalidRequestError, ContextLengthError, ConflictError (generating)."""
        return self._backend.score(self.id, text, tokens)

    def next_token_logprobs(self, top_k: int = 20, candidates: list[int] | None = None):
        """Returns NextTokenLogprobs: the `top_k` most likely next tokens with their
        logprobs, and the logprob of each of `candidates` (token ids). Changes nothing."""
        return self._backend.next_token_logprobs(self.id, top_k, candidates)

    def append(self, text: str | None = None, tokens: list[int] | None = None):
        """Appends given tokens (mask 0: tool output, user turns). Returns the token count."""
        return self._backend.append(self.id, text, tokens)

    def fork(self, n: int = 1):
        """Returns n new sessions equal to this one, sharing its pages copy-on-write.

        Each child draws its own random stream (derived from this session's)."""
        return self._backend.fork(self.id, n)

    def snapshot(self):
        """Captures this session; returns a Snapshot that outlives it until deleted."""
        return self._backend.snapshot(self.id)

    def rollback(self, snapshot: Snapshot | str):
        """Makes this session equal to the snapshot: tokens, masks, pages, RNG state."""
        return self._backend.rollback(self.id, snapshot)

    def close(self):
        """Ends the session (aborting a generate in flight) and frees its pages."""
        return self._backend.close_session(self.id)

    def get_tokens(self):
        """Returns the session's token ids."""
        return _then(self._backend.tokens_and_mask(self.id), lambda r: r[0])

    @property
    def tokens(self):
        return self.get_tokens()

    def get_mask(self):
        """Returns one flag per token: 1 = generated by the model, 0 = given."""
        return _then(self._backend.tokens_and_mask(self.id), lambda r: r[1])

    def get_tokens_and_mask(self):
        """Returns (token ids, mask), read together."""
        return self._backend.tokens_and_mask(self.id)

    def export(self, kv: bool = False):
        """Returns the session as a record (versioned, checksummed msgpack bytes): tokens,
        masks, RNG state, weight versions, parent; with kv=True also the KV bytes of its
        cached tokens. `backend.import_session(data)` makes a session of it anywhere."""
        return self._backend.export_session(self.id, kv)

    def info(self):
        """Returns a dict: state, level, token counts, blocks, parent, and its paging and
        scheduling history (swap_count, swapped_s, queue_wait_s)."""
        return self._backend.session_info(self.id)

    def snapshots(self):
        """Returns the snapshots taken of this session that are still alive."""
        return self._backend.list_snapshots(self.id)


class Snapshot:
    """An immutable capture of a session."""

    def __init__(self, backend: Backend | AsyncBackend, id: str, session_id: str, num_tokens: int,
                 device_blocks: int | None = None, created_at: float | None = None,
                 host_blocks: int | None = None, owner: str | None = None):
        self._backend = backend
        self.id = id
        self.session_id = session_id
        self.num_tokens = num_tokens
        self.device_blocks = device_blocks  # KV blocks it holds on the device (shared with sessions)
        self.host_blocks = host_blocks  # of those, swapped out to host memory
        self.created_at = created_at
        self.owner = owner  # its tenant, where the backend says

    def __repr__(self) -> str:
        return f"Snapshot({self.id!r}, session_id={self.session_id!r}, num_tokens={self.num_tokens})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def delete(self):
        """Releases the snapshot and its hold on KV blocks."""
        return self._backend.delete_snapshot(self.id)


AsyncSession = Session  # the same handle; its methods return awaitables on async backends


async def call_op(fn: Callable, *args, pool: Executor | None = None, **kwargs):
    """fn(*args, **kwargs) from a coroutine: run in a thread of `pool` when one is given
    (a blocking backend's operation, so many can wait on the engine at once), and awaited
    when its result is awaitable (an async backend's operation, or an async callback)."""
    if pool is None:
        result = fn(*args, **kwargs)
    else:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
    return await result if inspect.isawaitable(result) else result
