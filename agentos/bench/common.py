"""What the benchmarks share: timing, medians, the transformers peer, rich tables, JSON.

Torch and transformers are imported inside the functions that need them, so importing
this module (and `agentos.cli`) stays light.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Runs fn once; returns (its result, wall seconds)."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    """The median of values; NaN for none (a measurement that was skipped)."""
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero or missing."""
    return numerator / denominator if denominator and denominator == denominator else float("nan")


def sync(device: str) -> None:
    """Waits for queued GPU work, so a wall-clock interval covers it. Nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads when given (a process-wide setting); returns the count
    in use. NOTE: on a host whose cores are busy with other work, fewer threads than cores
    give steadier timings: an op split over a descheduled thread waits for it."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def random_prompt(num_tokens: int, vocab_size: int, bos_token_id: int | None,
                  rng: random.Random) -> list[int]:
    """A prompt of num_tokens ids: BOS (when the model has one) then ids drawn from rng.

    Ids are drawn below min(vocab_size, 256) so the byte tokenizer of `tiny` reads them as
    bytes; any HF vocabulary has at least that many ordinary ids.
    """
    ids = [rng.randrange(min(vocab_size, 256)) for _ in range(num_tokens)]
    if bos_token_id is not None and ids:
        ids[0] = bos_token_id
    return ids


def hf_greedy_kwargs(net) -> dict:
    """`generate` kwargs for greedy decoding of exactly max_new_tokens tokens, EOS included,
    as the engine's `ignore_eos` does: no stop token, rather than `min_new_tokens`, which
    would mask EOS's logit and so pick another token wherever EOS is the argmax."""
    cfg = net.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    # NOTE: an id no token has; None would fall back to the model config's EOS
    return {"do_sample": False, "eos_token_id": [-1], "pad_token_id": pad}


def load_peer(model: str, device: str, dtype: Any):
    """Returns the transformers model with the engine's weights (eval mode, on device, in
    the torch dtype `dtype`): `tiny` is written to a temporary HF folder first.

    Raises ImportError with an install hint when transformers is missing.
    """
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
    except ImportError as e:
        raise ImportError("the transformers peer needs `pip install agentos[bench]`") from e
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    if model != "tiny":
        net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        return net.to(device).eval()
    from agentos.kernel.runner.loader import save_hf_folder, tiny_hf_config, tiny_hf_weights

    with tempfile.TemporaryDirectory(prefix="agentos-tiny-") as folder:
        save_hf_folder(folder, tiny_hf_config(), tiny_hf_weights())
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return net.to(device).eval()


def on_engine_thread(engine, fn: Callable, *args) -> Any:
    """Runs fn(*args) on the engine's loop thread, between its steps, and returns the
    result (an awaitable for an AsyncEngine). Peers run their torch work there so the
    process has one OpenMP thread pool: with libgomp, while a second thread's pool is
    alive every parallel op in both pays a sleep/wake handoff (2-3x on small CPU ops),
    which would slow whichever system ran second."""
    fut = engine.kernel.call(fn, *args)
    if engine.is_async:
        import asyncio

        return asyncio.wrap_future(fut)
    return fut.result()


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def verdict(passed: bool) -> str:
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def check(name: str, passed: bool, detail: str) -> dict:
    """One acceptance target as a JSON-ready record."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def new_console():
    """A rich console; 120 columns when output goes to a file or pipe (rich's default is 80,
    which squeezes the tables)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                console: Any = None) -> None:
    """Prints rows under columns as a rich table (numbers right-aligned)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(c if isinstance(c, str) else fmt(c) for c in row))
    (console or new_console()).print(table)


_bar: Any = None  # the rich Progress on screen; a nested progress() adds its task to it


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """Yields advance(steps=1), which moves a transient progress bar of `total` steps on
    stderr; the bar is gone when the block exits. Off a terminal (logs, pipes, tests)
    there is no bar and advance does nothing. Inside another progress() (a benchmark
    that runs another), the bar is a second line of the one on screen.

    NOTE: no refresh thread: the bar is redrawn by advance, at most 10 times a second,
    so nothing wakes up between the steps being timed."""
    global _bar
    if total < 1 or not sys.stderr.isatty():
        yield lambda steps=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    outer = _bar
    bar = outer or Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True),
                            auto_refresh=False, transient=True)
    task = bar.add_task(description, total=total)
    last = 0.0

    def advance(steps: int = 1) -> None:
        nonlocal last
        bar.advance(task, steps)
        if time.monotonic() - last >= 0.1:
            last = time.monotonic()
            bar.refresh()

    if outer is None:
        bar.start()
        _bar = bar
    bar.refresh()
    try:
        yield advance
    finally:
        bar.remove_task(task)
        if outer is None:
            _bar = None
            bar.stop()
        else:
            bar.refresh()


def print_checks(checks: Sequence[dict], console: Any = None) -> None:
    console = console or new_console()
    for c in checks:
        console.print(f"{verdict(c['passed'])} {c['name']}: {c['detail']}")


def fmt(x: Any) -> str:
    """Numbers with about three significant digits; NaN (skipped) as a dash."""
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0 or abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.3g}"
    return str(x)


def write_json(path: str | Path, data: dict) -> None:
    """Writes data as indented JSON (NaN becomes null); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(data), indent=2) + "\n")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x
