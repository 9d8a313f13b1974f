"""Sessions as processes: the process record, its states (and the moves allowed between
them) and its pending generate or score call."""

from __future__ import annotations

import enum
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentos.kernel.errors import InternalServerError
from agentos.kernel.sampling_params import SamplingParams

if TYPE_CHECKING:  # numpy-backed; kept out of `import agentos`
    from agentos.kernel.vm import PageTable


class ProcState(enum.Enum):
    EMBRYO = "embryo"  # created; its tokens are not in the KV cache yet
    RUNNABLE = "runnable"  # has work queued: a prefill to finish or a generate call
    RUNNING = "running"  # in the batch of the current step
    SLEEPING = "sleeping"  # idle, waiting for its client (tool call, next turn)
    SWAPPED = "swapped"  # pages on the host tier, or dropped (to recompute from tokens)
    ZOMBIE = "zombie"  # closed, its pages being released


_S = ProcState
# NOTE: the moves the kernel makes, and only those (Process.set_state checks them).
# Nothing returns to EMBRYO (a process is embryo until its first KV exists) and nothing
# leaves ZOMBIE. RUNNING is entered only from the queue (EMBRYO, RUNNABLE, SWAPPED: a
# sleeping process has no work) and left at the end of its step; RUNNING -> SWAPPED is a
# failed call undone back to no KV, RUNNING -> ZOMBIE a score call's scratch process
# ended by a failed step. SLEEPING and RUNNABLE go to SWAPPED when pages they map leave
# the device (their own, or a fork's they share) and come back when those pages do.
# EMBRYO -> SLEEPING is a fork or restore whose KV is all there.
TRANSITIONS: dict[ProcState, frozenset[ProcState]] = {
    _S.EMBRYO: frozenset({_S.RUNNABLE, _S.RUNNING, _S.SLEEPING, _S.SWAPPED, _S.ZOMBIE}),
    _S.RUNNABLE: frozenset({_S.RUNNING, _S.SLEEPING, _S.SWAPPED, _S.ZOMBIE}),
    _S.RUNNING: frozenset({_S.RUNNABLE, _S.SLEEPING, _S.SWAPPED, _S.ZOMBIE}),
    _S.SLEEPING: frozenset({_S.RUNNABLE, _S.SWAPPED, _S.ZOMBIE}),
    _S.SWAPPED: frozenset({_S.RUNNABLE, _S.RUNNING, _S.SLEEPING, _S.ZOMBIE}),
    _S.ZOMBIE: frozenset(),
}


class IllegalTransition(InternalServerError):
    """A process was moved between states that TRANSITIONS does not connect: a kernel bug."""


@dataclass(slots=True)
class Generation:
    """What one generate call produced."""

    tokens: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str  # "stop", "length" or "abort"
    weight_versions: list[int] | None = None  # per token: the weights that sampled it
    # per token, when asked (top_logprobs): the likeliest tokens, (id, logprob) best first
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(slots=True)
class NextTokenLogprobs:
    """The model's distribution over the token after a session's end."""

    top_ids: list[int]  # the top_k most likely token ids, most likely first
    top_logprobs: list[float]
    candidate_logprobs: list[float] | None = None  # of the requested candidate ids, in order


@dataclass(slots=True)
class GenerationChunk:
    """One event of a streamed generate: a token with its text delta and logprob, or (the
    last event) finish_reason with token None."""

    token: int | None
    text: str  # text delta (held back while it could still become a stop string)
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # when the call asked for them


@dataclass(slots=True)
class GenerateCall:
    """A generate call in flight on one process."""

    params: SamplingParams
    future: Future
    stop_ids: frozenset[int]
    detok: Any  # IncrementalDetokenizer
    start_len: int = 0  # session length when the call began; an error undoes back to it
    start_rng: Any = None  # the RNG state before the call (before any reseed)
    # (token, text delta, logprob, top_logprobs); None id: the end
    on_token: Callable[..., None] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string)
    emitted: int = 0  # characters of text already streamed to on_token
    stopped_by_string: bool = False
    aborted: bool = False
    weight_versions: list[int] = field(default_factory=list)

    def cut_at_stop(self, searched: int) -> bool:
        """Ends the text at the earliest stop string, if one has appeared past the first
        `searched` characters' possible matches. Returns whether."""
        stop = self.params.stop
        start = max(0, searched - max(len(s) for s in stop) + 1)  # a new match ends past `searched`
        hits = [i for i in (self.text.find(s, start) for s in stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped_by_string = True
        return True

    def push(self, token: int, logprob: float, version: int, at_limit: bool,
             top: list[tuple[int, float]] | None = None, complete: bool = False) -> str | None:
        """Adds a token sampled by weights `version`: its logprob (and top alternatives)
        and text, streamed to on_token. Returns the finish reason once the call is done
        ("stop", also when `complete`: its constraint's grammar is; or "length", also when
        `at_limit`, the session being at the context limit), else None."""
        self.tokens.append(token)
        self.weight_versions.append(version)
        if self.params.logprobs:
            self.logprobs.append(logprob)
        if self.params.top_logprobs:
            self.top_logprobs.append(top or [])
        searched = len(self.text)
        self.text += self.detok.push(token)
        reason = None
        if token in self.stop_ids or complete or self.params.stop and self.cut_at_stop(searched):
            reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens or at_limit:
            reason = "length"
        if reason is not None and not self.stopped_by_string:
            self.text += self.detok.flush()
        if self.on_token is not None:
            self.on_token(token, self.emit(final=reason is not None), logprob, top)
        return reason

    def result(self, reason: str) -> Generation:
        """What the call produced, ended with reason (an abort flushes and streams the
        text held back)."""
        if reason == "abort":
            self.text += self.detok.flush()
            if self.on_token is not None:
                self.on_token(None, self.emit(final=True), None, None)
        logprobs = list(self.logprobs) if self.params.logprobs else None
        tops = list(self.top_logprobs) if self.params.top_logprobs else None
        return Generation(list(self.tokens), self.text, logprobs, reason,
                          list(self.weight_versions), tops)

    def emit(self, final: bool) -> str:
        """The text delta safe to stream now: held back while it could start a stop string."""
        hold = 0 if final or not self.params.stop else max(len(s) for s in self.params.stop) - 1
        upto = max(len(self.text) - hold, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


@dataclass(slots=True)
class ScoreCall:
    """A score call in flight on a scratch process (a fork of the scored session, never
    listed): the logprobs of its tokens from position `start` on, each given what precedes
    it, and with `top_k` or `candidates` the distribution after its last token."""

    future: Future
    start: int  # first scored position (>= 1)
    top_k: int = 0
    candidates: list[int] | None = None
    logprobs: list[float] = field(default_factory=list)
    dist: NextTokenLogprobs | None = None

    @property
    def wants_dist(self) -> bool:
        return self.top_k > 0 or self.candidates is not None


@dataclass(slots=True, eq=False)
class Process:
    """One agent session. Tokens are the truth; the page table caches their KV."""

    pid: str
    # NOTE: arrays, not lists: fork, snapshot and rollback copy them with one memcpy
    token_ids: array  # array("i")
    mask: array  # array("b"), per token: 1 = generated by the model, 0 = given (prompt, tool output)
    table: PageTable
    rng: Any  # torch.Generator owned by the sampler; its state is saved in snapshots
    parent_id: str | None = None
    num_cached: int = 0  # leading tokens whose KV is in the page table
    state: ProcState = ProcState.EMBRYO
    level: int = 0  # MLFQ level
    call: GenerateCall | ScoreCall | None = None
    arrival: int = 0  # FCFS order: sequence number of the last time it became runnable
    queued_at: float | None = None  # monotonic time it became runnable, until it next runs
    created_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.time)
    num_generated: int = 0  # tokens generated over the session's life
    num_forks: int = 0  # children forked from it so far (salts their random streams)
    kv_version: int = 0  # the oldest weight version its cached KV was computed with
    owner: str = "default"  # the tenant it belongs to (its records are kept under it)
    # the prefix-cache scope its pages are shared in: None is its owner's (see
    # MemoryManager.scope_of); a private one when its KV came from outside (an import)
    cache_scope: str | None = None
    # per run of generated tokens: (index of its first token, weight version that sampled it)
    weight_runs: list[tuple[int, int]] = field(default_factory=list)
    # paging and scheduling history (session info, metrics, the pager's choices)
    swap_count: int = 0  # times its pages were taken off the device (swapped out or dropped)
    swapped_s: float = 0.0  # seconds spent off the device while it had work or was idle
    swapped_at: float | None = None  # monotonic time its pages last left the device, until back
    queue_wait_s: float = 0.0  # seconds spent runnable but not running, over its life
    resident_steps: int = 0  # steps it must run before it may be evicted again (hysteresis)
    pause_s: float | None = None  # moving average of its idle time between calls (tool pauses)
    grammar: Any = None  # the open constraint on its text (grammar.Constraint), or None

    def set_state(self, new: ProcState) -> None:
        """Moves the process to state `new`: the one place a state changes. Staying in a
        state is no move. Raises IllegalTransition (changing nothing) when TRANSITIONS does
        not allow the move."""
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"session {self.pid}: {self.state.value} -> {new.value}")
        self.state = new

    def push_generated(self, token: int, version: int) -> None:
        """Appends a token the model sampled with weights `version`."""
        self.token_ids.append(token)
        self.mask.append(1)
        self.num_generated += 1
        if not self.weight_runs or self.weight_runs[-1][1] != version:
            self.weight_runs.append((self.num_tokens - 1, version))

    def undo(self, call: GenerateCall) -> None:
        """Drops what a failed generate call added: its tokens, the RNG draws, and the KV
        past them (num_cached; the caller unmaps the pages)."""
        del self.token_ids[call.start_len :]
        del self.mask[call.start_len :]
        self.num_generated -= len(call.tokens)
        self.num_cached = min(self.num_cached, call.start_len - 1)
        self.rng.set_state(call.start_rng)
        self.weight_runs = [r for r in self.weight_runs if r[0] < call.start_len]

    def info(self, host_blocks: int, weight_version: int, now: float) -> dict[str, Any]:
        """The session as listed, given how many of its pages are on the host, the weights
        loaded now and the monotonic time."""
        wait = self.queue_wait_s + (now - self.queued_at if self.queued_at is not None else 0.0)
        return {
            "id": self.pid, "parent_id": self.parent_id, "state": self.state.value,
            "level": self.level, "num_tokens": self.num_tokens, "num_cached": self.num_cached,
            "num_generated": self.num_generated, "device_blocks": self.table.num_blocks - host_blocks,
            "host_blocks": host_blocks, "created_at": self.created_at,
            "last_active": self.last_active,
            "kv_version": self.kv_version if self.num_cached else weight_version,
            "owner": self.owner, "swap_count": self.swap_count,
            "swapped_s": self.time_swapped(now), "queue_wait_s": wait,
        }

    def time_swapped(self, now: float) -> float:
        """Seconds spent off the device, the current stretch included."""
        return self.swapped_s + (now - self.swapped_at if self.swapped_at is not None else 0.0)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def prefill_target(self) -> int:
        """Tokens that should be cached before this process sleeps: all of them when it
        must sample (the last one's logits are needed) or when they were all given (a
        prompt or tool output is cached eagerly, so forks and the prefix cache share it);
        all but a sampled last token otherwise, whose KV the next call computes."""
        if self.call is None and self.mask and self.mask[-1] == 1:
            return self.num_tokens - 1
        return self.num_tokens

    def has_work(self) -> bool:
        return self.num_cached < self.prefill_target()
