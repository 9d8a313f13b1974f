"""Stateful property test: random sequences of session syscalls (create, append, generate,
fork, snapshot, rollback, restore, close, delete) checked against a reference model.

The reference keeps each live session's and snapshot's expected tokens and mask. Generated
tokens are checked against greedy decoding recomputed from scratch: a separate copy of the
model runs a full causal forward over the whole token list, with a private contiguous cache
(no paging, no sharing, no copy-on-write). After every rule each live session must match
the reference and the refcount invariant must hold; at teardown every block must be free.
A second machine runs the same rules on a pool of a few blocks, where generate may raise
`OutOfCapacityError`: such a failure must leave every session as it was.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from agentos import Engine, NotFoundError, OutOfCapacityError, Session
from agentos.kernel.runner.attention import AttnMeta, PrefillChunk
from agentos.kernel.runner.loader import load_model

BLOCK_SIZE = 4  # small pages: every few tokens cross a block boundary
VOCAB = 260  # tiny: 256 bytes and 4 special ids
# NOTE: the engine's paged decode and the reference's full forward sum in different orders,
# so their logits differ by ~1e-6; a token is accepted when it is the reference's argmax or
# within this margin of it (a genuine tie), and the sequence goes on from the engine's token.
TIE_TOLERANCE = 1e-4
LOGPROB_TOLERANCE = 1e-4  # the same rounding; one wrong context token moves them by ~0.1

TOKEN_LISTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
TAILS = st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=6)  # past the shared tail
SETTINGS = settings(max_examples=40, stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_engines: dict[str, Engine] = {}
_reference: list[GreedyReference] = []


def shared_engine(name: str, **options) -> Engine:
    """One engine per machine class, kept across examples (each example then also reuses
    blocks that earlier ones freed, in whatever order they were freed)."""
    if name not in _engines:
        _engines[name] = Engine("tiny", block_size=BLOCK_SIZE, **options)
    return _engines[name]


def drop_engine(name: str) -> None:
    engine = _engines.pop(name, None)
    if engine is not None:
        engine.close()


def reference() -> GreedyReference:
    if not _reference:
        _reference.append(GreedyReference())
    return _reference[0]


@pytest.fixture(scope="module", autouse=True)
def _close_engines():
    yield
    for name in list(_engines):
        drop_engine(name)


class GreedyReference:
    """Next-token logits of the tiny model given a whole token list, computed from scratch.

    Each query runs one forward over all its tokens with a fresh single-block cache as long
    as the sequence. Memoized by token tuple, so revisited prefixes (rollback, forks) are free.
    """

    def __init__(self):
        self.model, self.cfg, _ = load_model("tiny")
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(token_ids)
        if key not in self.memo:
            self.memo[key] = self._forward(token_ids)
        return self.memo[key]

    @torch.inference_mode()
    def _forward(self, token_ids: list[int]) -> torch.Tensor:
        cfg, n = self.cfg, len(token_ids)
        # kv: [1 block of n slots, layers, 2, n, kv heads, head dim]
        kv = torch.zeros(1, cfg.num_layers, 2, n, cfg.num_kv_heads, cfg.head_dim)
        meta = AttnMeta(slot_mapping=torch.arange(n), num_decodes=0,
                        prefills=[PrefillChunk(0, n, n, torch.zeros(1, dtype=torch.long))])
        ids = torch.tensor(token_ids, dtype=torch.long)
        return self.model(ids, torch.arange(n), meta, kv, torch.tensor([n - 1]))[0]

    def check_greedy(self, prefix: list[int], generated: list[int],
                     logprobs: list[float] | None = None) -> None:
        """Asserts each generated token is the greedy choice given everything before it and,
        when given, that its logprob matches the reference's (this catches a wrong KV entry
        even where it does not flip the argmax)."""
        seq = list(prefix)
        for i, token in enumerate(generated):
            logits = self.logits(seq)
            best = int(logits.argmax())
            if token != best:
                gap = float(logits[best] - logits[token])
                assert gap <= TIE_TOLERANCE, (
                    f"generated token {i} is {token}, greedy reference says {best} "
                    f"(logit gap {gap:.3g}) after {len(seq)} tokens {seq}")
                event("greedy tie within tolerance")
            if logprobs is not None:
                want = float(torch.log_softmax(logits, dim=-1)[token])
                assert abs(logprobs[i] - want) <= LOGPROB_TOLERANCE, (
                    f"logprob of generated token {i} is {logprobs[i]}, reference {want} "
                    f"after {len(seq)} tokens {seq}")
            seq.append(token)


class SessionMachine(RuleBasedStateMachine):
    """Sessions and snapshots of one engine against a model of their tokens and masks."""

    engine_options: dict = {"kv_blocks": 2048}
    may_run_out = False  # whether generate may raise OutOfCapacityError
    exact_replay = True  # KV is never recomputed, so replays are bit-identical

    sessions = Bundle("sessions")
    snapshots = Bundle("snapshots")

    def __init__(self):
        super().__init__()
        self.engine = shared_engine(type(self).__name__, **self.engine_options)
        self.ref = reference()
        self.expected: dict[str, tuple[list[int], list[int]]] = {}  # session -> (tokens, mask)
        self.snaps: dict[str, tuple[list[int], list[int]]] = {}  # snapshot -> (tokens, mask)
        self.handles: dict[str, object] = {}  # id -> Session or Snapshot, for teardown
        stats = self.engine.stats()
        assert stats["kv"]["device_blocks_used"] == 0, "a previous example leaked blocks"
        assert stats["sessions"]["total"] == 0 and stats["snapshots"] == 0

    # -- rules ------------------------------------------------------------------------

    @initialize(target=sessions, tokens=TOKEN_LISTS)
    def create_first(self, tokens):
        return self.create(tokens)

    @rule(target=sessions, tokens=TOKEN_LISTS)
    def create(self, tokens):
        s = self.engine.create_session(tokens=tokens)
        self._track(s, list(tokens), [0] * len(tokens))
        return s

    @rule(s=sessions, tokens=st.lists(st.integers(0, VOCAB - 1), max_size=9))
    def append(self, s, tokens):
        num_tokens = s.append(tokens=tokens)
        toks, mask = self.expected[s.id]
        self.expected[s.id] = (toks + tokens, mask + [0] * len(tokens))
        assert num_tokens == len(toks) + len(tokens)

    @rule(s=sessions, k=st.integers(1, 6))
    def generate(self, s, k):
        self._generate(s, k)

    @rule(target=sessions, s=sessions, n=st.integers(1, 3))
    def fork(self, s, n):
        kids = s.fork(n=n)
        toks, mask = self.expected[s.id]
        for kid in kids:
            self._track(kid, list(toks), list(mask))
        assert len(kids) == n and all(kid.parent_id == s.id for kid in kids)
        return multiple(*kids)

    @rule(target=sessions, s=sessions, a=TAILS, b=TAILS)
    def fork_and_diverge(self, s, a, b):
        """Two children write different tokens into the tail block they share with their
        parent: each must copy it first (copy-on-write) and still see only its own context."""
        kids = s.fork(n=2)
        toks, mask = self.expected[s.id]
        for kid in kids:
            self._track(kid, list(toks), list(mask))
        for kid, tail in zip(kids, (a, b)):
            self.append(kid, tail)
        for kid in kids:
            self._generate(kid, 1)
        return multiple(*kids)

    @rule(target=snapshots, s=sessions)
    def snapshot(self, s):
        snap = s.snapshot()
        toks, mask = self.expected[s.id]
        assert snap.session_id == s.id and snap.num_tokens == len(toks)
        self.snaps[snap.id] = (list(toks), list(mask))
        self.handles[snap.id] = snap
        return snap

    @rule(s=sessions, snap=snapshots)
    def rollback(self, s, snap):
        # snap may belong to another session, or to one that is closed by now
        if snap.session_id != s.id:
            event("rollback onto another session's snapshot")
        num_tokens = s.rollback(snap)
        toks, mask = self.snaps[snap.id]
        self.expected[s.id] = (list(toks), list(mask))
        assert num_tokens == len(toks)

    @rule(target=sessions, snap=snapshots)
    def restore(self, snap):
        s = self.engine.restore(snap)
        toks, mask = self.snaps[snap.id]
        self._track(s, list(toks), list(mask))
        return s

    @rule(s=consumes(sessions))
    def close(self, s):
        s.close()
        del self.expected[s.id]
        del self.handles[s.id]

    @rule(snap=consumes(snapshots))
    def delete_snapshot(self, snap):
        snap.delete()
        del self.snaps[snap.id]
        del self.handles[snap.id]

    @rule(s=sessions, k=st.integers(1, 6))
    def regenerate_after_rollback(self, s, k):
        """Greedy is deterministic: generating again after a rollback repeats the tokens."""
        self._settle()  # nothing else in the batch, so both calls run the same steps
        snap = s.snapshot()
        self.handles[snap.id] = snap
        toks, mask = self.expected[s.id]
        first = self._generate(s, k)
        s.rollback(snap)
        self.expected[s.id] = (toks, mask)
        second = self._generate(s, k)
        snap.delete()
        del self.handles[snap.id]
        if first is not None and second is not None:
            assert second.tokens == first.tokens
            if self.exact_replay:
                assert second.logprobs == first.logprobs
            else:  # pages dropped in between are recomputed in other chunks: float rounding
                assert second.logprobs == pytest.approx(first.logprobs, abs=1e-4)

    # -- checks -----------------------------------------------------------------------

    @invariant()
    def sessions_match_reference(self):
        infos = {i["id"]: i for i in self.engine.list_sessions()}
        assert infos.keys() == self.expected.keys()
        for sid, (toks, mask) in self.expected.items():
            s = self.handles[sid]
            assert s.tokens == toks, f"tokens of {sid}"
            assert s.get_mask() == mask, f"mask of {sid}"
            # a session maps no page past its last token
            assert infos[sid]["device_blocks"] <= -(-len(toks) // BLOCK_SIZE)

    @invariant()
    def refcounts_match_mappings(self):
        self.engine.check()
        stats = self.engine.stats()
        assert stats["snapshots"] == len(self.snaps)
        assert stats["kv"]["device_blocks_used"] <= stats["kv"]["device_blocks_total"]

    def teardown(self):
        # closes everything, even after a failed rule, so the next example starts clean
        try:
            for handle in self.handles.values():
                with contextlib.suppress(NotFoundError):  # already gone after a failed rule
                    handle.close() if isinstance(handle, Session) else handle.delete()
            self.engine.check()
            stats = self.engine.stats()
            assert stats["sessions"]["total"] == 0 and stats["snapshots"] == 0
            assert stats["kv"]["device_blocks_used"] == 0, "blocks leaked"
            assert stats["kv"]["host_blocks_used"] == 0, "host blocks leaked"
        except BaseException:
            drop_engine(type(self).__name__)  # a dirty engine would fail every later example
            raise

    # -- helpers ----------------------------------------------------------------------

    def _track(self, s, toks: list[int], mask: list[int]) -> None:
        assert s.id not in self.expected
        self.expected[s.id] = (toks, mask)
        self.handles[s.id] = s

    def _generate(self, s, k: int):
        """Greedy-generates k tokens, checks them against the reference and updates the
        model. Returns the Generation, or None when the pool ran out (tiny-pool machine)."""
        toks, mask = self.expected[s.id]
        try:
            gen = s.generate(max_tokens=k, temperature=0.0, ignore_eos=True)
        except OutOfCapacityError:
            assert self.may_run_out, "out of blocks in a pool that cannot run out"
            event("generate ran out of blocks")
            # it must have changed nothing: the invariants compare every session, and
            # self.expected still holds this one's tokens from before the call
            return None
        assert gen.finish_reason == "length" and len(gen.tokens) == k
        self.ref.check_greedy(toks, gen.tokens, gen.logprobs)
        self.expected[s.id] = (toks + gen.tokens, mask + [1] * k)
        return gen

    def _settle(self, timeout_s: float = 10.0) -> None:
        """Waits until no background prefill is queued (created or appended sessions)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.stats()["queue"]["runnable"]:
            assert time.monotonic() < deadline, "background prefill never finished"
            time.sleep(0.001)


class TinyPoolMachine(SessionMachine):
    """The same rules on 12 blocks of 4 tokens and no host tier: pages that do not fit
    are dropped and recomputed from tokens; a session longer than the pool runs out."""

    engine_options = {"kv_blocks": 12, "host_blocks": 0}
    may_run_out = True
    exact_replay = False


class SwapMachine(SessionMachine):
    """12 device blocks and 20 host blocks: sessions and snapshots are swapped out and in
    (and dropped once the host tier is full too)."""

    engine_options = {"kv_blocks": 12, "host_blocks": 20}
    may_run_out = True
    exact_replay = False


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = SETTINGS
TestTinyPoolMachine = TinyPoolMachine.TestCase
TestTinyPoolMachine.settings = SETTINGS
TestSwapMachine = SwapMachine.TestCase
TestSwapMachine.settings = SETTINGS


def test_generate_out_of_capacity_changes_nothing():
    """A generate that runs out of blocks part-way raises and leaves the session as it was:
    tokens, mask and random stream (it used to keep the tokens made before running out)."""
    engine = shared_engine("ooc", kv_blocks=3, host_blocks=0)  # 12 token slots
    s = engine.create_session(tokens=[1, 2, 3, 4, 5, 6], seed=0)
    snap = s.snapshot()
    handles = [s, snap]
    try:
        with pytest.raises(OutOfCapacityError):
            s.generate(max_tokens=10, temperature=1.0, ignore_eos=True)
        assert s.tokens == [1, 2, 3, 4, 5, 6] and s.get_mask() == [0] * 6
        engine.check()
        # the failed call's draws are undone: s samples what a copy restored from before it does
        first = s.generate(max_tokens=2, temperature=1.0, ignore_eos=True).tokens
        s.close()
        t = engine.restore(snap)
        handles.append(t)
        assert t.generate(max_tokens=2, temperature=1.0, ignore_eos=True).tokens == first
    finally:
        for handle in handles:
            with contextlib.suppress(NotFoundError):
                handle.close() if isinstance(handle, Session) else handle.delete()
        engine.check()
        assert engine.stats()["kv"]["device_blocks_used"] == 0
