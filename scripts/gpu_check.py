"""Everything the GPU must show, in one run: `bash scripts/gpu_check.sh [--out DIR]`.

Each part runs in its own subprocess under its own time limit, so a hang or a crash in one
part costs that part only; every part's output goes to DIR/<part>.log, the results to
DIR/gpu_check.json and a readable summary to DIR/gpu_check.txt (also printed).

Parts:
- env: device name, torch / triton / CUDA / transformers versions.
- triton_kernels: tests/test_triton_attention.py's checks on CUDA tensors, compiled (no
  interpreter), bf16 included.
- greedy: 64 greedy tokens of four prompts, batched, on the tiny model (fp32), with the
  torch and the Triton attention, eager and under CUDA graphs: every token list must be
  identical, and the graph runs must replay captured graphs (replays > captures > 0).
- families: random small HF checkpoints of each kind of attention and layer the families
  have (Llama, Qwen3, Mistral's sliding window, Qwen2's sliding layers, Mixtral's experts,
  Gemma 2's soft-capped scores and logits) written with transformers: batched, chunked
  greedy through the engine with each attention path, eager and under CUDA graphs, must
  equal transformers' `generate` on the same weights.
- bench_gpu: `agentos bench gpu` (Qwen2.5-0.5B and Llama-3.2-1B shapes: decode at batch
  1/8/32/128 against HF generate, batch-1 roofline, 32k fork/rollback, swap).
- bench_gpu_torch_attention, bench_gpu_no_graphs: the Llama-3.2-1B decode again with the
  torch attention and without CUDA graphs, to show what each part gives.
- determinism, agents, tree: `agentos bench determinism|agents|tree --device cuda`.

`--dry-run` runs every part on the CPU with small shapes (Triton under its interpreter),
which is how CI knows the script works before device time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[1, 17, 99, 5, 230, 41], [1, 8, 8, 8], [1] + list(range(30, 90)), [1, 250, 3]]


def part_list(device: str, dry: bool) -> list[dict]:
    """The parts in run order: name, argv (after the interpreter), extra env, time limit (s),
    and the JSON file the part writes (None: its last stdout line is JSON)."""
    bench = ["-m", "agentos.cli", "bench"]
    if dry:
        gpu_args = ["--device", "cpu", "--dtype", "float32", "--shapes", "tiny-gqa", "--batches",
                    "1,3", "--prompt-len", "16", "--new-tokens", "6", "--fork-len", "300",
                    "--op-repeats", "3", "--swap-blocks", "16", "--copy-bytes", "4000000",
                    "--repeats", "1"]
        variant_args = gpu_args + ["--no-peer"]
        det = ["--sessions", "3", "--new-tokens", "6", "--max-prompt", "40", "--repeats", "1"]
        agents = ["--sessions", "6", "--turns", "2", "--arrival-rate", "50", "--prompt-median",
                  "16", "--tool-median", "4", "--gen-median", "3", "--long-fraction", "0.3",
                  "--long-median", "40", "--gen-max", "64", "--pause-ms", "5", "--seeds", "0"]
        tree = ["--prompt-len", "64", "--width", "2", "--depth", "2", "--mcts-iterations", "3",
                "--mcts-depth", "2", "--repeats", "1"]
        kernels = ["--only", "decode_fp32,tiny_model_end_to_end"]
        new_tokens = 8
    else:
        gpu_args = ["--device", device]
        variant_args = ["--device", device, "--shapes", "llama-3.2-1b", "--batches", "1,32",
                        "--no-peer", "--fork-len", "4096", "--op-repeats", "5"]
        det, agents, tree, kernels = [], [], [], []
        new_tokens = 64
    kernel_env = {"TRITON_INTERPRET": "1"} if dry else {}
    # the bench gpu parts share their random checkpoints (a 1B one takes a while to write)
    gpu_args += ["--checkpoints", "checkpoints"]
    variant_args += ["--checkpoints", "checkpoints"]
    parts = [
        dict(name="env", argv=[__file__, "--env", device], limit=60),
        dict(name="triton_kernels", argv=[str(ROOT / "tests" / "test_triton_attention.py"),
                                          "--device", device, *kernels],
             env=kernel_env, limit=600 if dry else 300),
    ]
    parts.append(dict(name="greedy", argv=[__file__, "--greedy", device, str(new_tokens)],
                      env=kernel_env, limit=240))
    parts.append(dict(name="families", argv=[__file__, "--families", device, str(new_tokens)],
                      env=kernel_env, limit=300))
    parts += [
        dict(name="bench_gpu", argv=[*bench, "gpu", *gpu_args], limit=360, json=True),
        dict(name="bench_gpu_torch_attention", argv=[*bench, "gpu", *variant_args],
             env={"AGENTOS_ATTENTION": "torch"}, limit=150, json=True),
        dict(name="bench_gpu_no_graphs", argv=[*bench, "gpu", *variant_args, "--no-cuda-graphs"],
             limit=150, json=True),
        dict(name="determinism", argv=[*bench, "determinism", "--device", device, *det],
             limit=180, json=True),
        dict(name="agents", argv=[*bench, "agents", "--device", device, *agents], limit=180,
             json=True),
        dict(name="tree", argv=[*bench, "tree", "--device", device, *tree], limit=180, json=True),
    ]
    return parts


def run_part(part: dict, out: Path, python: str) -> dict:
    log = out / f"{part['name']}.log"
    argv = [python, *part["argv"]]
    json_path = out / f"{part['name']}.json"
    if part.get("json"):
        argv += ["--json", str(json_path)]
    env = dict(os.environ, **part.get("env", {}))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=part["limit"], cwd=out).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            rc, status = None, f"timed out after {part['limit']} s"
    record = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(argv), "env": part.get("env", {})}
    text = log.read_text(errors="replace")
    try:
        if part.get("json"):
            record["result"] = json.loads(json_path.read_text())
        else:
            record["result"] = json.loads(text.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        record["tail"] = text[-3000:]
        if status == "ok":
            record["status"] = "no result"
    return record


def summarize(parts: dict) -> list[dict]:
    """The acceptance checks over every part's result."""
    checks = []

    def add(name: str, passed: bool, detail: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail})

    for name, rec in parts.items():
        if rec["status"] != "ok":
            add(f"{name} ran", False, rec["status"])
    kernels = parts.get("triton_kernels", {}).get("result")
    if kernels:
        bad = {k: v for k, v in kernels.items() if v != "ok" and not v.startswith("skip: ")}
        skipped = [k for k, v in kernels.items() if v.startswith("skip: ")]
        add("Triton kernels equal the torch reference", not bad,
            f"{len(kernels) - len(bad) - len(skipped)} ok, {len(skipped)} skipped"
            + (f"; failed: {', '.join(bad)}" if bad else ""))
    greedy = parts.get("greedy", {}).get("result")
    if greedy:
        runs = greedy["runs"]
        ref = next(iter(runs.values()))["tokens"]
        differ = [n for n, r in runs.items() if r["tokens"] != ref]
        add(f"{len(ref[0])} greedy tokens identical end to end ({', '.join(runs)})", not differ,
            "differ: " + ", ".join(differ) if differ else f"{len(ref)} prompts, batched")
        for n, r in runs.items():
            if n.endswith("_graphs") and greedy["device"] != "cpu":
                s = r["capture_stats"]
                add(f"{n}: CUDA graphs replay", s["graph_replays"] > s["graphs_captured"] > 0,
                    f"{s['graphs_captured']} captured, {s['graph_replays']} replays")
    families = parts.get("families", {}).get("result")
    if families:
        for kind, runs in families["models"].items():
            differ = [n for n, r in runs.items() if n != "transformers" and r != runs["transformers"]]
            errors = [f"{n} {r}" for n, r in runs.items() if isinstance(r, str)]
            add(f"{kind}: greedy equals transformers ({', '.join(runs)})", not differ,
                "; ".join(errors)[:600] if errors else "differ: " + ", ".join(differ) if differ else
                f"{len(runs['transformers'])} prompts x {len(runs['transformers'][0])} tokens")
            # NOTE: transformers runs on the CPU; on a device whose fp32 sums differ, a
            # near-tie can split it from every path of ours while ours agree: the kernels'
            # own check is Triton against the torch path on the same device
            ours = {n: r for n, r in runs.items() if n != "transformers"}
            if any(n.startswith("triton") for n in ours):
                same = {n for n, r in ours.items() if r == ours.get("torch_eager")}
                add(f"{kind}: Triton attention equals the torch path", same == set(ours),
                    "differ: " + ", ".join(sorted(set(ours) - same)) if same != set(ours) else
                    ", ".join(sorted(ours)))
    for name in ("bench_gpu", "determinism", "agents", "tree"):
        result = parts.get(name, {}).get("result")
        for c in (result or {}).get("checks", []):
            add(f"{name}: {c['name']}", c["passed"], c["detail"])
    return checks


def render_summary(report: dict) -> str:
    lines = [f"gpu_check on {report['env'].get('device_name', '?')} "
             f"({'dry run' if report['dry_run'] else report['device']}), "
             f"{report['seconds']:.0f} s"]
    env = report["env"]
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device_name"))
    for name, rec in report["parts"].items():
        lines.append(f"  {name:28s} {rec['status']:24s} {rec['seconds']:7.1f} s")
    for row in (report["parts"].get("bench_gpu", {}).get("result") or {}).get("shapes", []):
        for b in row["batches"]:
            lines.append(f"  {row['shape']} batch {b['batch']}: ours {b['ours_tok_s']:.0f} tok/s, "
                         f"HF {b['hf_tok_s']:.0f}, decode-only {b['steady_tok_s']:.0f} tok/s, "
                         f"{b['step_s'] * 1e3:.2f} ms/step"
                         + (f", roofline {100 * b['roofline']:.0f}%" if b.get("roofline") else ""))
    for name in ("bench_gpu_torch_attention", "bench_gpu_no_graphs"):
        for row in (report["parts"].get(name, {}).get("result") or {}).get("shapes", []):
            lines.append(f"  {name} {row['shape']}: " + ", ".join(
                f"batch {b['batch']} {b['steady_tok_s']:.0f} tok/s ({b['step_s'] * 1e3:.2f} ms/step)"
                for b in row["batches"]))
    det = (report["parts"].get("determinism", {}).get("result") or {}).get("overhead")
    if det is not None:
        lines.append(f"  deterministic mode overhead: {json.dumps(det)}")
    for c in report["checks"]:
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- part bodies


def env_part(device: str) -> None:
    import importlib.metadata as md
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for pkg in ("triton", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(torch.device(device))
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory
                                         / 2**30, 1)
    else:
        out["device_name"] = platform.processor() or platform.machine()
    print(json.dumps(out))


def greedy_part(device: str, new_tokens: int) -> None:
    """The same batched greedy generations with each attention path, eager and under CUDA
    graphs; prints {config: {tokens, capture_stats}}. Under the interpreter (the CPU dry
    run) the Triton path is left out: it runs no whole model in reasonable time."""
    from agentos import Engine
    from agentos.kernel.runner import attention

    out = {}
    paths = ["torch"] + ([] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"])
    for path in paths:
        for graphs in (False, True):
            attention.BACKEND = path
            with Engine("tiny", device=device, dtype="float32", kv_blocks=256,
                        cuda_graphs=graphs) as engine:
                sessions = [engine.create_session(tokens=p) for p in PROMPTS]
                engine.pause()  # queue every generate first: the steps batch them, padding included
                with ThreadPoolExecutor(len(sessions)) as pool:
                    futures = [pool.submit(s.generate, max_tokens=new_tokens, temperature=0.0,
                                           ignore_eos=True) for s in sessions]
                    while engine.stats()["queue"]["runnable"] < len(sessions):
                        time.sleep(0.005)
                    engine.resume()
                    tokens = [f.result().tokens for f in futures]
                out[f"{path}_{'graphs' if graphs else 'eager'}"] = {
                    "tokens": tokens, "capture_stats": engine.kernel.runner.capture_stats}
    print(json.dumps({"device": device, "runs": out}))


# (name, kind, transformers config overrides): each family's distinct attention, windows
# shorter than the longer prompts and than the generations, soft-capped scores
FAMILIES = [
    ("llama", "llama", {}),
    ("qwen3", "qwen3", {}),
    ("mistral_sliding", "mistral", {"sliding_window": 9}),
    ("qwen2_sliding", "qwen2", {"use_sliding_window": True, "sliding_window": 7,
                                "max_window_layers": 1}),
    ("mixtral_sliding", "mixtral", {"sliding_window": 9}),
    ("gemma2_softcap", "gemma2", {"sliding_window": 6, "query_pre_attn_scalar": 24,
                                  "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0,
                                  "seed": 2}),
]


def _family_run(path, device: str, graphs: bool, prompts: list[list[int]], new_tokens: int):
    from agentos import Engine

    # a 16-token step budget: chunked prefill beside other sessions' decodes
    with Engine(str(path), device=device, dtype="float32", kv_blocks=512, block_size=4,
                max_batch_tokens=16, cuda_graphs=graphs) as engine:
        sessions = [engine.create_session(tokens=p) for p in prompts]
        with ThreadPoolExecutor(len(sessions)) as pool:
            return list(pool.map(lambda s: s.generate(max_tokens=new_tokens, temperature=0.0,
                                                      ignore_eos=True).tokens, sessions))


def families_part(device: str, new_tokens: int) -> None:
    """Batched, chunked greedy on each family's random checkpoint with each attention path
    (eager and under graphs on CUDA) and transformers' generate on the same weights;
    prints {"models": {kind: {config: tokens per prompt}}}."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from agentos.kernel.runner import attention
    from hf_models import hf_generate, make_hf_checkpoint

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 23, 40, 57)]
    paths = ["torch"] + ([] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"])
    graphs = [False] + ([True] if device.startswith("cuda") else [])
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, extra in FAMILIES:
            path = make_hf_checkpoint(Path(tmp) / name, kind, num_kv_heads=2, **extra)
            runs = {"transformers": [hf_generate(path, p, new_tokens) for p in prompts]}
            for attn in paths:
                for g in graphs:
                    attention.BACKEND = attn
                    run = f"{attn}_{'graphs' if g else 'eager'}"
                    try:  # a run that fails (a kernel that does not compile) fails alone
                        runs[run] = _family_run(path, device, g, prompts, new_tokens)
                    except Exception as e:  # noqa: BLE001 - reported as this run's result
                        runs[run] = f"error: {type(e).__name__}: {str(e)[:2000]}"
            models[name] = runs
    print(json.dumps({"device": device, "models": models}))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for the logs and results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true",
                        help="every part on the CPU with small shapes (what CI runs)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of the parts")
    parser.add_argument("--env", metavar="DEVICE", help=argparse.SUPPRESS)
    parser.add_argument("--greedy", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs=2, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    parser = make_parser()
    args = parser.parse_args()
    if args.env:
        env_part(args.env)
        return 0
    if args.greedy:
        device, n = args.greedy
        greedy_part(device, int(n))
        return 0
    if args.families:
        device, n = args.families
        families_part(device, int(n))
        return 0
    device = "cpu" if args.dry_run else args.device
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = part_list(device, args.dry_run)
    if args.parts:
        wanted = set(args.parts.split(","))
        unknown = wanted - {p["name"] for p in parts}
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(p['name'] for p in parts)}")
        parts = [p for p in parts if p["name"] in wanted or p["name"] == "env"]
    t0 = time.perf_counter()
    results = {}
    for part in parts:
        print(f"-- {part['name']} (limit {part['limit']} s)", flush=True)
        results[part["name"]] = run_part(part, out, sys.executable)
        print(f"   {results[part['name']]['status']} in {results[part['name']]['seconds']} s",
              flush=True)
    report = {"device": device, "dry_run": args.dry_run,
              "env": results.get("env", {}).get("result") or {},
              "seconds": time.perf_counter() - t0, "parts": results}
    report["checks"] = summarize(results)
    report["passed"] = all(c["passed"] for c in report["checks"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = render_summary(report)
    (out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
