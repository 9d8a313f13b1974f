"""`agentos bench tree`: tree search over forkable sessions against two peers.

Two workloads, each run by three systems doing the same work (the same number of
branches, tokens per branch and steps; every branch samples `step_tokens` tokens with
end-of-sequence ignored, seeded per branch):

- beam search (the shape of `agentos.search.beam_search`): the prompt is the one beam
  at first; at each of `depth` steps every live beam is expanded into `expand` children
  (default 2: 2, 4, 8, then 16 children per step at width 8), children are scored by
  cumulative logprob, the best `width` are kept and the rest dropped at once.
- MCTS: `mcts_iterations` expansions of `mcts_expand` children each, nodes at depth
  `mcts_depth` are terminal. Which node each iteration expands is precomputed by UCT over
  seeded pseudo-rewards (`mcts_plan`), so the three systems build the same tree shape;
  each scores its own texts with a cheap programmatic value (the share of letters and
  spaces), reported as the best value found. Every node may be expanded later, so every
  non-terminal node's state is kept to the end.

The systems:

- ours: an in-process AsyncEngine; a branch is a `fork()` child of its parent session
  (MCTS nodes are snapshots; expanding one is a restore and a fork); the branches of a
  step generate concurrently (asyncio.gather), so the engine batches them; pruned
  branches are closed at once.
- hf: transformers on the same weights, what a user has today: the prompt is prefilled
  once, each branch gets `copy.deepcopy` of its parent's DynamicCache and runs its own
  decode loop (batch 1, one branch after the other; batching branches would mean
  stacking and padding caches by hand). A beam's cache is dropped once its children are
  made.
- no-fork: the same engine without fork: each branch is a fresh session created from the
  full prefix (prompt + path so far), generated and closed; branches of a step run
  concurrently like ours. Twice: with the engine's prefix cache on (the re-sent prefix
  maps cached pages; hits are reported) and off (every branch prefills its whole prefix
  again, as on a stateless server). The 3x target is against the second; the first shows
  how much of fork's sharing the prefix cache already gives a client that re-sends.

NOTE: the loops are written here once, over three backends, rather than taken from
`agentos.search`: its beam_search ends a branch at end-of-sequence (there is no
ignore_eos to pass), so branches would differ in length between systems, and its mcts
picks leaves from the values it sees, so the peers could not replay its tree.

Wall time runs from the prompt to the search result (the best path known), prefill
included; tokens/s = generated tokens / seconds. Peak KV memory: for the engine, the
device blocks that hold KV, mapped by a session or snapshot or kept only by the prefix
cache (sampled after each expansion, when every branch of it is alive), times block
bytes; the prefix cache is emptied before each run, so a run is charged for its own pages
only (the no-fork peer's MCTS nodes live there between expansions, ours are snapshots).
For transformers, the bytes of every DynamicCache alive, tracked after each branch.
Systems alternate within each repeat; each uses its own fresh prompt. Transformers runs
on the engine's loop thread (see `common.on_engine_thread`). Medians over repeats; ratios
are peer / ours.
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from agentos.bench.common import (
    check,
    dtype_name,
    load_peer,
    median,
    new_console,
    on_engine_thread,
    print_checks,
    print_table,
    progress,
    random_prompt,
    ratio,
    set_threads,
    sync,
)
from agentos.session import Snapshot

SYSTEMS = ("ours", "hf", "nofork", "nocache")
PEERS = SYSTEMS[1:]
WORKLOADS = ("beam", "mcts")
MB = 2**20


@dataclass(slots=True)
class TreeBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    repeats: int = 3  # timed runs per system and workload (medians)
    prompt_len: int = 2048  # prompt tokens
    width: int = 8  # beams kept
    depth: int = 8  # beam steps
    expand: int = 2  # children per live beam at each step
    step_tokens: int = 16  # tokens sampled by each branch
    mcts_iterations: int = 32  # MCTS expansions
    mcts_expand: int = 4  # children per MCTS expansion
    mcts_depth: int = 4  # MCTS depth limit (nodes there are terminal)
    temperature: float = 1.0  # sampling temperature of every branch
    peer: bool = True  # also measure transformers
    block_size: int = 16
    max_batch_tokens: int = 2048
    seed: int = 0  # seeds the prompts, the branch seeds and the MCTS plan
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def __post_init__(self):
        if min(self.repeats, self.width, self.depth, self.expand, self.step_tokens,
               self.mcts_iterations, self.mcts_expand, self.mcts_depth) < 1:
            raise ValueError("repeats, width, depth, expand, step_tokens and the mcts "
                             "options must be >= 1")
        if self.prompt_len < 2:
            raise ValueError("prompt_len must be >= 2")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (branches sample)")


# -- the workloads, written once over a backend ----------------------------------------


@dataclass(slots=True)
class Plan:
    """A precomputed MCTS tree: node 0 is the root; expansion i makes `children[i]` of
    `parents[i]`. `depth[n]` is node n's depth."""

    parents: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)
    depth: list[int] = field(default_factory=lambda: [0])


def mcts_plan(iterations: int, k: int, depth_limit: int, seed: int, c: float = 1.4) -> Plan:
    """Returns the tree UCT builds in `iterations` iterations (fewer if every node becomes
    terminal) when each new node's reward is a seeded pseudo-random number: select down
    the non-exhausted children by UCT to a leaf, expand it into k children, back up their
    rewards. Nodes at depth_limit are terminal; a node whose children are all exhausted
    is exhausted."""
    rng = random.Random(seed)
    plan = Plan()
    kids: list[list[int]] = [[]]
    up: list[int | None] = [None]
    visits, total, done = [0], [0.0], [depth_limit == 0]
    for _ in range(iterations):
        if done[0]:
            break
        node = 0
        while kids[node]:
            live = [ch for ch in kids[node] if not done[ch]]
            node = max(live, key=lambda ch, n=node: total[ch] / visits[ch]
                       + c * math.sqrt(math.log(visits[n]) / visits[ch]))
        new = list(range(len(kids), len(kids) + k))
        plan.parents.append(node)
        plan.children.append(new)
        for ch in new:
            kids.append([])
            up.append(node)
            plan.depth.append(plan.depth[node] + 1)
            reward = rng.random()
            visits.append(1)
            total.append(reward)
            done.append(plan.depth[ch] >= depth_limit)
            n = node
            while n is not None:
                visits[n] += 1
                total[n] += reward
                n = up[n]
        kids[node] = new
        n = node
        while n is not None and all(done[ch] for ch in kids[n]):
            done[n] = True
            n = up[n]
    return plan


def _branch_seeds(seed: int, run: int) -> Iterator[int]:
    """Per-branch seeds, in branch order: the same sequence for every system."""
    rng = random.Random(seed * 1_000_003 + run)
    while True:
        yield rng.getrandbits(62)


async def _beam(backend, prompt: list[int], bench: TreeBench, run: int) -> dict:
    """Beam search on backend; returns {"best_logprob", "branches"}."""
    seeds = _branch_seeds(bench.seed, run)
    beams = [(0.0, await backend.root(prompt))]
    branches = 0
    for _ in range(bench.depth):
        jobs = [(node, [next(seeds) for _ in range(bench.expand)]) for _, node in beams]
        groups = await backend.expand(jobs, drop_parents=True)
        kids = [(score + lp, node) for (score, _), group in zip(beams, groups)
                for node, _, lp in group]
        branches += len(kids)
        kids.sort(key=lambda c: -c[0])  # stable: ties keep branch order
        beams = kids[:bench.width]
        await backend.release([node for _, node in kids[bench.width:]])
    result = {"best_logprob": beams[0][0], "branches": branches}
    await backend.release([node for _, node in beams])
    return result


async def _mcts(backend, prompt: list[int], bench: TreeBench, plan: Plan, run: int,
                decode: Callable[[list[int]], str]) -> dict:
    """Replays plan on backend; returns {"best_value", "branches"}."""
    seeds = _branch_seeds(bench.seed, run)
    nodes = {0: await backend.park(await backend.root(prompt))}
    paths: dict[int, list[int]] = {0: []}
    best = float("-inf")
    for parent, child_ids in zip(plan.parents, plan.children):
        [group] = await backend.expand([(nodes[parent], [next(seeds) for _ in child_ids])],
                                       drop_parents=False)
        for cid, (_, tokens, _) in zip(child_ids, group):
            paths[cid] = paths[parent] + tokens
            best = max(best, value(decode(paths[cid])))
        keep = [(cid, node) for cid, (node, _, _) in zip(child_ids, group)
                if plan.depth[cid] < bench.mcts_depth]
        parked = await asyncio.gather(*(backend.park(node) for _, node in keep))
        nodes.update((cid, node) for (cid, _), node in zip(keep, parked))
        await backend.release([node for cid, (node, _, _) in zip(child_ids, group)
                               if plan.depth[cid] >= bench.mcts_depth])
    await backend.release(list(nodes.values()))
    return {"best_value": best, "branches": sum(len(c) for c in plan.children)}


def value(text: str) -> float:
    """The MCTS value of a path's text: the share of ASCII letters and spaces in it."""
    return sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in text) / max(len(text), 1)


# -- the backends ----------------------------------------------------------------------


class _Ours:
    """Branches are fork() children; MCTS nodes are snapshots."""

    def __init__(self, engine, bench: TreeBench, block_bytes: int):
        self.engine, self.bench, self.block_bytes = engine, bench, block_bytes
        self.peak = 0

    async def root(self, prompt: list[int]):
        return await self.engine.create_session(tokens=prompt)

    async def expand(self, jobs, drop_parents: bool):
        """Forks every parent, generates in all children at once. Returns per parent
        [(child, tokens, logprob sum)]."""
        kid_lists = await asyncio.gather(*(self._fork(node, len(seeds)) for node, seeds in jobs))
        if drop_parents:  # the children hold the pages now
            await self.release([node for node, _ in jobs])
        kids = [kid for group in kid_lists for kid in group]
        seeds = [s for _, group in jobs for s in group]
        gens = await asyncio.gather(*(kid.generate(
            max_tokens=self.bench.step_tokens, temperature=self.bench.temperature, seed=s,
            ignore_eos=True) for kid, s in zip(kids, seeds)))
        await self._sample()
        return _regroup([(kid, g.tokens, sum(g.logprobs)) for kid, g in zip(kids, gens)],
                        [len(group) for group in kid_lists])

    async def _fork(self, node, n: int):
        if isinstance(node, Snapshot):  # restore it, fork the restored session
            restored = await self.engine.restore(node)
            kids = await restored.fork(n=n)
            await restored.close()
            return kids
        return await node.fork(n=n)

    async def park(self, session):
        """Keeps a node as a snapshot (its session is closed)."""
        snap = await session.snapshot()
        await session.close()
        return snap

    async def release(self, nodes) -> None:
        await asyncio.gather(*(n.delete() if isinstance(n, Snapshot) else n.close() for n in nodes))

    async def _sample(self) -> None:
        kv = (await self.engine.stats())["kv"]
        # blocks mapped plus blocks only the prefix cache holds: both occupy memory
        self.peak = max(self.peak, (kv["device_blocks_used"] + kv["device_blocks_cached"])
                        * self.block_bytes)


class _NoFork(_Ours):
    """A node is its token ids; a branch is a fresh session given them all. With
    prefix_cache False the engine's prefix cache is off for its runs, so every branch
    prefills its whole prefix again (what a stateless server does)."""

    def __init__(self, engine, bench: TreeBench, block_bytes: int, prefix_cache: bool = True):
        super().__init__(engine, bench, block_bytes)
        self.prefix_cache = prefix_cache

    async def root(self, prompt: list[int]):
        return list(prompt)

    async def expand(self, jobs, drop_parents: bool):
        prefixes = [prefix for prefix, seeds in jobs for _ in seeds]
        seeds = [s for _, group in jobs for s in group]
        sessions = await asyncio.gather(*(self.engine.create_session(tokens=p)
                                          for p in prefixes))
        gens = await asyncio.gather(*(s.generate(
            max_tokens=self.bench.step_tokens, temperature=self.bench.temperature, seed=seed,
            ignore_eos=True) for s, seed in zip(sessions, seeds)))
        await self._sample()
        await asyncio.gather(*(s.close() for s in sessions))
        return _regroup([(p + g.tokens, g.tokens, sum(g.logprobs)) for p, g in zip(prefixes, gens)],
                        [len(group) for _, group in jobs])

    async def park(self, node):
        return node

    async def release(self, nodes) -> None:
        pass


def _regroup(items: list, sizes: list[int]) -> list[list]:
    """Splits items into consecutive groups of the given sizes."""
    it = iter(items)
    return [[next(it) for _ in range(n)] for n in sizes]


class _HF:
    """transformers: a node is (DynamicCache, next-token logits); a branch deep-copies its
    parent's cache and decodes one token at a time. Peak = bytes of all live caches."""

    def __init__(self, net, bench: TreeBench, engine):
        import inspect

        self.net, self.bench, self.engine = net, bench, engine
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns)
        params = inspect.signature(net.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.live: dict[int, object] = {}  # id(node) -> its cache
        self.peak = 0

    async def root(self, prompt: list[int]):
        node = self._track(await on_engine_thread(self.engine, self._prefill, prompt))
        self._sample()
        return node

    def _prefill(self, prompt: list[int]):
        import torch

        with torch.inference_mode():
            out = self.net(torch.tensor([prompt], device=self.bench.device), use_cache=True,
                           logits_to_keep=1)
        return out.past_key_values, out.logits[0, -1].float()

    async def expand(self, jobs, drop_parents: bool):
        groups = []
        for node, seeds in jobs:
            group = []
            for seed in seeds:
                cache, tokens, lp, logits = await on_engine_thread(self.engine, self._branch,
                                                                   node, seed)
                group.append((self._track((cache, logits)), tokens, lp))
                self._sample()
            if drop_parents:
                await self.release([node])
            groups.append(group)
        sync(self.bench.device)
        return groups

    def _branch(self, node, seed: int):
        """A deep copy of node's cache, then step_tokens decoded into it."""
        cache = copy.deepcopy(node[0])
        tokens, lp, logits = self._decode(cache, node[1], seed)
        sync(self.bench.device)
        return cache, tokens, lp, logits

    def _decode(self, cache, logits, seed: int):
        """Samples step_tokens tokens after logits, feeding each into cache. Returns
        (tokens, their logprob sum, the next logits). Sampling is the engine's (an
        exponential race on a per-branch generator)."""
        import torch

        gen = torch.Generator(device=self.bench.device)
        gen.manual_seed(seed)
        tokens, total = [], 0.0
        with torch.inference_mode():
            for _ in range(self.bench.step_tokens):
                probs = torch.softmax(logits / self.bench.temperature, dim=-1)
                noise = torch.empty_like(probs).exponential_(generator=gen)
                tok = int((probs / noise).argmax())
                total += float(torch.log_softmax(logits, dim=-1)[tok])
                tokens.append(tok)
                out = self.net(torch.tensor([[tok]], device=self.bench.device),
                               use_cache=True, **{self.cache_arg: cache})
                logits = out.logits[0, -1].float()
        return tokens, total, logits

    def _track(self, node):
        self.live[id(node)] = node[0]
        return node

    async def park(self, node):
        return node

    async def release(self, nodes) -> None:
        for node in nodes:
            self.live.pop(id(node), None)

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(cache_bytes(c) for c in self.live.values()))


def cache_bytes(cache) -> int:
    """Bytes of a transformers DynamicCache's key and value tensors."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5 (and late 4.x)
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None),
                                                   getattr(layer, "values", None))]
    else:
        tensors = [*cache.key_cache, *cache.value_cache]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- the run ---------------------------------------------------------------------------


def run(bench: TreeBench) -> dict:
    """Runs the benchmark; returns the JSON-ready results (see `render`). The
    transformers peer is skipped (with a note) when transformers is not installed."""
    return asyncio.run(_run(bench))


async def _run(bench: TreeBench) -> dict:
    from agentos import AsyncEngine

    threads = set_threads(bench.threads)
    plan = mcts_plan(bench.mcts_iterations, bench.mcts_expand, bench.mcts_depth, bench.seed)
    kv_blocks = _kv_blocks(bench, plan)
    notes = []
    async with AsyncEngine(model=bench.model, device=bench.device, dtype=bench.dtype,
                           block_size=bench.block_size, kv_blocks=kv_blocks, host_blocks=0,
                           max_batch_tokens=bench.max_batch_tokens) as engine:
        kernel = engine.kernel
        longest = bench.prompt_len + max(bench.depth, bench.mcts_depth) * bench.step_tokens
        if longest > kernel.max_model_len:
            raise ValueError(f"prompt_len + depth * step_tokens ({longest}) exceeds the "
                             f"model's context ({kernel.max_model_len})")
        dtype = kernel.dtype
        block_bytes = (await engine.stats())["kv"]["block_bytes"]
        rng = random.Random(bench.seed)

        def prompt() -> list[int]:
            return random_prompt(bench.prompt_len, kernel.vocab_size,
                                 kernel.model_config.bos_token_id, rng)

        net = None
        if bench.peer:
            try:
                net = await on_engine_thread(engine, load_peer, bench.model, bench.device, dtype)
            except ImportError as e:
                notes.append(f"transformers peer skipped: {e}")
        makers = {"ours": lambda: _Ours(engine, bench, block_bytes),
                  "hf": (lambda: _HF(net, bench, engine)) if net is not None else None,
                  "nofork": lambda: _NoFork(engine, bench, block_bytes),
                  "nocache": lambda: _NoFork(engine, bench, block_bytes, prefix_cache=False)}
        makers = {k: v for k, v in makers.items() if v is not None}
        # warm-up: beam search per system until a step has width * expand children (the
        # first runs at a batch size are slower)
        warm = TreeBench(**{**asdict(bench), "depth": min(bench.depth, _steps_to_width(bench) + 1)})
        with progress(len(makers) * (1 + 2 * bench.repeats), "tree search runs") as advance:
            for make in makers.values():
                b = make()
                await _timed(engine, b, _beam(b, prompt(), warm, -1))
                advance()
            runs = {w: {s: [] for s in makers} for w in WORKLOADS}
            for r in range(bench.repeats):
                for name, make in makers.items():
                    b = make()
                    runs["beam"][name].append(await _timed(engine, b,
                                                           _beam(b, prompt(), bench, r)))
                    advance()
                    b = make()
                    runs["mcts"][name].append(await _timed(
                        engine, b, _mcts(b, prompt(), bench, plan, r, engine.decode)))
                    advance()
        await engine.check()
        stats = await engine.stats()
    return _summarize(bench, dtype, threads, kv_blocks, block_bytes, runs, plan, notes,
                      stats["kv"]["device_blocks_used"])


def _reset_prefix_cache(kernel, enabled: bool) -> None:
    """Empties the engine's prefix cache and switches it on or off (between steps)."""
    kernel.kalloc.flush_cache()
    kernel.config.prefix_cache = enabled


def _steps_to_width(bench: TreeBench) -> int:
    """Beam steps before `width` beams are live."""
    beams, steps = 1, 0
    while beams < bench.width and bench.expand > 1:
        beams, steps = beams * bench.expand, steps + 1
    return steps


async def _timed(engine, backend, search) -> dict:
    """Runs the search (a coroutine over backend); returns wall seconds, peak KV bytes,
    prefix-cache hits and what the search found."""
    # an empty prefix cache: a run neither finds nor is charged for another run's pages
    await on_engine_thread(engine, _reset_prefix_cache, engine.kernel,
                           getattr(backend, "prefix_cache", True))
    hits = (await engine.stats())["prefix_hit_tokens"]
    t0 = time.perf_counter()
    found = await search
    seconds = time.perf_counter() - t0
    hits = (await engine.stats())["prefix_hit_tokens"] - hits
    return {"wall_s": seconds, "peak_kv_bytes": backend.peak,
            "prefix_hit_tokens": hits if not isinstance(backend, _HF) else None, **found}


def _kv_blocks(bench: TreeBench, plan: Plan) -> int:
    """Device blocks that fit both workloads even with no page shared."""
    bs = bench.block_size
    beam_len = bench.prompt_len + bench.depth * bench.step_tokens
    beam = (bench.width * bench.expand + bench.width + 2) * (-(-beam_len // bs) + 1)
    tail = -(-bench.mcts_depth * bench.step_tokens // bs) + 2
    nodes = 1 + sum(len(c) for c in plan.children)
    mcts_len = bench.prompt_len + bench.mcts_depth * bench.step_tokens
    mcts = nodes * tail + (bench.mcts_expand + 2) * (-(-mcts_len // bs) + 1)
    return max(beam, mcts) + 64


def _summarize(bench: TreeBench, dtype, threads: int, kv_blocks: int, block_bytes: int,
               runs: dict, plan: Plan, notes: list[str], blocks_left: int) -> dict:
    workloads = {}
    for w, by_system in runs.items():
        branches = by_system["ours"][0]["branches"]
        tokens = branches * bench.step_tokens
        systems = {}
        for name in SYSTEMS:
            rs = by_system.get(name)
            if not rs:
                systems[name] = None
                continue
            assert all(r["branches"] == branches for r in rs), "systems did unequal work"
            wall = median([r["wall_s"] for r in rs])
            key = "best_logprob" if w == "beam" else "best_value"
            hits = [r["prefix_hit_tokens"] for r in rs]
            systems[name] = {
                "wall_s": wall, "runs_s": [r["wall_s"] for r in rs], "tok_s": tokens / wall,
                "peak_kv_bytes": median([r["peak_kv_bytes"] for r in rs]),
                "prefix_hit_tokens": None if hits[0] is None else median(hits),
                key: median([r[key] for r in rs])}
        ours = systems["ours"]
        ratios = {}
        for peer in PEERS:
            s = systems[peer]
            ratios[f"time_{peer}_over_ours"] = ratio(s["wall_s"], ours["wall_s"]) if s else float("nan")
            ratios[f"kv_{peer}_over_ours"] = (ratio(s["peak_kv_bytes"], ours["peak_kv_bytes"])
                                              if s else float("nan"))
        workloads[w] = {"branches": branches, "tokens": tokens, "systems": systems,
                        "ratios": ratios}
    workloads["mcts"]["expansions"] = len(plan.parents)
    workloads["mcts"]["nodes"] = len(plan.depth)
    checks = []
    beam = workloads["beam"]
    # NOTE: the no-fork target is against re-prefilling (prefix cache off); with the cache
    # on, re-sent prefixes share pages too, and that ratio is reported beside it
    for peer, label, target in (("hf", "HF deepcopy", 5.0),
                                ("nocache", "no-fork re-prefilling (prefix cache off)", 3.0)):
        s = beam["systems"][peer]
        if s is None:
            continue
        x = beam["ratios"][f"time_{peer}_over_ours"]
        checks.append(check(f"beam search >= {target:g}x faster than {label}", x >= target,
                            f"{beam['systems']['ours']['wall_s']:.2f} s vs {s['wall_s']:.2f} s "
                            f"({x:.2f}x)"))
    for peer, label in (("hf", "HF deepcopy"), ("nocache", "no-fork re-prefilling")):
        s = beam["systems"][peer]
        if s is None:
            continue
        ours_kv = beam["systems"]["ours"]["peak_kv_bytes"]
        checks.append(check(f"beam search peak KV < {label}'s", ours_kv < s["peak_kv_bytes"],
                            f"{ours_kv / MB:.1f} MiB vs {s['peak_kv_bytes'] / MB:.1f} MiB "
                            f"({beam['ratios'][f'kv_{peer}_over_ours']:.2f}x)"))
    checks.append(check("every block free after the runs", blocks_left == 0,
                        f"{blocks_left} device blocks still in use"))
    return {"bench": "tree", "config": {**asdict(bench), "dtype": dtype_name(dtype),
                                          "threads": threads, "kv_blocks": kv_blocks,
                                          "block_bytes": block_bytes},
            "workloads": workloads, "notes": notes, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def render(result: dict, console=None) -> None:
    """Prints the results as rich tables plus one PASS/FAIL line per target."""
    console = console or new_console()
    cfg = result["config"]
    names = {"ours": "ours (fork)", "hf": "HF deepcopy", "nofork": "no-fork, prefix cache",
             "nocache": "no-fork, re-prefill"}
    shapes = {
        "beam": f"beam search: width {cfg['width']}, depth {cfg['depth']}, {cfg['expand']} "
                "children per beam",
        "mcts": f"MCTS: {result['workloads']['mcts']['expansions']} expansions of "
                f"{cfg['mcts_expand']}, depth limit {cfg['mcts_depth']}"}
    for w, rec in result["workloads"].items():
        rows = []
        for name in SYSTEMS:
            s = rec["systems"][name]
            if s is None:
                continue
            best = s.get("best_logprob", s.get("best_value"))
            rows.append([names[name], s["wall_s"], s["tok_s"], s["peak_kv_bytes"] / MB,
                         s["prefix_hit_tokens"], best,
                         1.0 if name == "ours" else rec["ratios"][f"time_{name}_over_ours"],
                         1.0 if name == "ours" else rec["ratios"][f"kv_{name}_over_ours"]])
        best_col = "best logprob" if w == "beam" else "best value"
        print_table(f"{shapes[w]}; {rec['branches']} branches x {cfg['step_tokens']} tokens, "
                    f"{cfg['prompt_len']}-token prompt, median of {cfg['repeats']}; model "
                    f"{cfg['model']}, {cfg['device']}, {cfg['dtype']}, {cfg['threads']} threads; "
                    "x = peer / ours",
                    ["system", "wall s", "tok/s", "peak KV MiB", "prefix hits", best_col,
                     "time x", "KV x"], rows, console)
    for note in result["notes"]:
        console.print(note)
    print_checks(result["checks"], console)
