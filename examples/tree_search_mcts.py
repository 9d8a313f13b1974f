"""MCTS on a verifiable task: reach a target number from a start with the steps +2, *3, -1.

Every node of the tree is a snapshot of the session. Expanding a node asks the model for
the next action: the logprobs of the actions' first tokens (`next_token_logprobs(
candidates=...)`) are the policy, sampled without replacement (Gumbel top-k) so that the
children of one expansion take distinct actions. The action and the environment's echo
of the new number are appended to the session (given tokens). A verifier replays the
actions: the value is the closeness to the target, 1.0 when it is reached.

    python examples/tree_search_mcts.py                                # in-process tiny model
    python examples/tree_search_mcts.py --url http://127.0.0.1:8000    # a running server

Exits with 0 when it found a verified answer, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import agentos
from agentos.search import mcts

ACTIONS = {"+2": lambda x: x + 2, "*3": lambda x: x * 3, "-1": lambda x: x - 1}


def replay(start: int, text: str) -> list[tuple[str, int]]:
    """Replays the steps written in text ("<action> -> <number>" lines); returns (action,
    number) pairs. Raises ValueError when a line is not a step or its echo is wrong."""
    steps, x = [], start
    for line in text.splitlines():
        action, _, echo = line.partition(" -> ")
        x = ACTIONS[action](x) if action in ACTIONS else None
        if x is None or echo != str(x):
            raise ValueError(f"bad step {line!r}")
        steps.append((action, x))
    return steps


def closeness(start: int, target: int, text: str) -> float:
    """The value of a path: 1.0 at the target, below 0.9 and falling with the distance."""
    steps = replay(start, text)
    x = steps[-1][1] if steps else start
    return 1.0 if x == target else 0.9 * math.exp(-abs(target - x) / max(abs(target), 1))


def make_step(backend, start: int, target: int, seed: int):
    """Returns step_fn(session, leaf, i): takes the i-th action of a Gumbel top-k sample
    from the model's logprobs over the actions, appends it with its echo, and returns a
    Generation of it (finish_reason "stop" at the target, which ends the branch)."""
    first_ids = [backend.encode(a)[0] for a in ACTIONS]

    def step(session, leaf, i):
        logprobs = session.next_token_logprobs(top_k=1, candidates=first_ids).candidate_logprobs
        rng = random.Random(seed * 1_000_003 + leaf.id)  # the same draw for all of leaf's children
        keys = [lp - math.log(-math.log(rng.random() or 1e-12)) for lp in logprobs]
        a = sorted(range(len(ACTIONS)), key=lambda j: -keys[j])[i % len(ACTIONS)]
        action = list(ACTIONS)[a]
        steps = replay(start, leaf.text)
        x = ACTIONS[action](steps[-1][1] if steps else start)
        text = f"{action} -> {x}\n"
        session.append(text=text)
        return agentos.Generation([], text, [logprobs[a]], "stop" if x == target else "length")

    return step


def solve(backend, args) -> bool:
    prompt = f"Reach {args.target} from {args.start} with +2, *3 or -1, one step a line.\n"
    root = backend.create_session(prompt=prompt, seed=args.seed)
    t0 = time.perf_counter()
    result = mcts(root, value_fn=lambda s, node: closeness(args.start, args.target, node.text),
                  iterations=args.iterations, expand=args.expand, max_depth=args.max_depth,
                  concurrency=args.concurrency, target_value=1.0,
                  step_fn=make_step(backend, args.start, args.target, args.seed))
    elapsed = time.perf_counter() - t0
    root.close()
    print(f"{result.num_expansions} expansions, {result.num_nodes} nodes, depth up to "
          f"{result.max_depth}, {elapsed:.2f} s")
    steps = replay(args.start, result.text)  # verify independently of the search's value
    found = bool(steps) and steps[-1][1] == args.target
    chain = " ".join(f"{a} -> {x}" for a, x in steps)
    print(f"best (value {result.value:.3f}): {args.start} {chain}")
    print(f"verified: {args.start} reaches {args.target}" if found
          else f"not found: ends at {steps[-1][1] if steps else args.start}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model for the in-process engine")
    p.add_argument("--url", help="use a running AgentOS server instead")
    p.add_argument("--start", type=int, default=3)
    p.add_argument("--target", type=int, default=24)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--expand", type=int, default=2, help="children per expansion")
    p.add_argument("--max-depth", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4, help="leaves expanded together")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.url:
        with agentos.Client(args.url) as client:
            found = solve(client, args)
    else:
        with agentos.Engine(model=args.model) as engine:
            found = solve(engine, args)
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
