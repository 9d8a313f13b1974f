"""Tree search over forkable sessions: best-of-n, beam search and MCTS.

A branch of a search is a session forked copy-on-write from its parent, so expanding a
node copies no KV; a pruned branch is closed at once, which frees its blocks. MCTS keeps
every node as a snapshot and restores it to expand it.

Each search is one function used like a Session method: on a synchronous backend (Engine,
Client) it returns the result, on an asynchronous one (AsyncEngine, AsyncClient) an
awaitable of it:

    beams = beam_search(root, width=4, depth=3)          # Engine, Client
    beams = await beam_search(root, width=4, depth=3)    # AsyncEngine, AsyncClient

Either way the branches of a step run at the same time, so their generate calls batch
into the same engine steps: gathered on the event loop for an async backend, one worker
thread per call for a sync one (the search then runs its own event loop, in a helper
thread if the calling thread already runs one).

Callbacks (value_fn, is_final, is_terminal, step_fn) may be plain or async functions; an
awaitable result is awaited. With a sync backend plain callbacks run in worker threads,
so a value_fn may call session methods (e.g. `session.score(...)`) directly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agentos.kernel.process import Generation
from agentos.session import Session, Snapshot, call_op

_MAX_THREADS = 256  # a sync backend's calls in flight, one thread each (started on demand)


@dataclass(slots=True)
class Candidate:
    """A continuation of the search's root: a best-of-n sample or a beam."""

    session: Session | None  # open while kept (the caller closes it); None once closed
    tokens: list[int]  # generated after the root
    text: str
    logprob: float  # sum of the tokens' logprobs
    value: float = 0.0  # value_fn's value
    finish_reason: str | None = None  # of the last generate call
    num_steps: int = 0
    finished: bool = False  # ended at end-of-sequence (or is_final): not extended further


@dataclass(eq=False, slots=True)
class Node:
    """A node of an MCTS tree: the state one step after its parent."""

    id: int  # creation order; the root is 0
    parent: Node | None
    depth: int
    tokens: list[int] = field(default_factory=list)  # generated after the root
    text: str = ""
    logprob: float = 0.0
    finish_reason: str | None = None  # of the step that made it
    snapshot: Snapshot | None = None  # released when the search ends
    value: float = 0.0  # value_fn's value of this node
    terminal: bool = False  # never expanded
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0  # of the values backed up through it

    @property
    def mean_value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass(slots=True)
class MCTSResult:
    """The best node an MCTS found (by value) and the tree's statistics."""

    text: str  # the best node's text after the root
    tokens: list[int]
    value: float
    depth: int
    session: Session | None  # live at the best node when keep_session (the caller closes it)
    tree: Node  # the root of the tree; its snapshots are released
    num_nodes: int
    num_expansions: int
    num_iterations: int  # expansions plus revisits of terminal leaves
    max_depth: int  # of the deepest node


def mean_logprob(session: Session, candidate: Candidate | Node) -> float:
    """A value function: the mean logprob of the generated tokens (0 for none)."""
    return candidate.logprob / len(candidate.tokens) if candidate.tokens else 0.0


def sum_logprob(session: Session, candidate: Candidate | Node) -> float:
    """A value function: the cumulative logprob of the generated tokens."""
    return candidate.logprob


# -- public entry points ----------------------------------------------------------------


def best_of_n(root: Session, n: int, *, max_tokens: int, temperature: float = 1.0,
              stop: str | list[str] | None = None, value_fn: Callable | None = None,
              seed: int | None = None, keep: int = 1):
    """Forks n children of root, generates in all of them at once and values each with
    value_fn(session, candidate) (default: mean logprob).

    Returns all n Candidates, best first; the best `keep` keep their sessions open (the
    caller closes them), the others are closed before returning (session None). root keeps
    its tokens. Raises ValueError for bad arguments (changing nothing); on any other
    failure closes every session it opened and re-raises.
    """
    if n < 1 or not 0 <= keep <= n:
        raise ValueError(f"need n >= 1 and 0 <= keep <= n, got n={n}, keep={keep}")
    return _dispatch(_best_of_n, root, n=n, max_tokens=max_tokens, temperature=temperature,
                     stop=stop, value_fn=value_fn or mean_logprob, seed=seed, keep=keep)


def beam_search(root: Session, *, width: int, depth: int, step_tokens: int = 16,
                stop: str | list[str] | None = None, expand: int | None = None,
                temperature: float = 1.0, value_fn: Callable | None = None,
                seed: int | None = None, is_final: Callable | None = None):
    """Beam search in steps: each step forks every live beam `expand` times (default
    width), generates one step in every child at once (up to a stop string, e.g. "\\n", or
    step_tokens tokens), values the children with value_fn(session, candidate) (default:
    cumulative logprob), keeps the best `width` and closes the others at once.

    A beam whose step ends at end-of-sequence, or for which is_final(candidate) is true,
    is finished: kept aside (among the best `width` finished) and not extended. Returns
    up to `width` Candidates, finished or not, best first, with open sessions (the caller
    closes them). root keeps its tokens. Raises ValueError for bad arguments; on any
    other failure closes every session it opened and re-raises.
    """
    expand = width if expand is None else expand
    if width < 1 or depth < 1 or expand < 1 or step_tokens < 1:
        raise ValueError("width, depth, expand and step_tokens must be >= 1")
    return _dispatch(_beam_search, root, width=width, depth=depth, step_tokens=step_tokens,
                     stop=stop, expand=expand, temperature=temperature,
                     value_fn=value_fn or sum_logprob, seed=seed, is_final=is_final)


def mcts(root: Session, *, value_fn: Callable, iterations: int, expand: int = 2,
         step_tokens: int = 16, stop: str | list[str] | None = None, c_uct: float = 1.4,
         max_depth: int = 8, temperature: float = 1.0, is_terminal: Callable | None = None,
         concurrency: int = 4, seed: int | None = None, step_fn: Callable | None = None,
         target_value: float | None = None, keep_session: bool = False):
    """Monte Carlo tree search (UCT) from root. Every node is a snapshot; expanding a leaf
    restores it, forks it into `expand` children and advances each by one step at once:
    generate (step_tokens tokens or up to a stop string), or step_fn(session, leaf, i) for
    child i, which changes the session and returns a Generation of what it added. A new
    node's value is value_fn(session, node), expected in [0, 1] (the scale c_uct assumes);
    it is backed up as a mean to the root. Up to `concurrency` distinct leaves are chosen
    per round (a virtual loss steers later choices away) and expanded together.

    Nodes at max_depth, ended at end-of-sequence (or a step_fn's finish_reason "stop"), or
    with is_terminal(node) true are not expanded. Stops after `iterations` expansions
    (revisits of terminal leaves count too) or once a node reaches target_value.

    Returns an MCTSResult for the best node by value. Every snapshot is deleted and every
    session closed, except, with keep_session, one session at the best node. root is
    unchanged apart from its random stream. Raises ValueError for bad arguments; on any
    other failure releases what it made and re-raises.
    """
    if iterations < 1 or expand < 1 or max_depth < 1 or concurrency < 1:
        raise ValueError("iterations, expand, max_depth and concurrency must be >= 1")
    return _dispatch(_mcts, root, value_fn=value_fn, iterations=iterations, expand=expand,
                     step_tokens=step_tokens, stop=stop, c_uct=c_uct, max_depth=max_depth,
                     temperature=temperature, is_terminal=is_terminal, concurrency=concurrency,
                     seed=seed, step_fn=step_fn, target_value=target_value,
                     keep_session=keep_session)


def _dispatch(search: Callable, root: Session, **options: Any):
    """Returns search(runner, root, **options) awaited for a sync backend, as an awaitable
    for an async one."""
    backend = root._backend
    if backend.is_async:
        return search(_Runner(backend, None), root, **options)

    def run():
        with ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="agentos-search") as pool:
            return asyncio.run(search(_Runner(backend, pool), root, **options))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with ThreadPoolExecutor(1) as helper:  # this thread already runs a loop: ours runs beside
        return helper.submit(run).result()


# -- the searches -----------------------------------------------------------------------


async def _best_of_n(run: _Runner, root: Session, n, max_tokens, temperature, stop, value_fn,
                     seed, keep) -> list[Candidate]:
    try:
        kids = await run.fork(root, n)
        gens = await _gather(*(run(k.generate, max_tokens=max_tokens, temperature=temperature,
                                   stop=stop, seed=_seed(seed, 0, i)) for i, k in enumerate(kids)))
        cands = [Candidate(k, g.tokens, g.text, _logprob(g), finish_reason=g.finish_reason,
                           num_steps=1) for k, g in zip(kids, gens)]
        await _finish_and_value(run, cands, gens, stop, value_fn, None)
        cands.sort(key=_by_value, reverse=True)
        await run.release(cands[keep:])
        return cands
    except BaseException:
        await run.release_all()
        raise


async def _beam_search(run: _Runner, root: Session, width, depth, step_tokens, stop, expand,
                       temperature, value_fn, seed, is_final) -> list[Candidate]:
    live = [Candidate(root, [], "", 0.0)]  # the root is forked, never closed
    done: list[Candidate] = []
    try:
        for step in range(depth):
            if not live:
                break
            forks = await _gather(*(run.fork(b.session, expand) for b in live))
            await run.release([b for b in live if b.session is not root])  # replaced by children
            pairs = [(b, k) for b, kids in zip(live, forks) for k in kids]
            gens = await _gather(*(run(k.generate, max_tokens=step_tokens, temperature=temperature,
                                       stop=stop, seed=_seed(seed, step, i))
                                   for i, (_, k) in enumerate(pairs)))
            cands = [Candidate(k, b.tokens + g.tokens, b.text + g.text, b.logprob + _logprob(g),
                               finish_reason=g.finish_reason, num_steps=step + 1)
                     for (b, k), g in zip(pairs, gens)]
            await _finish_and_value(run, cands, gens, stop, value_fn, is_final)
            cands.sort(key=_by_value, reverse=True)
            await run.release(cands[width:])  # pruned: their blocks are freed now
            done = sorted(done + [c for c in cands[:width] if c.finished], key=_by_value, reverse=True)
            await run.release(done[width:])
            del done[width:]
            live = [c for c in cands[:width] if not c.finished]
        beams = sorted(done + live, key=_by_value, reverse=True)
        await run.release(beams[width:])
        return beams[:width]
    except BaseException:
        await run.release_all()
        raise


async def _mcts(run: _Runner, root: Session, value_fn, iterations, expand, step_tokens, stop,
                c_uct, max_depth, temperature, is_terminal, concurrency, seed, step_fn,
                target_value, keep_session) -> MCTSResult:
    nodes: list[Node] = []

    async def child(leaf: Node, session: Session, i: int) -> Node:
        """Advances session (at leaf) one step and returns the new node; closes session."""
        try:
            if step_fn is None:
                gen = await run(session.generate, max_tokens=step_tokens, temperature=temperature,
                                stop=stop, seed=_seed(seed, leaf.id, i))
            else:
                gen = await run(step_fn, session, leaf, i)
            node = Node(0, leaf, leaf.depth + 1, leaf.tokens + gen.tokens, leaf.text + gen.text,
                        leaf.logprob + _logprob(gen), gen.finish_reason)
            node.snapshot = await run.snapshot(session)
            node.value = float(await run(value_fn, session, node))
            node.terminal = (node.depth >= max_depth or await run.finished(gen, stop)
                             or (is_terminal is not None and bool(await run(is_terminal, node))))
            return node
        finally:
            await run.close([session])

    async def expand_leaf(leaf: Node) -> list[Node]:
        first = await run.restore(leaf.snapshot)
        sessions = [first, *(await run.fork(first, expand - 1) if expand > 1 else [])]
        return await _gather(*(child(leaf, s, i) for i, s in enumerate(sessions)))

    try:
        tree = Node(0, None, 0, snapshot=await run.snapshot(root))
        nodes.append(tree)
        num_iterations = num_expansions = 0
        while num_iterations < iterations:
            leaves, revisits = _select(tree, c_uct, min(concurrency, iterations - num_iterations))
            for leaf, kids in zip(leaves, await _gather(*(expand_leaf(leaf) for leaf in leaves))):
                leaf.children = kids
                for kid in kids:
                    kid.id = len(nodes)
                    nodes.append(kid)
                    _backup(kid, kid.value)
            num_expansions += len(leaves)
            num_iterations += len(leaves) + revisits
            if target_value is not None and any(n.value >= target_value for n in nodes[1:]):
                break
        best = max(nodes[1:], key=lambda n: n.value)
        session = await run.restore(best.snapshot) if keep_session else None
        await run.delete(list(run.snapshots))  # every node's
    except BaseException:
        await run.release_all()
        raise
    for n in nodes:
        n.snapshot = None
    return MCTSResult(best.text, best.tokens, best.value, best.depth, session, tree, len(nodes),
                      num_expansions, num_iterations, max(n.depth for n in nodes))


def _select(tree: Node, c_uct: float, k: int) -> tuple[list[Node], int]:
    """Chooses up to k distinct non-terminal leaves, descending from tree by UCT. Each
    choice adds a virtual loss (a visit worth 0) along its path so that the next one looks
    elsewhere; the losses are taken back before returning. A terminal leaf reached instead
    is revisited: its value is backed up again. Returns (leaves, number of revisits)."""
    leaves: list[Node] = []
    revisits = 0
    for _ in range(k):
        node = tree
        while node.children:
            node = _uct_child(node, c_uct)
        if node.terminal:
            _backup(node, node.value)
            revisits += 1
        elif node in leaves:
            break
        else:
            leaves.append(node)
            _backup(node, 0.0)
    for leaf in leaves:
        _backup(leaf, 0.0, visits=-1)
    return leaves, revisits


def _uct_child(node: Node, c_uct: float) -> Node:
    log_n = math.log(max(node.visits, 1))
    return max(node.children,
               key=lambda ch: ch.mean_value + c_uct * math.sqrt(log_n / max(ch.visits, 1)))


def _backup(node: Node | None, value: float, visits: int = 1) -> None:
    """Adds visits and value to node and each of its ancestors."""
    while node is not None:
        node.visits += visits
        node.value_sum += value
        node = node.parent


# -- plumbing ---------------------------------------------------------------------------


class _Runner:
    """Runs backend operations and callbacks from a search's event loop, and tracks the
    sessions and snapshots the search made so that a failure can release them."""

    def __init__(self, backend: Any, pool: ThreadPoolExecutor | None):
        self.backend = backend
        self.pool = pool  # None: an async backend, whose calls are awaited directly
        kernel = getattr(backend, "kernel", None)  # in-process engines know their eos ids
        self.eos_ids = None if kernel is None else kernel.eos_ids
        self.sessions: set[Session] = set()
        self.snapshots: set[Snapshot] = set()

    async def __call__(self, fn: Callable, *args, **kwargs):
        """Returns fn(*args, **kwargs) (run in a worker thread for a sync backend), awaited
        if it is awaitable."""
        return await call_op(fn, *args, pool=self.pool, **kwargs)

    async def fork(self, session: Session, n: int) -> list[Session]:
        kids = await self(session.fork, n)
        self.sessions.update(kids)
        return kids

    async def restore(self, snapshot: Snapshot) -> Session:
        session = await self(self.backend.restore, snapshot)
        self.sessions.add(session)
        return session

    async def snapshot(self, session: Session) -> Snapshot:
        snap = await self(session.snapshot)
        self.snapshots.add(snap)
        return snap

    async def close(self, sessions: Iterable[Session]) -> None:
        sessions = list(sessions)
        self.sessions.difference_update(sessions)
        await _gather(*(self(s.close) for s in sessions))

    async def delete(self, snapshots: Iterable[Snapshot]) -> None:
        snapshots = list(snapshots)
        self.snapshots.difference_update(snapshots)
        await _gather(*(self(s.delete) for s in snapshots))

    async def release(self, cands: Iterable[Candidate]) -> None:
        """Closes the candidates' sessions at once; sets them to None."""
        cands = [c for c in cands if c.session is not None]
        await self.close(c.session for c in cands)
        for c in cands:
            c.session = None

    async def release_all(self) -> None:
        """Closes and deletes everything still tracked, ignoring errors (a failure path)."""
        calls = [*(self(s.close) for s in self.sessions), *(self(s.delete) for s in self.snapshots)]
        self.sessions, self.snapshots = set(), set()
        await asyncio.gather(*calls, return_exceptions=True)

    async def finished(self, gen: Generation, stop: str | list[str] | None) -> bool:
        """Whether a step's generate call ended its branch: aborted, or stopped at the
        end of the sequence rather than at one of the step's stop strings."""
        if gen.finish_reason != "stop":
            return gen.finish_reason == "abort"
        if not stop or not gen.tokens:
            return True
        if self.eos_ids is not None:
            return gen.tokens[-1] in self.eos_ids
        # a remote backend: its text was cut at a stop string if one is in the tokens
        stops = [stop] if isinstance(stop, str) else stop
        text = await self(self.backend.decode, gen.tokens)
        return not any(s in text for s in stops)


async def _finish_and_value(run: _Runner, cands: list[Candidate], gens: list[Generation], stop,
                            value_fn: Callable, is_final: Callable | None) -> None:
    """Sets each candidate's finished flag and value (all at once)."""
    ends = await _gather(*(run.finished(g, stop) for g in gens))
    values = await _gather(*(run(value_fn, c.session, c) for c in cands))
    finals = (await _gather(*(run(is_final, c) for c in cands)) if is_final is not None
              else [False] * len(cands))
    for c, end, value, final in zip(cands, ends, values, finals):
        c.finished, c.value = bool(end or final), float(value)


async def _gather(*aws) -> list:
    """Awaits all of aws, even when some fail (so none is left running); then raises the
    first error, or returns the results in order."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _seed(seed: int | None, a: int, b: int) -> int | None:
    """A seed for branch (a, b) derived from the search's seed; None without one."""
    return None if seed is None else hash((seed, a, b)) % 2**62


def _logprob(gen: Generation) -> float:
    return sum(gen.logprobs or ())


def _by_value(c: Candidate) -> float:
    return c.value
