"""Beam search over steps, valued by the model's own cumulative logprob.

Each step forks every beam (copy-on-write: no KV is copied), generates one step in all
children at once (they batch into the same engine steps), keeps the best `width` and
closes the rest at once, which frees their blocks.

    python examples/beam_search.py                                # in-process tiny model
    python examples/beam_search.py --url http://127.0.0.1:8000    # a running server
"""

from __future__ import annotations

import argparse
import sys
import time

import agentos
from agentos.search import beam_search


def run(backend, args) -> list:
    root = backend.create_session(prompt=args.prompt, seed=args.seed)
    t0 = time.perf_counter()
    beams = beam_search(root, width=args.width, depth=args.depth, step_tokens=args.step_tokens,
                        stop="\n", temperature=args.temperature, seed=args.seed)
    elapsed = time.perf_counter() - t0
    print(f"{len(beams)} beams, width {args.width}, depth {args.depth}, {elapsed:.2f} s; "
          f"live sessions: {len(backend.list_sessions())} (the root and the beams)")
    for rank, b in enumerate(beams, 1):
        state = "finished" if b.finished else f"{b.num_steps} steps"
        print(f"#{rank} logprob {b.value:8.2f} ({state}, {len(b.tokens)} tokens): {b.text!r}")
    for b in beams:
        b.session.close()
    print("KV blocks held by the search after closing the beams:",
          backend.stats()["kv"]["device_blocks_used"] - root.info()["device_blocks"])
    root.close()
    return beams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model for the in-process engine")
    p.add_argument("--url", help="use a running AgentOS server instead")
    p.add_argument("--prompt", default="Plan, one step a line:\n")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--step-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.url:
        with agentos.Client(args.url) as client:
            beams = run(client, args)
    else:
        with agentos.Engine(model=args.model) as engine:
            beams = run(engine, args)
    return 0 if beams else 1


if __name__ == "__main__":
    sys.exit(main())
