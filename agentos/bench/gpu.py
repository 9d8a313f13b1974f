"""`agentos bench gpu`: the accelerator's numbers, on random-weight models in the shapes of
real ones (Qwen2.5-0.5B, Llama-3.2-1B), in one run:

- decode tokens/s at several batch sizes, ours against transformers' `generate` on the
  same weights (end to end, prefill included, `bench decode`), and ours alone in steady
  state (decode steps only: time per step);
- the fraction of the memory-bandwidth roofline at batch 1: the bytes a decode step must
  read (every weight once, plus the session's KV) over the step's time, against the
  device's measured copy bandwidth (read + write of a large buffer);
- fork and rollback latency of a long session (32k tokens by default);
- swap-out / swap-in bandwidth against a plain pinned copy of the same bytes
  (`bench swap`'s measurement).

Checkpoints are written with transformers' `save_pretrained` from a seeded random init,
so nothing is downloaded. It runs anywhere (`--device cpu --shapes tiny-gqa` is the smoke
test); the targets are the GPU ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field

from agentos.bench.common import (
    check,
    dtype_name,
    median,
    new_console,
    print_checks,
    print_table,
    progress,
    random_prompt,
    ratio,
    set_threads,
    sync,
)

GB = 1e9

# transformers config fields of each shape (random weights; the real models' geometry)
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        kind="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3.2-1b": dict(
        kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    # a small grouped-query model: the CPU smoke test
    "tiny-gqa": dict(
        kind="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
        max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
ROOFLINE_SHAPE = "llama-3.2-1b"  # the roofline target is stated on this shape


@dataclass(slots=True)
class GpuBench:
    device: str = "cuda"
    dtype: str | None = "bfloat16"
    shapes: list[str] = field(default_factory=lambda: ["qwen2.5-0.5b", "llama-3.2-1b"])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    prompt_len: int = 128
    new_tokens: int = 128
    repeats: int = 3  # timed runs per measurement (medians)
    peer: bool = True  # also run transformers' generate
    fork_len: int = 32768  # tokens of the session forked and rolled back (clipped to context)
    op_repeats: int = 20  # timed forks and rollbacks
    swap_blocks: int = 512  # blocks per timed swap
    copy_bytes: int = 1 << 30  # bytes of the bandwidth probe's buffer
    block_size: int = 16
    seed: int = 0
    threads: int | None = None
    cuda_graphs: bool = True  # off: every decode step runs eagerly (what the graphs give)
    checkpoints: str | None = None  # keep the random checkpoints here and reuse them

    def __post_init__(self):
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
        if min(self.prompt_len, self.new_tokens, self.repeats, self.op_repeats, self.swap_blocks,
               *self.batches) < 1:
            raise ValueError("sizes, batches and repeats must be >= 1")


def make_checkpoint(shape: str, folder: str, dtype: str | None, seed: int = 0) -> str:
    """Writes a random-weight transformers checkpoint of `shape` into folder; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    kind = spec.pop("kind")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_cls(**spec, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    net = model_cls(config)
    if dtype:
        net = net.to(getattr(torch, dtype))
    net.save_pretrained(folder)
    return folder


def run(bench: GpuBench) -> dict:
    """Runs every part for every shape; returns the JSON-ready results (see `render`)."""
    threads = set_threads(bench.threads)
    copy_gb_s = _copy_bandwidth(bench.device, bench.copy_bytes, bench.repeats)
    shapes = []
    steps = len(bench.shapes) * (len(bench.batches) + 2)  # + fork/rollback and swap
    with progress(steps, "gpu bench parts") as advance:
        for shape in bench.shapes:
            shapes.append(_run_shape(bench, shape, copy_gb_s, advance))
    return _summarize(bench, threads, copy_gb_s, shapes)


def _run_shape(bench: GpuBench, shape: str, copy_gb_s: float, advance) -> dict:
    """Every part on one shape's random checkpoint; returns its row. Calls advance() after
    each batch size, the fork/rollback part and the swap part."""
    from agentos.bench import decode, swap

    with contextlib.ExitStack() as stack:
        if bench.checkpoints:
            os.makedirs(bench.checkpoints, exist_ok=True)
            folder = os.path.join(bench.checkpoints, f"{shape}-{bench.dtype}-seed{bench.seed}")
            if not os.path.isdir(folder):  # written aside, then renamed: never half a one
                partial = stack.enter_context(tempfile.TemporaryDirectory(dir=bench.checkpoints))
                os.rename(make_checkpoint(shape, os.path.join(partial, "ckpt"), bench.dtype,
                                          bench.seed), folder)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"agentos-{shape}-"))
            make_checkpoint(shape, folder, bench.dtype, bench.seed)
        row: dict = {"shape": shape, "batches": []}
        for b in bench.batches:
            d = decode.run(decode.DecodeBench(
                model=folder, device=bench.device, dtype=bench.dtype, repeats=bench.repeats,
                sessions=b, prompt_len=bench.prompt_len, new_tokens=bench.new_tokens,
                single=False, peer=bench.peer, block_size=bench.block_size,
                max_batch_tokens=max(2048, b * bench.prompt_len), seed=bench.seed,
                cuda_graphs=bench.cuda_graphs))
            case = d["cases"][0]
            steady = _steady_decode(folder, bench, b)
            row["batches"].append({"batch": b, "ours_tok_s": case["ours_tok_s"],
                                   "hf_tok_s": case["hf_tok_s"], "ratio": case["ratio"],
                                   "agreement": case["agreement"], **steady})
            advance()
        one = next((r for r in row["batches"] if r["batch"] == 1), None)
        if one is not None:
            one["roofline"] = ratio(one["bytes_per_step"] / one["step_s"] / GB, copy_gb_s)
        row["ops"] = _fork_rollback(folder, bench)
        advance()
        sb = swap.SwapBench(model=folder, device=bench.device, dtype=bench.dtype,
                            blocks=bench.swap_blocks, repeats=bench.repeats,
                            block_size=bench.block_size, seed=bench.seed)
        from agentos import Engine

        with Engine(model=folder, device=bench.device, dtype=bench.dtype,
                    block_size=bench.block_size, kv_blocks=bench.swap_blocks + 16,
                    host_blocks=bench.swap_blocks + 16) as engine:
            row["swap"] = swap._bandwidth(engine, sb)
        advance()
    return row


def _copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """The device's copy bandwidth in GB/s: bytes read plus written by dst.copy_(src)."""
    import torch

    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).uniform_()
    seconds = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            seconds.append(time.perf_counter() - t0)
    return 2 * n * 4 / median(seconds) / GB


def _steady_decode(folder: str, bench: GpuBench, batch: int) -> dict:
    """Decode steps only: `batch` sessions prefilled and one token generated, then the
    time of new_tokens more greedy tokens in all of them. Returns time per step, tokens/s
    and the bytes a step must read (weights once, the sessions' KV at mid-generation)."""
    from agentos import AsyncEngine

    async def measure() -> dict:
        per = -(-(bench.prompt_len + bench.new_tokens + 2) // bench.block_size) + 1
        async with AsyncEngine(model=folder, device=bench.device, dtype=bench.dtype,
                               block_size=bench.block_size, kv_blocks=batch * per + 64,
                               max_batch_tokens=max(2048, batch * bench.prompt_len),
                               max_batch_size=max(256, batch),
                               cuda_graphs=bench.cuda_graphs) as engine:
            k = engine.kernel
            rng = random.Random(bench.seed)
            times = []
            for _ in range(bench.repeats):
                prompts = [random_prompt(bench.prompt_len, k.vocab_size, k.model_config.bos_token_id,
                                         rng) for _ in range(batch)]
                sessions = await asyncio.gather(*(engine.create_session(tokens=p) for p in prompts))
                await asyncio.gather(*(s.generate(max_tokens=1, temperature=0.0) for s in sessions))
                steps0 = k.stats["steps"]
                t0 = time.perf_counter()
                await asyncio.gather(*(s.generate(max_tokens=bench.new_tokens, temperature=0.0,
                                                  ignore_eos=True) for s in sessions))
                seconds = time.perf_counter() - t0
                times.append(seconds / max(1, k.stats["steps"] - steps0))
                await asyncio.gather(*(s.close() for s in sessions))
            weight_bytes = sum(t.numel() * t.element_size() for t in k.model.state_dict().values())
            ctx = bench.prompt_len + 1 + bench.new_tokens / 2
            kv_bytes = batch * ctx * k.block_bytes / bench.block_size
            return {"step_s": median(times), "steady_tok_s": batch / median(times),
                    "weight_bytes": weight_bytes, "bytes_per_step": weight_bytes + kv_bytes}

    return asyncio.run(measure())


def _fork_rollback(folder: str, bench: GpuBench) -> dict:
    """Wall time of fork(1) and rollback of one long session, from the caller (median)."""
    from agentos import Engine

    with Engine(model=folder, device=bench.device, dtype=bench.dtype, block_size=bench.block_size,
                kv_blocks=2 * (bench.fork_len // bench.block_size) + 256) as engine:
        k = engine.kernel
        length = min(bench.fork_len, k.max_model_len - 8)
        prompt = random_prompt(length, k.vocab_size, k.model_config.bos_token_id,
                               random.Random(bench.seed))
        s = engine.create_session(tokens=prompt)
        snap = s.snapshot()  # waits for the prefill
        s.generate(max_tokens=2, temperature=0.0, ignore_eos=True)
        forks, rollbacks = [], []
        for _ in range(bench.op_repeats + 2):
            t0 = time.perf_counter()
            child = s.fork(1)[0]
            forks.append(time.perf_counter() - t0)
            child.close()
            t0 = time.perf_counter()
            s.rollback(snap)
            rollbacks.append(time.perf_counter() - t0)
            s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)  # diverge again
        engine.check()
        return {"tokens": length, "fork_s": median(forks[2:]), "rollback_s": median(rollbacks[2:])}


def _summarize(bench: GpuBench, threads: int, copy_gb_s: float, shapes: list[dict]) -> dict:
    from agentos.kernel.runner import attention

    checks = []
    for row in shapes:
        name = row["shape"]
        for b in row["batches"]:
            if b["batch"] == 1 and name == ROOFLINE_SHAPE:
                checks.append(check(f"{name}: batch-1 decode >= 60% of the bandwidth roofline",
                                    b["roofline"] >= 0.6, f"{100 * b['roofline']:.0f}% "
                                    f"({b['step_s'] * 1e3:.2f} ms per step, copy {copy_gb_s:.0f} GB/s)"))
            if b["batch"] == 32 and bench.peer:
                checks.append(check(f"{name}: batch 32 >= 5x HF generate tokens/s", b["ratio"] >= 5,
                                    f"{b['ours_tok_s']:.0f} vs {b['hf_tok_s']:.0f} tok/s "
                                    f"({b['ratio']:.2f}x)"))
        ops = row["ops"]
        checks.append(check(f"{name}: fork and rollback of {ops['tokens']} tokens under 1 ms",
                            max(ops["fork_s"], ops["rollback_s"]) < 1e-3,
                            f"fork {ops['fork_s'] * 1e6:.0f} us, rollback {ops['rollback_s'] * 1e6:.0f} us"))
        worst = min(r["ratio"] for r in row["swap"] if r["layout"] == "contiguous")
        checks.append(check(f"{name}: swap >= 70% of a plain pinned copy", worst >= 0.7,
                            ", ".join(f"{r['direction']} {r['layout']} {r['ratio']:.2f}x"
                                      for r in row["swap"])))
    return {"bench": "gpu", "device_name": _device_name(bench.device),
            "config": {**asdict(bench), "threads": threads, "attention": attention.BACKEND,
                       "dtype": dtype_name(bench.dtype) if bench.dtype else None},
            "copy_gb_s": copy_gb_s, "shapes": shapes, "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def render(result: dict, console=None) -> None:
    console = console or new_console()
    cfg = result["config"]
    for row in result["shapes"]:
        rows = [[b["batch"], b["ours_tok_s"], b["hf_tok_s"], b["ratio"], b["steady_tok_s"],
                 b["step_s"] * 1e3, "-" if b.get("roofline") is None else f"{100 * b['roofline']:.0f}%"]
                for b in row["batches"]]
        print_table(f"{row['shape']} on {result['device_name']} ({cfg['device']}, {cfg['dtype']}): "
                    f"{cfg['prompt_len']}-token prompts, {cfg['new_tokens']} new tokens, median of "
                    f"{cfg['repeats']}; attention {cfg.get('attention', 'auto')}, CUDA graphs "
                    f"{'on' if cfg.get('cuda_graphs', True) else 'off'}; copy bandwidth "
                    f"{result['copy_gb_s']:.0f} GB/s",
                    ["batch", "ours tok/s", "HF tok/s", "ours / HF", "decode-only tok/s",
                     "ms / step", "roofline"], rows, console)
        ops = row["ops"]
        swap_rows = [[r["direction"], r["layout"], r["swap_gb_s"], r["plain_gb_s"], r["ratio"]]
                     for r in row["swap"]]
        print_table(f"{row['shape']}: fork {ops['fork_s'] * 1e6:.0f} us, rollback "
                    f"{ops['rollback_s'] * 1e6:.0f} us at {ops['tokens']} tokens; swap vs plain copy",
                    ["direction", "layout", "swap GB/s", "plain GB/s", "swap / plain"], swap_rows,
                    console)
    print_checks(result["checks"], console)
