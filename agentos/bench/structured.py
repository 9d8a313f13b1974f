"""`agentos bench structured`: what a JSON-schema constraint costs in decode throughput.

`sessions` concurrent sessions (seeded random prompts of `prompt_len` tokens) each
generate `new_tokens` tokens at temperature 1, once unconstrained and once under a JSON
schema, on one engine, the two alternating over `repeats` runs. The schema (a list of
records with strings, integers, enums, booleans and nested arrays) is long enough that no
session completes it within `new_tokens`, so both runs generate the same number of
tokens and tokens/s compare like for like. The cost is the ratio of the medians; the
constrained outputs are checked to be valid JSON prefixes, and completed documents
(from a second, short schema) to validate.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import asdict, dataclass, replace

from agentos.bench.common import check, median, new_console, print_checks, print_table, ratio, set_threads

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["tool", "user", "assistant"]},
        "ok": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    },
    "required": ["id", "name", "kind", "ok", "scores"],
    "additionalProperties": False,
}
# never complete within a benchmark's token budget: both runs generate new_tokens each
LONG = {"type": "object", "properties": {"records": {"type": "array", "items": RECORD,
                                                     "minItems": 10_000}},
        "required": ["records"], "additionalProperties": False}


@dataclass(slots=True)
class StructuredBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None
    sessions: int = 32
    prompt_len: int = 64
    new_tokens: int = 128
    repeats: int = 3  # runs per mode (medians)
    block_size: int = 16
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if min(self.sessions, self.prompt_len, self.new_tokens, self.repeats) < 1:
            raise ValueError("sessions, prompt_len, new_tokens and repeats must be >= 1")


async def _run(engine, prompts: list[list[int]], b: StructuredBench, schema):
    """Generates for every prompt concurrently (fresh sessions); returns (Generations, s)."""
    from agentos import SamplingParams

    sessions = [await engine.create_session(tokens=p) for p in prompts]
    t0 = time.perf_counter()
    gens = await asyncio.gather(*(
        s.generate(params=SamplingParams(max_tokens=b.new_tokens, temperature=1.0,
                                         seed=b.seed + i, ignore_eos=schema is None,
                                         json_schema=schema))
        for i, s in enumerate(sessions)))
    secs = time.perf_counter() - t0
    for s in sessions:
        await s.close()
    return gens, secs


async def _bench(b: StructuredBench) -> dict:
    from agentos import AsyncEngine

    rng = random.Random(b.seed)
    prompts = [[rng.randrange(3, 256) for _ in range(b.prompt_len)] for _ in range(b.sessions)]
    kv = 2 * b.sessions * (b.prompt_len + b.new_tokens) // b.block_size + 64
    times: dict[str, list[float]] = {"free": [], "json_schema": []}
    tokens: dict[str, list[int]] = {"free": [], "json_schema": []}
    async with AsyncEngine(b.model, device=b.device, dtype=b.dtype, kv_blocks=kv,
                           block_size=b.block_size, host_blocks=0) as e:
        await _run(e, prompts[:2], b, LONG)  # warm-up: the grammar executor's threads
        constrained = []
        for _ in range(b.repeats):
            for mode, schema in (("free", None), ("json_schema", LONG)):
                gens, secs = await _run(e, prompts, b, schema)
                times[mode].append(secs)
                tokens[mode].append(sum(len(g.tokens) for g in gens))
                if schema is not None:
                    constrained = gens
        done, _ = await _run(e, prompts[:8], replace(b, new_tokens=512), RECORD)
    import jsonschema

    valid_prefixes = sum(_json_prefix(g.text) for g in constrained)
    complete = [g for g in done if g.finish_reason == "stop"]
    valid_complete = 0
    for g in complete:
        try:
            jsonschema.validate(json.loads(g.text), RECORD)
            valid_complete += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    modes = {m: {"runs_s": times[m], "median_s": median(times[m]), "tokens": tokens[m][0],
                 "tok_s": tokens[m][0] / median(times[m])} for m in times}
    cost = ratio(modes["free"]["tok_s"], modes["json_schema"]["tok_s"])
    checks = [
        check("a JSON-schema constraint costs under 15% of tokens/s", cost < 1.15,
              f"{cost:.3f}x the unconstrained time per token (median of {b.repeats})"),
        check("both runs generate the same tokens", tokens["free"][0] == tokens["json_schema"][0],
              f"{tokens['free'][0]} vs {tokens['json_schema'][0]}"),
        check("every constrained output is a valid JSON prefix", valid_prefixes == len(constrained),
              f"{valid_prefixes} of {len(constrained)}"),
        check("completed documents validate against their schema",
              bool(complete) and valid_complete == len(complete),
              f"{valid_complete} of {len(complete)} completed ({len(done)} sessions)"),
    ]
    return {"modes": modes, "cost": cost, "checks": checks}


# what may follow a cut JSON text's last complete token before its closing brackets
_TAILS = ("", "0", '"":0', ":0", "rue", "ue", "e", "alse", "lse", "se", "ull", "ll", "l")


def _json_prefix(text: str) -> bool:
    """Whether text can be continued into valid JSON: some short tail, then closing its
    open string, arrays and objects, makes it parse."""
    stack, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and (not stack or stack.pop() != ch):
            return False
    body = text
    if in_str:
        hexes = re.search(r"\\u([0-9a-fA-F]{0,3})$", text)
        body += ("n" if esc else "0" * (4 - len(hexes.group(1))) if hexes else "") + '"'
    closers = "".join(reversed(stack))
    for tail in _TAILS:
        try:
            json.loads(body + tail + closers)
            return True
        except ValueError:
            continue
    return False


def run(b: StructuredBench) -> dict:
    threads = set_threads(b.threads)
    out = asyncio.run(_bench(b))
    return {"bench": "structured", "config": {**asdict(b), "threads": threads}, **out,
            "passed": all(c["passed"] for c in out["checks"])}


def render(result: dict) -> None:
    console = new_console()
    c = result["config"]
    rows = [[mode, m["median_s"], m["tokens"], m["tok_s"]] for mode, m in result["modes"].items()]
    print_table(f"{c['sessions']} sessions x {c['new_tokens']} tokens, temperature 1, "
                f"{c['prompt_len']}-token prompts, model {c['model']} on {c['device']}",
                ["mode", "median s", "tokens", "tok/s"], rows, console)
    console.print(f"the JSON-schema constraint costs {result['cost']:.3f}x the unconstrained "
                  "time per token (median of runs)")
    print_checks(result["checks"], console)
