"""`agentos bench fork`: fork, snapshot and rollback cost against session length.

Measured from the caller, as a user sees them: wall clock around the public call on an
idle engine (the syscall's trip to the kernel thread and back included). The peer is
Hugging Face transformers on the same weights, which has no paged cache: forking a
session means `copy.deepcopy` of its `DynamicCache`, and getting back to a snapshot means
running the prefix again (a forward over it). `DynamicCache.crop` is shown for reference:
it undoes appended tokens in place, but only along one line of history (no tree, and
the state it drops is gone for good).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from agentos.bench.common import (
    check,
    dtype_name,
    load_peer,
    median,
    new_console,
    print_checks,
    print_table,
    random_prompt,
    ratio,
    set_threads,
    sync,
    timed,
)

US = 1e6


@dataclass(slots=True)
class ForkBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    repeats: int = 20  # timed repeats of each of our syscalls (and of the peer's deepcopy)
    peer_repeats: int = 2  # timed re-prefills of the peer (seconds each at 16k tokens)
    lengths: Sequence[int] = (512, 4096, 16384)  # session lengths for fork/snapshot/rollback
    fanout_len: int = 8192  # length of the session forked n ways
    fanout: int = 16  # n of that fork
    block_size: int = 16
    peer: bool = True  # also measure transformers
    warmup: int = 3  # untimed repeats before the timed ones
    seed: int = 0  # seeds the random prompts
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 2 or self.fanout_len < 2:
            raise ValueError("session lengths must be >= 2 tokens")
        if self.repeats < 1 or self.peer_repeats < 1 or self.fanout < 1 or self.warmup < 0:
            raise ValueError("repeats, peer_repeats and fanout must be >= 1, warmup >= 0")


def run(bench: ForkBench) -> dict:
    """Runs the benchmark; returns the JSON-ready results (see `render`).

    Lengths beyond the model's context are skipped (listed under "skipped").
    """
    from agentos import Engine

    threads = set_threads(bench.threads)
    lengths = sorted(set(bench.lengths))
    need = max([*lengths, bench.fanout_len]) + 64  # + generated tokens and tails
    kv_blocks = 2 * (-(-need // bench.block_size)) + 4 * bench.fanout + 64
    rng = random.Random(bench.seed)
    rows: list[dict] = []
    with Engine(model=bench.model, device=bench.device, dtype=bench.dtype,
                block_size=bench.block_size, kv_blocks=kv_blocks) as engine:
        kernel = engine.kernel
        limit = kernel.max_model_len - 8
        skipped = [n for n in [*lengths, bench.fanout_len] if n > limit]
        prompts = {n: random_prompt(n - 1, kernel.vocab_size, kernel.model_config.bos_token_id,
                                    rng) for n in lengths if n <= limit}
        for n, prompt in prompts.items():
            rows.append({"num_tokens": n, **_measure_ours(engine, prompt, bench)})
        fanout = None
        if bench.fanout_len <= limit:
            prompt = random_prompt(bench.fanout_len - 1, kernel.vocab_size,
                                   kernel.model_config.bos_token_id, rng)
            fanout = _measure_fanout(engine, prompt, bench)
        dtype = kernel.dtype
    if bench.peer and rows:
        # the peer's prefix has the same length (n) as our session; its last id is arbitrary
        _measure_peer(bench, dtype, rows, {n: p + [p[-1]] for n, p in prompts.items()})
    return _summarize(bench, dtype, threads, rows, fanout, skipped)


def _measure_ours(engine, prompt: list[int], bench: ForkBench) -> dict:
    s = engine.create_session(tokens=prompt)
    s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)  # prefill; now len + 1 tokens
    fork_s, snap_s, rollback_s = [], [], []
    for i in range(bench.warmup + bench.repeats):
        kids, t_fork = timed(lambda: s.fork(n=1))
        kids[0].close()
        snap, t_snap = timed(s.snapshot)
        s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)  # diverge from the snapshot
        s.info()  # a round trip: the kernel has finished the generate's last step
        _, t_rollback = timed(lambda snap=snap: s.rollback(snap))
        snap.delete()
        if i >= bench.warmup:
            fork_s.append(t_fork)
            snap_s.append(t_snap)
            rollback_s.append(t_rollback)
    s.close()
    return {"fork_us": median(fork_s) * US, "snapshot_us": median(snap_s) * US,
            "rollback_us": median(rollback_s) * US}


def _measure_fanout(engine, prompt: list[int], bench: ForkBench) -> dict:
    s = engine.create_session(tokens=prompt)
    s.generate(max_tokens=1, temperature=0.0, ignore_eos=True)
    fork_s = []
    for _ in range(bench.warmup + bench.repeats - 1):
        kids, t_fork = timed(lambda: s.fork(n=bench.fanout))
        fork_s.append(t_fork)
        for kid in kids:
            kid.close()
    used_before = engine.stats()["kv"]["device_blocks_used"]
    kids, t_fork = timed(lambda: s.fork(n=bench.fanout))
    fork_s.append(t_fork)
    used_forked = engine.stats()["kv"]["device_blocks_used"]
    # each child's first write copies the shared tail block (copy-on-write): at most one each
    with ThreadPoolExecutor(len(kids)) as pool:
        list(pool.map(lambda k: k.generate(max_tokens=1, temperature=0.0, ignore_eos=True),
                      kids))
    used_generated = engine.stats()["kv"]["device_blocks_used"]
    for kid in kids:
        kid.close()
    s.close()
    return {"num_tokens": len(prompt) + 1, "n": bench.fanout,
            "fork_us": median(fork_s[bench.warmup:]) * US, "blocks_before": used_before,
            "blocks_added": used_forked - used_before,
            "blocks_added_after_generate": used_generated - used_before}


def _measure_peer(bench: ForkBench, dtype, rows: list[dict], prompts: dict) -> None:
    import torch

    net = load_peer(bench.model, bench.device, dtype)
    dev = bench.device

    def prefill(ids: torch.Tensor):
        with torch.inference_mode():
            out = net(ids, use_cache=True, logits_to_keep=1)
        sync(dev)
        return out.past_key_values

    for row in rows:
        n = row["num_tokens"]
        ids = torch.tensor([prompts[n]], device=dev)
        prefill_s, cache = [], prefill(ids)  # warm-up: a new shape's first run is slower
        for _ in range(bench.peer_repeats):
            del cache  # one cache alive at a time
            cache, t = timed(lambda ids=ids: prefill(ids))
            prefill_s.append(t)
        copy_s, crop_s = [], []
        for i in range(bench.warmup + bench.repeats):
            clone, t_copy = timed(lambda cache=cache: _deepcopy(cache, dev))
            _, t_crop = timed(lambda clone=clone: _crop(clone, 4, dev))
            if i >= bench.warmup:
                copy_s.append(t_copy)
                crop_s.append(t_crop)
            del clone
        del cache
        row["peer_fork_us"] = median(copy_s) * US
        row["peer_rollback_us"] = median(prefill_s) * US
        row["peer_crop_us"] = median(crop_s) * US


def _deepcopy(cache, device: str):
    clone = copy.deepcopy(cache)
    sync(device)
    return clone


def _crop(cache, num_tokens: int, device: str) -> None:
    cache.crop(-num_tokens)  # negative: drop that many (transformers 4.x and 5.x alike)
    sync(device)


def _summarize(bench: ForkBench, dtype, threads: int, rows: list[dict], fanout: dict | None,
               skipped: list[int]) -> dict:
    for row in rows:
        row["fork_ratio"] = ratio(row.get("peer_fork_us", float("nan")), row["fork_us"])
        row["rollback_ratio"] = ratio(row.get("peer_rollback_us", float("nan")),
                                      row["rollback_us"])
    checks = []
    result = {"bench": "fork", "config": {**asdict(bench), "lengths": list(bench.lengths),
                                          "dtype": dtype_name(dtype), "threads": threads},
              "lengths": rows, "fanout": fanout, "skipped": skipped}
    if rows:
        short, long = rows[0], rows[-1]
        result["fork_long_short_ratio"] = ratio(long["fork_us"], short["fork_us"])
        result["rollback_long_short_ratio"] = ratio(long["rollback_us"], short["rollback_us"])
        for op in ("fork", "rollback"):
            us, short_us = long[f"{op}_us"], short[f"{op}_us"]
            checks.append(check(
                f"{op} of a {long['num_tokens']}-token session < 1 ms",
                us < 1000, f"median {us:.0f} us"))
            checks.append(check(
                f"{op} of {long['num_tokens']} tokens <= 2x {op} of {short['num_tokens']}",
                us <= 2 * short_us, f"{us:.0f} us vs {short_us:.0f} us "
                f"({ratio(us, short_us):.2f}x)"))
    if fanout is not None:
        checks.append(check(
            f"fork(n={fanout['n']}) of a {fanout['num_tokens']}-token session adds "
            f"<= {fanout['n']} blocks", fanout["blocks_added"] <= fanout["n"],
            f"{fanout['blocks_added']} blocks added ({fanout['blocks_added_after_generate']} "
            "once every child generated a token)"))
    result["checks"] = checks
    result["passed"] = all(c["passed"] for c in checks)
    return result


def render(result: dict, console=None) -> None:
    """Prints the results as rich tables plus one PASS/FAIL line per target."""
    console = console or new_console()
    cfg = result["config"]
    columns = ["tokens", "fork us", "snapshot us", "rollback us", "HF copy us",
               "HF prefill us", "HF crop us", "fork x", "rollback x"]
    rows = [[r["num_tokens"], r["fork_us"], r["snapshot_us"], r["rollback_us"],
             r.get("peer_fork_us"), r.get("peer_rollback_us"), r.get("peer_crop_us"),
             r["fork_ratio"], r["rollback_ratio"]] for r in result["lengths"]]
    print_table(f"fork / snapshot / rollback, median of {cfg['repeats']} "
                f"(HF re-prefill: {cfg['peer_repeats']}); model {cfg['model']}, "
                f"{cfg['device']}, {cfg['dtype']}, {cfg['threads']} threads; HF fork = deepcopy "
                "of the DynamicCache, HF rollback = re-prefill; x = HF time / ours",
                columns, rows, console)
    fan = result["fanout"]
    if fan is not None:
        print_table(f"fork(n={fan['n']}) of a {fan['num_tokens']}-token session",
                    ["blocks before", "blocks added by fork", "after each child's 1st token",
                     "fork us (median)"],
                    [[fan["blocks_before"], fan["blocks_added"],
                      fan["blocks_added_after_generate"], fan["fork_us"]]], console)
    if "fork_long_short_ratio" in result:
        console.print(f"longest/shortest: fork {result['fork_long_short_ratio']:.2f}x, "
                      f"rollback {result['rollback_long_short_ratio']:.2f}x")
    if result["skipped"]:
        console.print(f"skipped (beyond the model's context): {result['skipped']}")
    print_checks(result["checks"], console)
