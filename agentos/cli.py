"""The `agentos` command: `agentos run` (the main job on a model) and `agentos bench`.

Thin: argument parsing and printing. Benchmarks live in `agentos.bench`; torch is
imported only once a command runs, so `import agentos.cli` stays light.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentos.api.app import ServerSettings


def main(argv: Sequence[str] | None = None) -> int:
    """Parses argv (default: sys.argv[1:]) and runs the command. Returns the exit status:
    0 done; 1 a check failed (a benchmark target under --strict, or `run` found the rolled
    back session unequal to its snapshot); 2 bad arguments or model."""
    parser = _parser()
    args = parser.parse_args(argv)
    missing = _missing_bench_extra(args)
    if missing:  # fail now, not once a long benchmark has run
        parser.exit(2, f"agentos: error: {missing}\n")
    if getattr(args, "plot", None):  # fail now, not once a long benchmark has run
        from agentos.bench.plot import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as e:
            parser.exit(2, f"agentos: error: {e}\n")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"agentos: error: {e}\n")
    except ImportError as e:  # an optional extra missing: one line, not a traceback
        parser.exit(2, f"agentos: error: {e}\n")


def _missing_bench_extra(args: argparse.Namespace) -> str | None:
    """Why this benchmark cannot run here (its transformers peer, or gpu's checkpoints,
    need the bench extra), or None."""
    import importlib.util

    if args.command != "bench":
        return None
    if args.scenario == "structured" and importlib.util.find_spec("jsonschema") is None:
        return ("`agentos bench structured` validates its outputs with jsonschema, which is "
                "not installed: pip install 'agentos[bench]'")
    needs = args.scenario == "gpu" or (args.scenario in ("fork", "decode")
                                       and getattr(args, "peer", None) is not False)
    if not needs or importlib.util.find_spec("transformers") is not None:
        return None
    hint = "" if args.scenario == "gpu" else " (or --no-peer to skip the peer)"
    return (f"`agentos bench {args.scenario}` compares against transformers, which is not "
            f"installed: pip install 'agentos[bench]'{hint}")


def _parser() -> argparse.ArgumentParser:
    from agentos import __version__

    parser = argparse.ArgumentParser(prog="agentos", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agentos {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="create, generate, snapshot, fork, roll back",
                              description="The main job: a session generates, is "
                              "snapshotted, forked n ways (each child generates), and "
                              "rolled back; prints the session tree, syscall timings and "
                              "engine stats.")
    _config_flags(run.add_argument_group("engine", "the engine's options (Config)"),
                  skip=_RUN_SKIP)
    run.add_argument("--prompt", default="Once upon a time, an agent",
                     help="the session's prompt (BOS is prepended)")
    run.add_argument("--n", type=int, default=4, help="children to fork")
    run.add_argument("--max-tokens", type=int, default=32, help="tokens per generate call")
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                     help="generate past end-of-sequence (default: on for the random-weight "
                     "tiny model, whose EOS means nothing; off otherwise)")
    run.set_defaults(func=_cmd_run)

    serve = commands.add_parser("serve", help="the REST API (and OpenAI-compatible routes)",
                                description="Serves sessions over HTTP: FastAPI under uvicorn.")
    _config_flags(serve.add_argument_group("engine", "the engine's options (Config)"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-keys", default=None, metavar="FILE",
                       help='JSON {"keys": {key: tenant}, "tenants": {tenant: limits}}; '
                       "AGENTOS_API_KEYS='key=tenant,...' is read too")
    serve.add_argument("--allow-open", action="store_true",
                       help="serve without API keys on a non-loopback address")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name of the OpenAI routes (default: the folder's name)")
    serve.add_argument("--max-body-bytes", type=int, default=16 << 20)
    serve.add_argument("--max-import-bytes", type=int, default=None,
                       help="an import's body at most (default: a full context with its KV)")
    serve.add_argument("--body-timeout-s", type=float, default=60.0,
                       help="seconds a request body may take to arrive (408 after; for "
                       "weight and import uploads: each chunk)")
    _connection_flags(serve)
    serve.add_argument("--max-tokens-cap", type=int, default=4096,
                       help="max_tokens of one generate call at most (0: the context length)")
    serve.add_argument("--max-sessions-per-tenant", type=int, default=None)
    serve.add_argument("--max-tokens-per-tenant", type=int, default=None)
    serve.add_argument("--max-snapshots-per-tenant", type=int, default=None)
    serve.add_argument("--requests-per-s-per-tenant", type=float, default=None,
                       help="requests a second each tenant may send (bursts of one second's "
                       "worth); past it a 429 with Retry-After, before the body is read")
    serve.add_argument("--body-bytes-per-s-per-tenant", type=float, default=None,
                       help="request body bytes a second each tenant may send (as above)")
    serve.add_argument("--allow-open-admin", action="store_true",
                       help="without API keys, let any request update weights and pause, "
                       "abort or sleep the engine (with keys: tenants marked admin)")
    serve.add_argument("--worker", action="store_true",
                       help="register in Redis (--store) and heartbeat, to serve behind `agentos "
                       "gateway`; the --worker-id is then HOST:PORT unless given")
    serve.add_argument("--advertise-url", default=None,
                       help="the URL the gateway uses to reach this worker (default http://HOST:PORT)")
    serve.add_argument("--heartbeat-s", type=float, default=1.0,
                       help="a worker renews its lease this often, in seconds (the lease lasts "
                       "3 intervals: the gateway's --worker-timeout)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="one line per request and event: key=value text or JSON")
    serve.set_defaults(func=_cmd_serve)

    gateway = commands.add_parser("gateway", help="one address in front of several workers",
                                  description="Routes each session to its worker (`agentos "
                                  "serve --redis URL --worker`), places new sessions on the "
                                  "least loaded one and moves the sessions of a dead worker "
                                  "to the others.")
    gateway.add_argument("--redis", required=True, metavar="URL",
                         help="the redis:// URL the workers journal to")
    gateway.add_argument("--deployment", default="default",
                         help="namespace of the deployment's keys in Redis")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8080)
    gateway.add_argument("--worker-timeout", type=float, default=3.0,
                         help="seconds without a heartbeat before a worker is dead and its "
                         "sessions move (workers beat every third of it: --heartbeat-s)")
    _connection_flags(gateway)
    gateway.add_argument("--log-level", default="info")
    gateway.set_defaults(func=_cmd_gateway)

    top = commands.add_parser("top", help="a live view of a running server (like htop)",
                              description="Memory per tier, swap traffic, steps, tokens/s, the "
                              "MLFQ queue and one row per session of the API key's tenant, "
                              "refreshed every --interval seconds; keys (on a terminal): s "
                              "changes the sort, q quits.")
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the server (or gateway)")
    top.add_argument("--api-key", default=None, help="default: $AGENTOS_API_KEY")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    # NOTE: agentos.top.SORTS, spelled out so that parsing does not import httpx and rich
    top.add_argument("--sort", default="activity",
                     choices=("activity", "tokens", "rate", "blocks", "swapped", "level", "state", "id"),
                     help="the order of the sessions (activity: most recent first)")
    top.add_argument("--limit", type=int, default=None, metavar="N",
                     help="show at most N sessions (default: all with --once, what fits the "
                     "terminal otherwise)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_cmd_top)

    bench = commands.add_parser("bench", help="benchmarks against HF transformers (fork, "
                                "decode, tree), in-process calls (api), plain copies (swap) or "
                                "the other scheduler (agents)")
    scenarios = bench.add_subparsers(dest="scenario", required=True)

    fork = scenarios.add_parser("fork", help="fork/snapshot/rollback cost vs session length")
    _bench_options(fork)
    fork.add_argument("--lengths", type=_int_list, default=None,
                      help="session lengths, comma-separated (default 512,4096,16384)")
    fork.add_argument("--fanout-len", type=int, default=None,
                      help="length of the session forked n ways (default 8192)")
    fork.add_argument("--fanout", type=int, default=None, help="n of that fork (default 16)")
    fork.add_argument("--peer-repeats", type=int, default=None,
                      help="timed HF re-prefills per length (default 2)")
    fork.add_argument("--warmup", type=int, default=None, help="untimed repeats (default 3)")
    fork.set_defaults(func=_cmd_bench_fork)

    decode = scenarios.add_parser("decode", help="decode throughput vs HF generate")
    _bench_options(decode)
    decode.add_argument("--sessions", type=int, default=None,
                        help="concurrent sessions / HF batch size (default 32)")
    decode.add_argument("--prompt-len", type=int, default=None, help="default 128")
    decode.add_argument("--new-tokens", type=int, default=None, help="default 64")
    decode.add_argument("--no-single", dest="single", action="store_false", default=None,
                        help="skip the one-session case")
    decode.add_argument("--max-batch-tokens", type=int, default=None)
    decode.set_defaults(func=_cmd_bench_decode)

    swap = scenarios.add_parser("swap", help="swap bandwidth vs plain copy; an oversubscribed "
                                "multi-turn run vs an unconstrained one",
                                description="Times swap_out/swap_in of KV blocks (contiguous "
                                "and scattered slots) against a plain copy of the same bytes, "
                                "then runs a concurrent multi-turn workload unconstrained, in a "
                                "device pool of a fraction of its working set with a host tier "
                                "(swap), and in that pool without one (drop and recompute).")
    _bench_options(swap, peer=False)
    swap.add_argument("--blocks", type=int, default=None,
                      help="blocks moved by each timed swap and copy (default 256)")
    swap.add_argument("--warmup", type=int, default=None, help="untimed copies (default 2)")
    swap.add_argument("--sessions", type=int, default=None,
                      help="concurrent sessions of the workload (default 24)")
    swap.add_argument("--prompt-len", type=int, default=None,
                      help="mean prompt tokens (default 200)")
    swap.add_argument("--turns", type=int, default=None,
                      help="generate calls per session (default 3)")
    swap.add_argument("--new-tokens", type=int, default=None,
                      help="greedy tokens per turn (default 32)")
    swap.add_argument("--min-tool-tokens", type=int, default=None,
                      help="fewest tool tokens appended between turns (default 1)")
    swap.add_argument("--max-tool-tokens", type=int, default=None,
                      help="most tool tokens appended between turns (default 40)")
    swap.add_argument("--oversubscribe", type=int, default=None,
                      help="the small device pool holds the working set / this (default 4)")
    swap.set_defaults(func=_cmd_bench_swap)

    tree = scenarios.add_parser("tree", help="beam search and MCTS over forks vs HF deepcopy and "
                                "no-fork re-sends", description="Runs beam search and MCTS "
                                "three ways doing the same work: branches as fork() children "
                                "on the engine, as deep copies of a transformers DynamicCache, "
                                "and as fresh engine sessions re-sent their whole prefix; "
                                "reports wall time, tokens/s, peak KV memory and the ratios.")
    _bench_options(tree)
    for flag, kind, text in (
            ("--prompt-len", int, "prompt tokens (default 2048)"),
            ("--width", int, "beams kept (default 8)"),
            ("--depth", int, "beam steps (default 8)"),
            ("--expand", int, "children per live beam at each step (default 2)"),
            ("--step-tokens", int, "tokens sampled by each branch (default 16)"),
            ("--mcts-iterations", int, "MCTS expansions (default 32)"),
            ("--mcts-expand", int, "children per MCTS expansion (default 4)"),
            ("--mcts-depth", int, "MCTS depth limit (default 4)"),
            ("--temperature", float, "sampling temperature of every branch (default 1.0)"),
            ("--max-batch-tokens", int, "token budget per engine step (default 2048)")):
        tree.add_argument(flag, type=kind, default=None, help=text)
    tree.set_defaults(func=_cmd_bench_tree)

    agents = scenarios.add_parser("agents", help="turn latency of agent workloads, MLFQ vs FCFS, "
                                  "memory-bound and seat-bound",
                                  description="Runs seeded multi-turn agent workloads (Poisson or "
                                  "bursty arrivals, tool pauses, heavy-tailed generation lengths) "
                                  "on an engine with each scheduler, bound by KV memory (a device "
                                  "pool of a fraction of the working set, a host swap tier) and "
                                  "by seats (a pool that holds everything); reports turn latency "
                                  "(mean, p50, p99, max), tokens/s, paging and scheduling "
                                  "counters and the ratios. Targets apply to the memory-bound "
                                  "median ratios.")
    _model_options(agents)
    for flag, kind, text in (
            ("--sessions", int, "agent sessions per workload (default 24)"),
            ("--turns", int, "generate calls per session (default 3)"),
            ("--arrival-rate", float, "sessions arriving per second, on average (default 5.0)"),
            ("--burst-size", int, "bursty arrivals: mean sessions per burst (default 6)"),
            ("--burst-spread-ms", float, "bursty arrivals: mean gap inside a burst, ms "
             "(default 50)"),
            ("--prompt-median", int, "first prompt length, log-normal median (default 128)"),
            ("--tool-median", int, "tool output per turn, log-normal median (default 32)"),
            ("--gen-median", int, "tool-call turn length, log-normal median (default 8)"),
            ("--gen-sigma", float, "log-normal sigma of tool-call lengths (default 1.0)"),
            ("--long-fraction", float, "share of turns writing a long answer (default 0.12)"),
            ("--long-median", int, "long answer length, log-normal median (default 256)"),
            ("--gen-max", int, "cap of one turn's generation (default 1024)"),
            ("--pause-ms", float, "mean tool pause between turns, ms (default 500)"),
            ("--memory-fraction", float, "memory-bound: the device KV pool as a fraction of "
             "the working set (default 0.2)"),
            ("--max-batch-size", int, "memory-bound: seats per step (default 256)"),
            ("--seats", int, "seat-bound: seats per step (default 2)"),
            ("--max-batch-tokens", int, "token budget per step (default 2048)"),
            ("--block-size", int, None),
            ("--seed", int, "one workload from this seed"),
            ("--seeds", _int_list, "one workload per seed, comma-separated (default 0,1,2); "
             "targets apply to the median ratios"),
            ("--threads", int, "torch intra-op threads (default 1: the same load on a busy "
             "host)")):
        agents.add_argument(flag, type=kind, default=None, help=text)
    agents.add_argument("--arrivals", choices=("poisson", "bursty"), default=None,
                        help="arrival shape of every workload (default: alternating, Poisson "
                        "first: seed 0 Poisson, seed 1 bursty, seed 2 Poisson)")
    agents.add_argument("--bound", choices=("memory", "seats", "both"), default=None,
                        help="what limits the engine: KV memory, seats, or each in turn "
                        "(default both)")
    agents.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    agents.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also draw the comparison there (needs matplotlib)")
    agents.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    agents.add_argument("--simulate", action="store_true",
                        help="drive the real scheduler and pager on modelled time instead of "
                        "the model, at 100 to 10,000 sessions: latency ratios by load and the "
                        "scheduler's cost per step")
    agents.add_argument("--sim-sessions", type=_int_list, default=None,
                        help="--simulate: session counts, comma-separated (default "
                        "100,1000,10000)")
    agents.add_argument("--sim-kv-blocks", type=int, default=None,
                        help="--simulate: the device pool in blocks (default 256)")
    agents.add_argument("--sim-window-s", type=float, default=None,
                        help="--simulate: every session arrives within this many seconds "
                        "(default 2)")
    agents.set_defaults(func=_cmd_bench_agents)

    det = scenarios.add_parser("determinism", help="what batch-invariant mode costs, and that "
                               "it holds", description="Runs one seeded concurrent workload "
                               "with deterministic off and on (alternating), times both, and "
                               "checks that a session alone and inside the batch gives "
                               "bit-identical tokens and logprobs.")
    _bench_options(det, peer=False)
    det.add_argument("--sessions", type=int, default=None, help="concurrent sessions (default 32)")
    det.add_argument("--min-prompt", type=int, default=None, help="default 32")
    det.add_argument("--max-prompt", type=int, default=None, help="default 512")
    det.add_argument("--new-tokens", type=int, default=None, help="default 64")
    det.add_argument("--max-batch-tokens", type=int, default=None, help="default 512")
    det.set_defaults(func=_cmd_bench_determinism)

    structured = scenarios.add_parser(
        "structured", help="what a JSON-schema constraint costs in decode tokens/s",
        description="Concurrent sessions generate the same number of tokens unconstrained "
        "and under a JSON schema they cannot complete in that budget (alternating runs, "
        "medians); checks the cost is under 15%%, that the outputs are JSON prefixes and "
        "that completed documents validate.")
    _bench_options(structured, peer=False)
    structured.add_argument("--sessions", type=int, default=None, help="default 32")
    structured.add_argument("--prompt-len", type=int, default=None, help="default 64")
    structured.add_argument("--new-tokens", type=int, default=None, help="default 128")
    structured.set_defaults(func=_cmd_bench_structured)

    journal = scenarios.add_parser("journal", help="the journal's cost: generate throughput and "
                                   "fork/snapshot/rollback latency, Redis vs in-memory store",
                                   description="Runs the same work with the journal writing to "
                                   "an in-memory store, to Redis (a private redis-server unless "
                                   "--redis is given) and off: concurrent generate throughput and "
                                   "fork, snapshot and rollback latency per session length; "
                                   "reports medians and the ratios to the in-memory store. "
                                   "--repeats counts throughput runs (default 3); torch runs "
                                   "one thread unless --threads says otherwise.")
    _bench_options(journal, peer=False)
    journal.add_argument("--redis", default=None, metavar="URL",
                         help="redis:// URL to journal to (default: start a private redis-server)")
    for flag, kind, text in (
            ("--sessions", int, "concurrent sessions of the throughput runs (default 32)"),
            ("--prompt-len", int, "prompt tokens per session (default 128)"),
            ("--new-tokens", int, "tokens generated per session (default 64)"),
            ("--temperature", float, "sampling temperature (default 0.8)"),
            ("--lengths", _int_list, "session lengths of fork/snapshot/rollback, "
             "comma-separated (default 128,2048,16384)"),
            ("--op-repeats", int, "timed repeats of each op per length (default 50)"),
            ("--warmup", int, "untimed op repeats (default 3)"),
            ("--diverge-tokens", int, "tokens generated between snapshot and rollback (default 4)"),
            ("--max-batch-tokens", int, "token budget per engine step (default 2048)")):
        journal.add_argument(flag, type=kind, default=None, help=text)
    journal.set_defaults(func=_cmd_bench_journal)

    gpu = scenarios.add_parser("gpu", help="the accelerator's numbers: decode vs HF and the "
                               "bandwidth roofline, fork/rollback of a long session, swap",
                               description="On random-weight models in the shapes of "
                               "Qwen2.5-0.5B and Llama-3.2-1B: decode tokens/s per batch size "
                               "against transformers' generate, time per step, the fraction "
                               "of the memory-bandwidth roofline at batch 1, fork and rollback "
                               "latency of a 32k-token session, swap bandwidth against a plain "
                               "pinned copy. Defaults: --device cuda --dtype bfloat16.")
    gpu.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    gpu.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    gpu.add_argument("--repeats", type=int, default=None, help="timed repeats (medians; default 3)")
    gpu.add_argument("--block-size", type=int, default=None)
    gpu.add_argument("--seed", type=int, default=None)
    gpu.add_argument("--no-peer", dest="peer", action="store_false", default=None,
                     help="skip the transformers peer")
    gpu.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                     help="run every decode step eagerly (what the graphs give)")
    gpu.add_argument("--checkpoints", metavar="DIR", default=None,
                     help="keep the random checkpoints in DIR and reuse them in later runs")
    gpu.add_argument("--threads", type=int, default=None)
    gpu.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    gpu.add_argument("--plot", metavar="FILE.png", default=None,
                     help="also draw the comparison there (needs matplotlib)")
    gpu.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    for flag, kind, text in (
            ("--shapes", lambda t: t.split(","), "comma-separated: qwen2.5-0.5b, llama-3.2-1b, "
             "tiny-gqa (default: the first two)"),
            ("--batches", _int_list, "decode batch sizes (default 1,8,32,128)"),
            ("--prompt-len", int, "prompt tokens (default 128)"),
            ("--new-tokens", int, "generated tokens per session (default 128)"),
            ("--fork-len", int, "tokens of the forked / rolled-back session (default 32768)"),
            ("--op-repeats", int, "timed forks and rollbacks (default 20)"),
            ("--swap-blocks", int, "blocks per timed swap (default 512)"),
            ("--copy-bytes", int, "bytes of the bandwidth probe (default 1 GiB)")):
        gpu.add_argument(flag, type=kind, default=None, help=text)
    gpu.set_defaults(func=_cmd_bench_gpu)

    overhead = scenarios.add_parser(
        "overhead", help="where a decode step's and a syscall's host time goes, against HF "
        "generate", description="Splits a decode step at 1, 32 and 256 sessions into "
        "scheduling, metadata, the forward, sampling, bookkeeping and the loop between steps; "
        "times decode beside idle sessions, and fork/snapshot/rollback/info by the direct "
        "path, by the queue and as work alone; runs transformers' generate on the same "
        "weights.")
    _bench_options(overhead)
    for flag, kind, text in (
            ("--sessions", _int_list, "decoding sessions per case, comma-separated "
             "(default 1,32,256)"),
            ("--prompt-len", int, "prompt tokens per session (default 512)"),
            ("--new-tokens", int, "tokens generated per session (default 64)"),
            ("--idle", int, "idle sessions beside one decoding session (default 4000; 0: skip)"),
            ("--syscall-len", int, "tokens of the session the syscalls act on (default 512)"),
            ("--op-repeats", int, "timed repeats of each syscall (default 200)"),
            ("--turn-context", int, "llama.cpp peer: the context of an agent's turn (default "
             "2048 tokens)"),
            ("--turn-tokens", int, "llama.cpp peer: the tokens a turn appends before it "
             "generates one (default 16)")):
        overhead.add_argument(flag, type=kind, default=None, help=text)
    overhead.add_argument("--sync", action="store_true", default=None,
                          help="CUDA: wait for the device after each forward (its time counts "
                          "as the forward's)")
    overhead.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                          default=None, help="run every decode step eagerly")
    overhead.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", default=None,
                          help="skip the llama.cpp peer (run when llama-cpp-python is installed)")
    overhead.set_defaults(func=_cmd_bench_overhead)

    api = scenarios.add_parser("api", help="REST latency of fork/snapshot/rollback/generate "
                               "vs in-process", description="Starts `agentos serve` in a "
                               "subprocess and times fork, snapshot, rollback and a 1-token "
                               "generate over HTTP (JSON and msgpack) against the same ops on "
                               "an in-process Engine.")
    _model_options(api)
    api.add_argument("--tokens", dest="num_tokens", type=int, default=None, metavar="N",
                     help="session length (default 2048)")
    api.add_argument("--repeats", type=int, default=None,
                     help="timed repeats of each op (default 200)")
    api.add_argument("--warmup", type=int, default=None, help="untimed repeats (default 10)")
    api.add_argument("--port", type=int, default=None,
                     help="the server's loopback port (default: a free one)")
    api.add_argument("--block-size", type=int, default=None)
    api.add_argument("--seed", type=int, default=None, help="seeds the random prompt")
    api.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    api.add_argument("--plot", metavar="FILE.png", default=None,
                     help="also draw the comparison there (needs matplotlib)")
    api.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    api.set_defaults(func=_cmd_bench_api)
    rl = scenarios.add_parser(
        "rl", help="GRPO-shaped multi-turn rollouts over HTTP, with and without the prefix cache",
        description="Runs G groups of n trajectories, T turns each (every turn sends the whole "
        "history as token ids to /inference/v1/generate, then a tool answers after a pause), "
        "against `agentos serve` as it is and with --no-prefix-cache. Reports rollout "
        "tokens/s, the rollout step's wall time and the positions computed, and the ratios.")
    _model_options(rl)
    for flag, kind, text in (
            ("--groups", int, "G, prompts per step (default 4)"),
            ("--samples", int, "n, trajectories per group (default 8)"),
            ("--turns", int, "T, generate calls per trajectory (default 3)"),
            ("--prompt-len", int, "prompt tokens (default 256)"),
            ("--max-tokens", int, "M, tokens per turn (default 16)"),
            ("--tool-tokens", int, "K, tokens of each tool answer (default 24)"),
            ("--tool-pause-ms", float, "P, each tool's run time (default 50)"),
            ("--steps", int, "rollout steps per server (default 2; medians)"),
            ("--kv-blocks", int, "the server's device KV blocks (default 4096)"),
            ("--seed", int, "seeds the prompts and tools (default 0)"),
            ("--replicas", int, "with --client verl: AgentOS replicas on Ray (default 2)")):
        rl.add_argument(flag, type=kind, default=None, help=text)
    rl.add_argument("--client", choices=["http", "verl"], default=None,
                    help="http: /inference/v1/generate on `agentos serve` (default); verl: "
                    "verl's LLMServerClient and load balancer over AgentOS replicas on Ray")
    rl.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    rl.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    rl.set_defaults(func=_cmd_bench_rl, plot=None)
    tenants = scenarios.add_parser(
        "tenants", help="one tenant's turn latency while another attacks the server",
        description="Starts `agentos serve` with two API keys; a well-behaved tenant runs "
        "agent turns alone and while the other tenant sends the worst requests it can from "
        "a separate process. Reports the p50/p99 turn latency under attack over alone "
        "(target at most 1.5x), whether outputs stayed identical, and what each attack got.")
    _model_options(tenants)
    for flag, kind, text in (
            ("--agents", int, "the well-behaved tenant's concurrent sessions (default 4)"),
            ("--turns", int, "turns per session (default 6)"),
            ("--max-tokens", int, "tokens generated per turn (default 16)"),
            ("--rounds", int, "alone / under attack rounds (default 2)"),
            ("--attackers", int, "concurrent attack loops (default 4)"),
            ("--idle-connections", int, "connections that never finish their headers "
             "(default 200)"),
            ("--kv-blocks", int, "the server's device KV blocks (default 512)"),
            ("--seed", int, "seeds the prompts (default 0)")):
        tenants.add_argument(flag, type=kind, default=None, help=text)
    tenants.add_argument("--requests-per-s", type=float, default=None,
                         help="each tenant's request rate at the server (default 50)")
    tenants.add_argument("--body-bytes-per-s", type=float, default=None,
                         help="each tenant's body bytes a second at the server (default 1 MiB)")
    tenants.add_argument("--no-rates", action="store_true",
                         help="no per-tenant rates at the server")
    tenants.add_argument("--only", default=None, metavar="TEXT",
                         help="run only the attacks whose names contain TEXT")
    tenants.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    tenants.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    tenants.set_defaults(func=_cmd_bench_tenants, plot=None)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    _config_flags(p, names=("model", "device", "dtype"))


# NOTE: the only other spelling of an engine option: the store was --redis before Redis
# became one store of several, and scripts and docs still say so
_ALIASES = {"store": ("--redis",)}
# `agentos run` closes what it creates, so it has nothing to journal; its own --seed seeds
# the first generate call
_RUN_SKIP = ("store", "deployment", "worker_id", "seed")


def _config_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                  names: Sequence[str] | None = None, skip: Sequence[str] = ()) -> None:
    """Adds one flag per Config field (those in `names`, default all, less `skip`), read
    from the field: --field-name with its type, default, help text and choices. A boolean
    on by default becomes --no-field-name, one off by default --field-name."""
    from dataclasses import fields
    from typing import get_type_hints

    from agentos.kernel.config import Config

    hints = get_type_hints(Config)
    for f in fields(Config):
        if (names is not None and f.name not in names) or f.name in skip:
            continue
        flag, text = f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        if hints[f.name] is bool and f.default:
            p.add_argument(f"--no-{flag}", dest=f.name, action="store_false",
                           help=f"turn off (on by default): {text}")
        elif hints[f.name] is bool:
            p.add_argument(f"--{flag}", dest=f.name, action="store_true", help=text)
        else:
            if f.default is not None:
                text += " (default: %(default)s)"
            p.add_argument(f"--{flag}", *_ALIASES.get(f.name, ()), dest=f.name,
                           type=_scalar(hints[f.name]), default=f.default,
                           choices=f.metadata.get("choices"), help=text)


def _scalar(hint: Any) -> type:
    """The type a flag's text converts to: int or float as the field says (None aside);
    any other field (str, Any) takes the text as it is."""
    from typing import get_args

    kinds = [k for k in get_args(hint) if k is not type(None)] or [hint]
    return kinds[0] if kinds[0] in (int, float) else str


def _config_options(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict:
    """The engine options the flags of `_config_flags` parsed into, by Config's names."""
    from dataclasses import fields

    from agentos.kernel.config import Config

    return {f.name: getattr(args, f.name) for f in fields(Config) if f.name not in skip}


def _bench_options(p: argparse.ArgumentParser, peer: bool = True) -> None:
    _model_options(p)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (medians)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seeds the random prompts")
    if peer:  # a benchmark whose peer is not transformers has nothing to skip
        p.add_argument("--no-peer", dest="peer", action="store_false", default=None,
                       help="skip the transformers peer")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write results here")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw the comparison there (needs matplotlib)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}") from None


def _options(args: argparse.Namespace, names: Sequence[str]) -> dict:
    # flags left unset keep the benchmark's own defaults
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


_COMMON = ("model", "device", "dtype", "repeats", "block_size", "seed", "peer", "threads")


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections at most: one past it closes the connection "
                        "waiting longest for a request (default: 4096, or half the open-file "
                        "limit when that is lower)")
    parser.add_argument("--header-timeout-s", type=float, default=10.0,
                        help="seconds a client has to send a request's headers (from its "
                        "first byte, or from connecting) before the connection is closed")
    parser.add_argument("--keep-alive-s", type=float, default=5.0,
                        help="seconds an idle connection is kept open after a response")
    parser.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                        help="the HTTP/1.1 parser: httptools (C, about a third of h11's CPU "
                        "per request) or h11 (pure Python); auto: httptools when installed")


def _uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn's options for the connection flags: the guarded HTTP protocol (header
    deadline, connection cap, which also caps requests in flight: one per connection) and
    the keep-alive."""
    import resource

    from agentos.api.connections import guarded_protocol

    cap = args.max_connections
    if cap is None:
        cap = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
    return {"http": guarded_protocol(args.http, args.header_timeout_s, cap),
            "timeout_keep_alive": args.keep_alive_s}


def _serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The ServerSettings of `agentos serve`'s flags: a Config of the engine flags, the
    rest by ServerSettings' names. Raises ValueError on an invalid engine option."""
    from dataclasses import fields

    from agentos.api.app import ServerSettings
    from agentos.kernel.config import Config

    config = Config(**_config_options(args))
    server = {f.name: getattr(args, f.name) for f in fields(ServerSettings)
              if f.name != "config" and hasattr(args, f.name)}
    settings = ServerSettings(config=config, **server)
    settings.max_tokens_cap = settings.max_tokens_cap or None
    return settings


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from agentos.api.app import create_app
    from agentos.api.observe import configure_logging
    from agentos.engine import AsyncEngine

    settings = _serve_settings(args)  # bad engine options end here, before any startup
    if settings.worker and not settings.redis_url:
        print("agentos serve: --worker needs a redis:// --store (--redis)", file=sys.stderr)
        return 2
    if settings.heartbeat_s <= 0:
        print("agentos serve: --heartbeat-s must be > 0", file=sys.stderr)
        return 2
    if settings.config.store is not None:  # one clear line, not a startup traceback
        from agentos.kernel.errors import StoreUnavailableError
        from agentos.snapshot.durable.store import open_store

        try:
            store = open_store(settings.config.store, settings.config.deployment)
            try:
                store.ping()
            finally:
                store.close()
        except (StoreUnavailableError, ValueError) as e:
            print(f"agentos serve: {e}", file=sys.stderr)
            return 1
    try:
        tenants = settings.tenants()
    except ValueError as e:  # the keys: malformed, or a key claiming the tenant "default"
        print(f"agentos serve: {e}", file=sys.stderr)
        return 2
    try:  # the port first: a taken one is found before the model is loaded
        sock = _listen(args.host, args.port)
    except OSError as e:
        print(f"agentos serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    try:
        engine = AsyncEngine(**settings.engine_options())
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        sock.close()
        print(f"agentos serve: cannot load the model {settings.config.model!r}: {e}",
              file=sys.stderr)
        return 2
    try:
        app = create_app(settings, engine=engine, tenants=tenants)
        configure_logging(args.log_format, args.log_level)
        print(_summary(engine, settings), file=sys.stderr, flush=True)
        # NOTE: uvicorn's access log off: the app logs each request once, with its request id
        config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                timeout_graceful_shutdown=5, **_uvicorn_options(args))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        asyncio.run(engine.close())
        sock.close()
    return 0


def _listen(host: str, port: int):
    """A socket bound to host:port (listening is left to uvicorn); OSError if taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _summary(engine, settings) -> str:
    """One line: what is served, where, and how much KV it holds."""
    k = engine.kernel
    kv = k.memory.kv_stats()
    tokens = kv["device_blocks_total"] * k.block_size
    host = kv["host_blocks_total"] * k.block_size
    full = tokens // k.max_model_len
    fits = (f"{full:,} full-length sessions of {k.max_model_len:,}" if full
            else f"under one full-length session of {k.max_model_len:,}")
    return (f"agentos serve: {k.config.model} on {k.runner.device} "
            f"({str(k.dtype).removeprefix('torch.')}), KV {tokens:,} tokens ({fits})"
            + (f", host tier {host:,} tokens" if host else "")
            + f"; {settings.url} (dashboard {settings.url}/dashboard, docs {settings.url}/docs)")


def _cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from agentos.api.gateway import create_gateway

    app = create_gateway(args.redis, args.deployment, args.worker_timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5, **_uvicorn_options(args))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from agentos import top

    return top.run(args.url, args.api_key, args.interval, args.sort, args.limit, args.once)


def _cmd_bench_fork(args: argparse.Namespace) -> int:
    from agentos.bench import fork

    bench = fork.ForkBench(**_options(args, (*_COMMON, "lengths", "fanout_len", "fanout",
                                             "peer_repeats", "warmup")))
    return _report(fork.run(bench), fork.render, args)


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from agentos.bench import decode

    bench = decode.DecodeBench(**_options(args, (*_COMMON, "sessions", "prompt_len",
                                                 "new_tokens", "single", "max_batch_tokens")))
    return _report(decode.run(bench), decode.render, args)


def _cmd_bench_swap(args: argparse.Namespace) -> int:
    from agentos.bench import swap

    bench = swap.SwapBench(**_options(args, (
        "model", "device", "dtype", "repeats", "block_size", "seed", "threads", "blocks",
        "warmup", "sessions", "prompt_len", "turns", "new_tokens", "min_tool_tokens",
        "max_tool_tokens", "oversubscribe")))
    return _report(swap.run(bench), swap.render, args)


def _cmd_bench_tree(args: argparse.Namespace) -> int:
    from agentos.bench import tree

    bench = tree.TreeBench(**_options(args, (
        *_COMMON, "prompt_len", "width", "depth", "expand", "step_tokens", "mcts_iterations",
        "mcts_expand", "mcts_depth", "temperature", "max_batch_tokens")))
    return _report(tree.run(bench), tree.render, args)


def _cmd_bench_agents(args: argparse.Namespace) -> int:
    from agentos.bench import agents

    if args.simulate:
        from agentos.bench import simulate

        if args.plot:
            print("agentos bench agents: --plot draws the model runs; --simulate has no plot",
                  file=sys.stderr)
            return 2

        sim = {"sessions": args.sim_sessions, "kv_blocks": args.sim_kv_blocks,
               "window_s": args.sim_window_s, "seed": args.seed}
        bench = simulate.SimBench(**{k: v for k, v in sim.items() if v is not None})
        return _report(simulate.run(bench), simulate.render, args)

    bench = agents.AgentsBench(**_options(args, (
        "model", "device", "dtype", "sessions", "turns", "arrival_rate", "arrivals",
        "burst_size", "burst_spread_ms", "prompt_median", "tool_median", "gen_median",
        "gen_sigma", "long_fraction", "long_median", "gen_max", "pause_ms", "bound",
        "memory_fraction", "max_batch_size", "seats", "max_batch_tokens", "block_size", "seed",
        "seeds", "threads")))
    return _report(agents.run(bench), agents.render, args)


def _cmd_bench_overhead(args: argparse.Namespace) -> int:
    from agentos.bench import overhead

    bench = overhead.OverheadBench(**_options(args, (
        *_COMMON, "sessions", "prompt_len", "new_tokens", "idle", "syscall_len", "op_repeats",
        "turn_context", "turn_tokens", "sync", "cuda_graphs", "llama_cpp")))
    return _report(overhead.run(bench), overhead.render, args)


def _cmd_bench_structured(args: argparse.Namespace) -> int:
    from agentos.bench import structured

    bench = structured.StructuredBench(**_options(args, (
        "model", "device", "dtype", "repeats", "seed", "threads", "sessions", "prompt_len",
        "new_tokens", "block_size")))
    return _report(structured.run(bench), structured.render, args)


def _cmd_bench_determinism(args: argparse.Namespace) -> int:
    from agentos.bench import determinism

    bench = determinism.DeterminismBench(**_options(args, (
        "model", "device", "dtype", "repeats", "seed", "threads", "sessions", "min_prompt",
        "max_prompt", "new_tokens", "max_batch_tokens", "block_size")))
    return _report(determinism.run(bench), determinism.render, args)


def _cmd_bench_journal(args: argparse.Namespace) -> int:
    from agentos.bench import journal

    bench = journal.JournalBench(**_options(args, (
        "model", "device", "dtype", "repeats", "block_size", "seed", "threads", "redis",
        "sessions", "prompt_len", "new_tokens", "temperature", "lengths", "op_repeats", "warmup",
        "diverge_tokens", "max_batch_tokens")))
    return _report(journal.run(bench), journal.render, args)


def _cmd_bench_rl(args: argparse.Namespace) -> int:
    from agentos.bench import rl

    bench = rl.RLBench(**_options(args, (
        "model", "device", "dtype", "groups", "samples", "turns", "prompt_len", "max_tokens",
        "tool_tokens", "tool_pause_ms", "steps", "kv_blocks", "seed", "client", "replicas")))
    return _report(rl.run(bench), rl.render, args)


def _cmd_bench_tenants(args: argparse.Namespace) -> int:
    from agentos.bench import tenants

    options = _options(args, (
        "model", "device", "dtype", "agents", "turns", "max_tokens", "rounds", "attackers",
        "idle_connections", "kv_blocks", "seed", "only", "requests_per_s", "body_bytes_per_s"))
    if args.no_rates:
        options.update(requests_per_s=None, body_bytes_per_s=None)
    bench = tenants.TenantsBench(**options)
    return _report(tenants.run(bench), tenants.render, args)


def _cmd_bench_api(args: argparse.Namespace) -> int:
    from agentos.bench import api

    bench = api.ApiBench(**_options(args, ("model", "device", "dtype", "repeats", "warmup",
                                           "num_tokens", "port", "block_size", "seed")))
    return _report(api.run(bench), api.render, args)


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from agentos.bench import gpu

    bench = gpu.GpuBench(**_options(args, (
        "device", "dtype", "repeats", "block_size", "seed", "peer", "threads", "shapes", "batches",
        "prompt_len", "new_tokens", "fork_len", "op_repeats", "swap_blocks", "copy_bytes",
        "cuda_graphs", "checkpoints")))
    return _report(gpu.run(bench), gpu.render, args)


def _report(result: dict, render, args: argparse.Namespace) -> int:
    from agentos.bench.common import write_json

    render(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from agentos.bench.plot import plot

        plot(result, args.plot)
    return 1 if args.strict and not result["passed"] else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from agentos import Engine
    from agentos.bench.common import new_console, print_table

    if args.n < 1 or args.max_tokens < 1:
        raise ValueError("--n and --max-tokens must be >= 1")
    ignore_eos = args.model == "tiny" if args.ignore_eos is None else args.ignore_eos
    us: list[tuple[str, float]] = []  # (syscall, microseconds from the caller)

    def call(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        us.append((name, (time.perf_counter() - t0) * 1e6))
        return result

    def generate(session, seed=None):
        return session.generate(max_tokens=args.max_tokens, temperature=args.temperature,
                                seed=seed, ignore_eos=ignore_eos)

    engine = call("engine start (load model)",
                  lambda: Engine(**_config_options(args, skip=_RUN_SKIP)))
    with engine:
        s = call("create_session", lambda: engine.create_session(prompt=args.prompt))
        prompt_ids = s.tokens
        g = call(f"generate ({args.max_tokens} tokens)", lambda: generate(s, args.seed))
        snap = call("snapshot", s.snapshot)
        snap_ids = s.tokens
        kids = call(f"fork (n={args.n})", lambda: s.fork(n=args.n))
        # the children and the parent generate concurrently: batched in the same steps
        with ThreadPoolExecutor(args.n + 1) as pool:
            gens = call(f"generate x{args.n + 1} (children + parent, concurrent)",
                        lambda: list(pool.map(generate, [*kids, s])))
        diverged_ids = s.tokens
        stats, sessions = engine.stats(), engine.list_sessions()
        call("rollback", lambda: s.rollback(snap))
        restored_ids = s.tokens
        for kid in kids:
            kid.close()
        call("snapshot delete", snap.delete)
        call("close", s.close)

    console = new_console()
    console.print(_session_tree(s, prompt_ids, g, snap, kids, gens, diverged_ids,
                                restored_ids == snap_ids))
    print_table("syscalls, wall clock from the caller", ["call", "us"], us, console)
    rows = [[k, v] for k, v in stats["kv"].items()]
    rows += [["sessions", stats["sessions"]["total"]],
             # more entries than blocks in use: pages shared copy-on-write
             ["page-table entries (sum over sessions)",
              sum(i["device_blocks"] for i in sessions)]]
    rows += [[k, v] for k, v in stats.items() if isinstance(v, (int, float))]
    print_table("engine stats (after the children generated, before rollback)",
                ["stat", "value"], rows, console)
    if args.model == "tiny":
        console.print("note: the tiny model has random weights (built from a fixed seed), so "
                      "its text is noise; what it shows is the syscalls and their timings. "
                      "A real model: agentos run --model /path/to/a/hf/checkpoint/folder "
                      "(or a Hugging Face Hub id, org/name)")
    return 0 if restored_ids == snap_ids else 1


def _session_tree(s, prompt_ids, g, snap, kids, gens, diverged_ids, restored_ok: bool):
    from rich.markup import escape
    from rich.tree import Tree

    def show(g) -> str:  # generated ids (first few) and text, control bytes escaped
        ids = ", ".join(map(str, g.tokens[:6])) + (", ..." if len(g.tokens) > 6 else "")
        return f"+{len(g.tokens)} ({g.finish_reason}) [{ids}] {escape(repr(g.text[:48]))}"

    tree = Tree(f"[bold]{s.id}[/bold] prompt of {len(prompt_ids)} tokens, {show(g)}")
    tree.add(f"[cyan]{snap.id}[/cyan] snapshot at {snap.num_tokens} tokens")
    for kid, kg in zip(kids, gens):
        tree.add(f"[green]{kid.id}[/green] fork, {show(kg)}")
    verdict = "equal to the snapshot" if restored_ok else "[red]NOT equal to the snapshot[/red]"
    tree.add(f"[yellow]rollback[/yellow] {len(diverged_ids)} -> {snap.num_tokens} tokens, "
             f"{verdict}; undid the parent's {show(gens[-1])}")
    return tree


if __name__ == "__main__":
    sys.exit(main())
