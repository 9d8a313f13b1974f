"""Calls in flight: generate and score calls, from the syscall that starts one, through
the tokens and scores the step hands it (`_on_token`, `_on_score`), to its end
(`_finish`), which wakes the caller. A part of the Kernel (a base class of it, holding no
state of its own); every method runs in the loop thread.
"""

from __future__ import annotations

import uuid
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from agentos.kernel.errors import ContextLengthError, InvalidRequestError
from agentos.kernel.grammar import Constraint
from agentos.kernel.process import GenerateCall, Process, ProcState, ScoreCall
from agentos.kernel.runner.tokenizer import IncrementalDetokenizer
from agentos.kernel.sampling_params import SamplingParams
from agentos.kernel.syscalls import Defer


class Calls:
    def sys_generate(self, pid: str, params: SamplingParams,
                     on_token: Callable[[int, str, float | None], None] | None = None,
                     compiled: Any = None, append: list[int] | None = None) -> Future:
        """Starts a generate call on the session; returns a Future of its Generation.
        on_token(token, text delta, logprob, top_logprobs or None) is called in the loop
        thread per token (token None: the end). `append`: tokens (mask 0) added first, in
        the same call, so their prefill and the first token share one step (an agent's
        turn: a tool's output, then the model's answer). Raises NotFoundError /
        ConflictError / ContextLengthError / InvalidRequestError; changes nothing then,
        the append included. While a pause(wait=True) drains, a valid call appends at once
        and its generate is held: it starts at resume (or ends at an abort). `compiled`:
        the params' constraint compiled by the caller (grammar.Compiler), so the loop
        thread does not compile it (it does when not given)."""
        append = self.check_tokens(append, self.idle_proc(pid).num_tokens) if append else []
        if self._drains:
            self._check_generate(pid, params, len(append))
            if append:
                self.append_checked(self.procs[pid], append)
            outer: Future = Future()
            self._held.append((pid, params, on_token, compiled, outer))
            return outer
        return self._start_generate(pid, params, on_token, compiled, append)

    def _check_generate(self, pid: str, params: SamplingParams, appended: int = 0) -> Process:
        p = self.idle_proc(pid)
        if p.num_tokens + appended >= self.max_model_len:
            raise ContextLengthError(
                f"session {pid!r} {'would hold' if appended else 'holds'} "
                f"{p.num_tokens + appended} tokens, the context limit is "
                f"{self.max_model_len}: nothing can be generated")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop token id {bad[0]} is outside the vocabulary")
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                                      f"({self.vocab_size} tokens)")
        return p

    def _start_generate(self, pid: str, params: SamplingParams,
                        on_token: Callable[[int, str, float | None], None] | None,
                        compiled: Any = None, append: list[int] = ()) -> Future:
        p = self._check_generate(pid, params, len(append))
        # NOTE: everything that can refuse the call runs before the append, so a refused
        # call leaves the session as it was
        tokens = p.token_ids + array("i", append) if append else p.token_ids
        g = self._constraint(p, params.constraint, compiled, tokens)
        if append:
            self.append_checked(p, append)
        if g is not p.grammar:
            p.grammar = g
            if self.journal is not None:
                self.journal.constrained(p)
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

    def _constraint(self, p: Process, grammar: str | None, compiled: Any,
                    tokens: array) -> Constraint | None:
        """The constraint of p's next call, generating after `tokens` (p's, and any it is
        about to append): its open one when the call names the same grammar and it is not
        complete (caught up with tokens appended since), else a new one from the end.
        Raises InvalidRequestError (a grammar that does not compile, or appended tokens
        that break the open one)."""
        if grammar is None:
            return None
        g = p.grammar
        if g is not None and g.grammar == grammar:
            g.sync(tokens)
            if not g.done:
                return g
        g = Constraint(grammar, len(tokens), compiled or self.grammars.compile(grammar))
        g.sync(tokens)
        return g

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
                    kv_version=p.kv_version, owner=p.owner, cache_scope=p.cache_scope)
        s.call = ScoreCall(fut, p.num_tokens, top_k, candidates)
        self._scratch[s.pid] = s
        self.wake(s)
        return fut

    def _on_score(self, p: Process, logprobs: list[float], dist) -> None:
        """Takes a step's scores for p's score call."""
        p.call.logprobs.extend(logprobs)
        if dist is not None:
            p.call.dist = dist

    def _end_score(self, p: Process, error: Exception | None = None) -> None:
        """Ends a score call: frees its scratch process and wakes the caller."""
        call, p.call = p.call, None
        self.policy.remove(p)
        p.set_state(ProcState.ZOMBIE)
        self.vm.free(p.table)
        del self._scratch[p.pid]
        if call.future.cancelled():
            return
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result((call.logprobs, call.dist))

    def _on_token(self, p: Process, token: int, logprob: float,
                  top: list[tuple[int, float]] | None = None) -> None:
        """Takes a token sampled for p's generate call (with its top_logprobs alternatives
        when the call asked); ends the call when it is done."""
        p.push_generated(token, self.weight_version)
        if self.journal is not None:
            self.journal.generated(p, token, not p.call.params.greedy, self.weight_version)
        g = p.grammar
        if g is not None:
            g.advance(token)
        reason = p.call.push(token, logprob, self.weight_version,
                             p.num_tokens >= self.max_model_len, top, g is not None and g.done)
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
            p.undo(call)
            self.vm.truncate(p.table, p.num_cached)
            if p.grammar is not None:
                p.grammar.matcher = None  # replayed from the tokens kept, at the next call
        if self.journal is not None:
            self.journal.call_ended(p, sampled=not call.params.greedy and bool(call.tokens),
                                    undone=error is not None)
        if p.has_work():
            self.policy.add(p)
        else:
            self.policy.remove(p)
        p.set_state(self.memory.rest_state(p))
        if call.future.cancelled():  # its caller left; the loop must not fail on that
            return
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(call.result(reason))
