"""Tree search over forkable sessions (agentos.search): the kept branches are the best by
the value function, pruned branches are closed at once (their blocks freed), MCTS finds a
verifiable answer and releases every snapshot; the same on Engine, AsyncEngine and REST."""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import uvicorn

from agentos import AsyncClient, AsyncEngine, Client, Engine
from agentos.api.app import ServerSettings, create_app
from agentos.bench.api import free_port
from agentos.search import Node, _select, beam_search, best_of_n, mcts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGET = ord("a")  # the toy task: make the model write this byte


@pytest.fixture(scope="module")
def engine():
    with Engine("tiny", kv_blocks=4096) as e:
        yield e


def _used(engine) -> int:
    return engine.stats()["kv"]["device_blocks_used"]


def _live_ids(engine) -> set[str]:
    return {s["id"] for s in engine.list_sessions()}


def _root(engine, prompt: str = "Q: find the way.\n"):
    root = engine.create_session(prompt=prompt, seed=0)
    root.generate(max_tokens=1, temperature=0.0)  # prefilled: its blocks count in the base
    return root


def _contains_target(session, node) -> float:
    return float(TARGET in node.tokens)


def test_best_of_n_keeps_the_best_and_frees_the_rest(engine):
    root = _root(engine)
    tokens, base = root.tokens, _used(engine)
    cands = best_of_n(root, 6, max_tokens=8, keep=2, seed=1)
    assert len(cands) == 6 and root.tokens == tokens
    values = [c.value for c in cands]
    assert values == sorted(values, reverse=True)
    for c in cands:  # the default value is the mean logprob, recomputed by the model
        assert c.value == pytest.approx(c.logprob / len(c.tokens))
        assert c.logprob == pytest.approx(sum(root.score(tokens=c.tokens)), abs=1e-3)
    kept = [c.session for c in cands[:2]]
    assert all(s is not None for s in kept) and all(c.session is None for c in cands[2:])
    assert _live_ids(engine) == {root.id} | {s.id for s in kept}
    assert kept[0].tokens == tokens + cands[0].tokens
    again = best_of_n(root, 6, max_tokens=8, keep=0, seed=1)  # seeded: the same samples
    assert [c.tokens for c in again] == [c.tokens for c in cands]
    for s in kept:
        s.close()
    assert _used(engine) == base
    with pytest.raises(ValueError):
        best_of_n(root, 2, max_tokens=4, keep=3)
    root.close()
    engine.check()


def test_beam_search_keeps_the_top_and_closes_pruned_branches(engine):
    root = _root(engine)
    tokens, base = root.tokens, _used(engine)
    width, expand = 3, 2
    seen = defaultdict(list)  # step -> every candidate valued there
    live_counts = []

    def value(session, cand):
        seen[cand.num_steps].append(cand)
        live_counts.append(len(engine.list_sessions()))
        assert session.tokens == tokens + cand.tokens  # the branch's session is at the candidate
        return cand.logprob

    beams = beam_search(root, width=width, depth=3, expand=expand, step_tokens=6, seed=2,
                        value_fn=value)
    assert len(beams) == width and root.tokens == tokens
    assert [len(seen[s]) for s in (1, 2)] == [expand, min(expand, width) * expand]
    # every child extends a beam kept at the step before
    for step in (2, 3):
        kept = sorted(seen[step - 1], key=lambda c: c.value, reverse=True)[:width]
        for c in seen[step]:
            assert any(c.tokens[: len(k.tokens)] == k.tokens for k in kept if not k.finished)
    # the beams are the best by value: replay the selection over everything that was valued
    done, live = [], []
    for step in sorted(seen):
        top = sorted(seen[step], key=lambda c: c.value, reverse=True)[:width]
        done = sorted(done + [c for c in top if c.finished], key=lambda c: c.value, reverse=True)
        done, live = done[:width], [c for c in top if not c.finished]
    expected = sorted(done + live, key=lambda c: c.value, reverse=True)[:width]
    assert [id(c) for c in expected] == [id(b) for b in beams]
    for b in beams:  # cumulative logprob over forks equals the model's score of the whole beam
        assert b.value == pytest.approx(sum(root.score(tokens=b.tokens)), abs=1e-3)
    # pruned branches were closed at once: never more than the root and one step's children
    assert max(live_counts) <= 1 + width * expand
    assert _live_ids(engine) == {root.id} | {b.session.id for b in beams}
    assert _used(engine) - base <= sum(b.session.info()["device_blocks"] for b in beams)
    for b in beams:
        b.session.close()
    assert _used(engine) == base
    root.close()
    engine.check()


def test_beam_search_stop_strings_end_steps_and_eos_ends_beams(engine):
    root = _root(engine, "steps:\n")
    seen = []

    def value(session, cand):
        seen.append(cand)
        return cand.logprob

    beams = beam_search(root, width=4, depth=5, step_tokens=8, stop=["\n", "a", "b", "c"],
                        seed=5, value_fn=value, is_final=lambda c: len(c.tokens) >= 20)
    kinds = set()
    for c in seen:
        eos = c.finish_reason == "stop" and c.tokens[-1] in engine.kernel.eos_ids
        at_stop_string = c.finish_reason == "stop" and not eos
        assert c.finished == (eos or len(c.tokens) >= 20)
        kinds.add("eos" if eos else "final" if c.finished else "stop string" if at_stop_string
                  else "length")
    assert kinds == {"eos", "final", "stop string", "length"}
    assert all(b.finished for b in beams) and max(b.num_steps for b in beams) < 5
    for b in beams:
        b.session.close()
    root.close()
    engine.check()


def test_mcts_finds_the_target_and_releases_every_snapshot(engine):
    root = _root(engine)
    tokens, base = root.tokens, _used(engine)
    snapshots, steps = engine.stats()["snapshots"], engine.stats()["steps"]
    r = mcts(root, value_fn=_contains_target, iterations=60, expand=4, step_tokens=8,
             max_depth=6, seed=0, target_value=1.0, keep_session=True)
    assert r.value == 1.0 and TARGET in r.tokens
    assert r.session.tokens == tokens + r.tokens and root.tokens == tokens
    assert r.num_nodes == 1 + 4 * r.num_expansions and r.depth <= r.max_depth <= 6
    _check_tree(r.tree)
    # every child of a round generates at once: far fewer engine steps than tokens
    assert engine.stats()["steps"] - steps < (r.num_nodes - 1) * 8 / 2
    assert engine.stats()["snapshots"] == snapshots
    assert _live_ids(engine) == {root.id, r.session.id}
    r.session.close()
    assert _used(engine) == base
    root.close()
    engine.check()


def test_a_failing_value_fn_releases_everything(engine):
    root = _root(engine)
    base, snapshots = _used(engine), engine.stats()["snapshots"]
    calls = []

    def flaky(session, cand):
        calls.append(cand)
        if len(calls) == 7:
            raise RuntimeError("verifier down")
        return 0.5

    with pytest.raises(RuntimeError, match="verifier down"):
        mcts(root, value_fn=flaky, iterations=20, expand=2, step_tokens=4, seed=0)
    calls.clear()
    with pytest.raises(RuntimeError, match="verifier down"):
        beam_search(root, width=2, depth=5, step_tokens=4, seed=0, value_fn=flaky)
    assert _live_ids(engine) == {root.id} and engine.stats()["snapshots"] == snapshots
    assert _used(engine) == base
    root.close()
    engine.check()


def _check_tree(root: Node) -> None:
    """Backup invariants: a node's visits (values) are its own plus its children's."""
    stack, seen = [root], 0
    while stack:
        node = stack.pop()
        seen += 1
        assert node.snapshot is None
        if node.children:
            own = 0 if node.parent is None else 1
            assert node.visits == own + sum(c.visits for c in node.children)
            assert node.value_sum == pytest.approx(own * node.value
                                                   + sum(c.value_sum for c in node.children))
            assert all(c.depth == node.depth + 1 and c.parent is node for c in node.children)
        elif node.parent is not None:  # a leaf: its creation plus revisits, each worth its value
            assert node.visits >= 1 and node.value_sum == pytest.approx(node.visits * node.value)
        stack.extend(node.children)
    assert seen > 1


def test_select_spreads_over_leaves_and_revisits_terminals():
    tree = Node(0, None, 0)
    a, b, c = (Node(i, tree, 1, value=v) for i, v in ((1, 0.9), (2, 0.5), (3, 0.1)))
    tree.children = [a, b, c]
    for n in (a, b, c):
        n.visits, n.value_sum = 1, n.value
    tree.visits = 3
    leaves, revisits = _select(tree, c_uct=0.1, k=2)  # the virtual loss moves the 2nd pick
    assert leaves == [a, b] and revisits == 0
    assert (tree.visits, a.visits, b.visits) == (3, 1, 1)  # the losses were taken back
    a.terminal = True
    leaves, revisits = _select(tree, c_uct=0.1, k=1)
    assert leaves == [] and revisits == 1 and a.visits == 2 and tree.visits == 4


async def test_async_engine_gives_the_same_searches_as_engine():
    prompt = "Q: find the way.\n"
    with Engine("tiny", kv_blocks=1024) as sync_engine:
        root = _root(sync_engine, prompt)
        # a sync backend called from a running event loop: the search runs beside it
        want = beam_search(root, width=2, depth=2, step_tokens=5, seed=3)
        want_mcts = mcts(root, value_fn=_contains_target, iterations=12, expand=2, step_tokens=6,
                         seed=4)
    async with AsyncEngine("tiny", kv_blocks=1024) as engine:
        root = await engine.create_session(prompt=prompt, seed=0)
        await root.generate(max_tokens=1, temperature=0.0)
        tokens = await root.tokens

        async def value(session, node):  # an async value_fn, at the node's session
            assert await session.tokens == tokens + node.tokens
            return _contains_target(session, node)

        got = await beam_search(root, width=2, depth=2, step_tokens=5, seed=3)
        assert [b.tokens for b in got] == [b.tokens for b in want]
        assert [b.value for b in got] == pytest.approx([b.value for b in want], abs=1e-3)
        r = await mcts(root, value_fn=value, iterations=12, expand=2, step_tokens=6, seed=4)
        assert (r.tokens, r.value, r.num_nodes) == (want_mcts.tokens, want_mcts.value,
                                                    want_mcts.num_nodes)
        for b in got:
            await b.session.close()
        await root.close()
        stats = await engine.stats()
        assert stats["kv"]["device_blocks_used"] == 0 and stats["snapshots"] == 0


@pytest.fixture(scope="module")
def url():
    """A real HTTP server (uvicorn in a thread) over an AsyncEngine; yields its URL."""
    engine = AsyncEngine("tiny", kv_blocks=2048)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServerSettings(), engine=engine),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.kernel.shutdown()


def test_searches_over_rest(url):
    with Client(url) as client:
        root = client.create_session(prompt="Q: find the way.\n", seed=0)
        beams = beam_search(root, width=2, depth=2, step_tokens=5, stop="\n", seed=3)
        assert len(beams) == 2 and beams[0].value >= beams[1].value
        assert {s["id"] for s in client.list_sessions()} == {root.id} | {b.session.id for b in beams}
        for b in beams:
            assert b.session.tokens == root.tokens + b.tokens
            b.session.close()
        r = mcts(root, value_fn=_contains_target, iterations=40, expand=4, step_tokens=8,
                 seed=0, target_value=1.0)
        assert r.value == 1.0 and r.session is None
        root.close()
        stats = client.stats()
        assert stats["kv"]["device_blocks_used"] == 0 and stats["snapshots"] == 0


async def test_async_client_best_of_n(url):
    async with AsyncClient(url) as client:
        root = await client.create_session(prompt="Q: ", seed=0)
        cands = await best_of_n(root, 4, max_tokens=6, keep=1, seed=1)
        assert cands[0].session is not None and all(c.session is None for c in cands[1:])
        assert [c.value for c in cands] == sorted((c.value for c in cands), reverse=True)
        assert all(math.isfinite(c.value) for c in cands)
        await cands[0].session.close()
        await root.close()
        assert (await client.stats())["kv"]["device_blocks_used"] == 0


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_run(capsys):
    assert _example("tree_search_mcts").main(["--iterations", "100"]) == 0
    out = capsys.readouterr().out
    assert "verified: 3 reaches 24" in out
    assert _example("beam_search").main(["--width", "2", "--depth", "2", "--step-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "#2 logprob" in out and "after closing the beams: 0" in out


def test_mcts_example_verifier_rejects_wrong_answers():
    ex = _example("tree_search_mcts")
    assert ex.closeness(3, 24, "*3 -> 9\n-1 -> 8\n*3 -> 24\n") == 1.0
    assert ex.closeness(3, 24, "*3 -> 9\n") < 0.9
    with pytest.raises(ValueError):
        ex.replay(3, "*3 -> 10\n")  # a wrong echo
    with pytest.raises(ValueError):
        ex.replay(3, "/2 -> 1\n")  # not an action
