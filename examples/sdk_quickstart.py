"""The same agent code in-process and against a server.

    python examples/sdk_quickstart.py                         # in-process Engine
    python examples/sdk_quickstart.py http://127.0.0.1:8000   # a running `agentos serve`
"""

from __future__ import annotations

import sys

import agentos


def agent(backend) -> None:
    s = backend.create_session(prompt="You are a careful agent. Task: add 2 and 3.\n", seed=0)
    g = s.generate(max_tokens=16, temperature=0.7)
    print(f"generated {len(g.tokens)} tokens ({g.finish_reason}): {g.text!r}")
    s.append(text="\n[tool] calculator: 5\n")  # tool output: masked out of RL losses
    snap = s.snapshot()  # a node of a search tree
    branches = s.fork(n=3)  # copy-on-write: no KV is copied
    for b in branches:
        print(f"  branch {b.id}: {b.generate(max_tokens=8, temperature=1.0).text!r}")
    print("streamed: ", end="")
    for chunk in s.generate(max_tokens=8, stream=True):
        print(chunk.text, end="", flush=True)
    print()
    s.rollback(snap)  # back to the node: tokens, KV pages and RNG as they were
    assert len(s.tokens) == snap.num_tokens
    try:
        backend.session("sess_does_not_exist")
    except agentos.NotFoundError as e:
        print(f"errors carry their status: {e.status_code} {e.message}")
    for b in [*branches, s]:
        b.close()
    snap.delete()
    print("KV blocks in use after closing:", backend.stats()["kv"]["device_blocks_used"])


def main() -> None:
    if len(sys.argv) > 1:
        with agentos.Client(sys.argv[1]) as client:
            agent(client)
    else:
        with agentos.Engine(model="tiny") as engine:
            agent(engine)


if __name__ == "__main__":
    main()
