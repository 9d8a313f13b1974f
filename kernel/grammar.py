"""Constrained decoding: JSON schemas, Lark grammars and regexes, through llguidance.

A generate call with a constraint samples only tokens its grammar allows (the sampler
masks the rest); the call ends once the grammar is complete. The constraint belongs to
the session, not to the call: a call cut short (max_tokens, an abort) leaves it open,
and the next call with the same constraint continues it, so a session forked or rolled
back mid-JSON finishes valid JSON in every branch. Its state is the tokens since it
began: fork copies the matcher, a snapshot keeps (grammar, start) and a rollback replays
the tokens into a fresh matcher.

Grammars are compiled in the caller's thread (`Compiler.compile`), never in the loop
thread: a large schema can take milliseconds to compile.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from agentos.kernel.errors import InvalidRequestError

log = logging.getLogger("agentos.grammar")

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, Lark grammar or regex, as text


def grammar_of(json_schema: Any = None, grammar: str | None = None,
               regex: str | None = None) -> str | None:
    """The llguidance grammar (its JSON text) of at most one constraint: a JSON schema (a
    dict; True or {} for any JSON object), a Lark grammar or a regex. None: unconstrained.
    Raises InvalidRequestError for more than one, a wrong type or an oversized one."""
    given = [n for n, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex))
             if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"give at most one constraint, not {' and '.join(given)}")
    if json_schema is not None:
        if json_schema is True:
            json_schema = {"type": "object"}
        if not isinstance(json_schema, dict):
            raise InvalidRequestError("json_schema must be a JSON schema object")
        text = json.dumps(json_schema, sort_keys=True, separators=(",", ":"))
        # NOTE: compact JSON (", " and ": " between items, no other whitespace) unless the
        # schema's own x-guidance options say otherwise: free whitespace lets a model pad
        # its output with newlines and tabs until max_tokens
        options = json_schema.get("x-guidance")
        entry: dict = {"json_schema": {**json_schema, "x-guidance": {
            "whitespace_flexible": False, **(options if isinstance(options, dict) else {})}}}
    else:
        name, text = given[0], grammar if grammar is not None else regex
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f"{name} must be a non-empty string")
        entry = {"lark_grammar": text} if grammar is not None else {
            "lark_grammar": "start: /" + text.replace("/", "\\/") + "/"}
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"{given[0]} is {len(text)} characters; at most "
                                  f"{MAX_GRAMMAR_CHARS} are allowed")
    return json.dumps({"grammars": [entry]})  # key order kept: properties come out in it


class Compiler:
    """Grammars to matchers for one model's tokenizer (its token bytes read once, at the
    first compile)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._ll = None

    def compile(self, grammar: str):
        """A fresh matcher of the grammar. Raises InvalidRequestError naming what is wrong."""
        import llguidance

        if self._ll is None:
            self._ll = _ll_tokenizer(llguidance, self.tokenizer, self.vocab_size, self.eos_ids)
        # NOTE: llguidance bounds the grammar's size and the lexer's and parser's work per
        # token itself (LLParserLimits' defaults); a grammar over them is an error here
        m = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"the constraint does not compile: {m.get_error()}")
        return m

    def restore(self, grammar: str | None, start: int) -> Constraint | None:
        """A recorded open constraint (a recovered, imported or fetched record), its
        matcher to be replayed from the tokens; None when there is none or it no longer
        compiles (logged: the session then continues unconstrained)."""
        if grammar is None:
            return None
        try:
            return Constraint(grammar, start, self.compile(grammar))
        except InvalidRequestError as e:
            log.warning("a recorded constraint was dropped: %s", e)
            return None


def _ll_tokenizer(llguidance, tokenizer, vocab_size: int, eos_ids: list[int]):
    hf = getattr(tokenizer, "tok", None)  # HFTokenizer: llguidance reads tokenizer.json itself
    eos = eos_ids or None
    if hf is not None:
        return llguidance.LLTokenizer(hf.to_str(), n_vocab=vocab_size, eos_token=eos)

    class ByteView:  # tokenizers with a byte view of every token (the byte tokenizer)
        eos_token_id = eos_ids[0] if eos_ids else None
        bos_token_id = tokenizer.bos_token_id
        tokens = [tokenizer.token_bytes(i, skip_special_tokens=False) for i in range(vocab_size)]
        special_token_ids = [i for i in range(vocab_size)
                             if tokenizer.token_bytes(i, skip_special_tokens=True) == b""]

        def __call__(self, text):
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text, add_special_tokens=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteView()), n_vocab=vocab_size,
                                  eos_token=eos)


@dataclass(slots=True, eq=False)
class Constraint:
    """A session's open constraint: the grammar, the index of the first token it governs,
    and a matcher advanced over the tokens since (None: to be replayed from the tokens)."""

    grammar: str
    start: int
    template: Any  # the compiled matcher, never advanced: replays start from a copy of it
    matcher: Any = None
    consumed: int = 0  # tokens the matcher has taken, from `start` on

    def copy(self) -> Constraint:
        """An independent copy (fork): the matcher's state is copied, not replayed."""
        m = self.matcher.deep_copy() if self.matcher is not None else None
        return Constraint(self.grammar, self.start, self.template, m, self.consumed)

    def at_rest(self) -> Constraint:
        """A copy without a matcher, for a snapshot: a rollback replays the tokens."""
        return Constraint(self.grammar, self.start, self.template)

    @property
    def done(self) -> bool:
        """Whether the grammar is complete (no token but the end can follow)."""
        return self.matcher is not None and self.matcher.is_stopped()

    def sync(self, token_ids) -> None:
        """Advances the matcher over the session's tokens it has not taken (a replay after
        a rollback, or tokens appended since the last call). Raises InvalidRequestError,
        leaving the constraint to be replayed, when they break the grammar."""
        if self.matcher is None:
            self.matcher, self.consumed = self.template.deep_copy(), 0
        new = list(token_ids[self.start + self.consumed :])
        if new and not self.matcher.consume_tokens(new):
            error = self.matcher.get_error()
            self.matcher, self.consumed = None, 0
            raise InvalidRequestError("the session's tokens since its constraint began do not "
                                      f"match it: {error}")
        self.consumed += len(new)

    def advance(self, token: int) -> None:
        """Takes a sampled token (one the mask allowed)."""
        self.matcher.consume_token(token)
        self.consumed += 1


def grammar_masks(constraints: list, vocab_size: int) -> tuple | None:
    """The next-token masks of the constraints that are not None: None when there is
    none, else (their indices in `constraints`, a [n, vocab_size] bool CPU tensor of the
    tokens each allows)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    # NOTE: computed in the loop thread, before the forward pass. A worker thread running
    # them beside the forward was slower on a 2-core CPU (it takes a core from the
    # model's matmuls); on a GPU server with cores to spare it would hide them.
    return rows, allowed_tokens([constraints[i] for i in rows], vocab_size)


def allowed_tokens(constraints: list[Constraint], vocab_size: int):
    """[n, vocab_size] bool: the tokens each constraint's grammar allows next."""
    import torch

    words = (vocab_size + 31) // 32
    bits = torch.zeros(len(constraints), words, dtype=torch.int32)
    # NOTE: one matcher after the other (a few microseconds each, outside the GIL).
    # llguidance's own thread pool (LLExecutor) was slower here: its workers keep spinning
    # after the masks are done, taking cores from the model's matmuls (1.5x the step time
    # at 32 sessions on 2 cores). Not llguidance.torch either: its import compiles a
    # kernel with torch.compile.
    ptr, stride = bits.data_ptr(), words * 4
    for i, c in enumerate(constraints):
        c.matcher.unsafe_compute_mask_ptr(ptr + i * stride, stride)
    import numpy as np

    return torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1,
                                          bitorder="little")[:, :vocab_size].view(np.bool_))

