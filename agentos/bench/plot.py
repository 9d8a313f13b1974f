"""`agentos bench <scenario> --plot FILE.png`: one matplotlib figure per benchmark, drawn
from the result dict its JSON holds.

Every figure has the same conventions: the title names the workload and the machine,
axes carry units, ours is blue and the peer (transformers, or the baseline a ratio is
taken against) orange, and ratios are written on the bars they compare. Results read
back from JSON work too (a skipped measurement is null there, NaN in memory).

matplotlib is imported when a figure is drawn, never at import; figures are made with
`matplotlib.figure.Figure` and saved by the Agg canvas, so no display or global pyplot
state is involved.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentos.bench.common import fmt

OURS = "#1f77b4"  # blue
OURS_DARK = "#0b3c6b"  # a second series of ours (HTTP msgpack, decode-only)
OURS_LIGHT = "#7fb8e6"  # a third series of ours (HTTP over http.client)
SDK = "#9467bd"  # purple: through the SDK's client
PEER = "#ff7f0e"  # orange: transformers, or the baseline of the ratios
OTHER = "#7f7f7f"  # grey: a third system
OTHER_2 = "#2ca02c"  # green: a fourth
INSTALL_HINT = "--plot needs matplotlib: pip install 'agentos[bench]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Returns when matplotlib can be imported; raises ImportError with an install hint
    otherwise. The CLI calls it before a benchmark starts, not after it has run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e


def plot(result: dict, path: str | Path) -> Path:
    """Draws the comparison of one benchmark's result (the dict its `run` returns, or its
    JSON read back) into path, a PNG (or any format matplotlib knows by the suffix);
    creates parent folders and overwrites the file. Returns the path.

    Raises ValueError for a result of no known benchmark, ImportError (with an install
    hint) when matplotlib is missing."""
    draw = _DRAWERS.get(result.get("bench"))
    if draw is None:
        raise ValueError(f"no plot for benchmark {result.get('bench')!r}; "
                         f"known: {', '.join(_DRAWERS)}")
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6), dpi=110, layout="constrained")
    draw(fig, result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# -- helpers ---------------------------------------------------------------------------


def _num(x: Any) -> float:
    """x as a float; NaN for None (JSON's skipped measurement)."""
    return float("nan") if x is None else float(x)


def _ok(x: Any) -> bool:
    return x is not None and not math.isnan(float(x)) and not math.isinf(float(x))


def _machine(cfg: dict) -> str:
    parts = [f"model {cfg['model']}" if "model" in cfg else None, cfg.get("device"), cfg.get("dtype"),
             _count(cfg["threads"], "thread") if cfg.get("threads") is not None else None]
    return ", ".join(p for p in parts if p)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _title(fig, text: str, subtitle: str = "") -> None:
    """The figure's title: what is compared, then the workload and machine (wrapped)."""
    lines = _wrap(subtitle, int(fig.get_figwidth() * 11.5))
    fig.suptitle(text + ("\n" + lines if lines else ""), fontsize=11.5)


def _footer(fig, text: str) -> None:
    # NOTE: supxlabel, not fig.text: the constrained layout makes room for it
    fig.supxlabel(_wrap(text, int(fig.get_figwidth() * 15)), fontsize=9, color="#444444")


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _times(x: float, digits: int = 2) -> str:
    """A ratio as '3.2x' (fewer digits when large); '' for NaN."""
    if not _ok(x):
        return ""
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.{digits}f}x"


def _bars(ax, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]],
          labels: dict[int, Sequence[str]] | None = None, ratios: Sequence[int] = (),
          log: bool | None = None, yerr: dict[int, Any] | None = None) -> None:
    """Grouped bars: one group per x label, one bar per series (name, values, color) in
    it. labels: series index -> text above each of its bars; those of the series in
    `ratios` are the point of the figure and drawn bold. log None: a log axis when the
    values span more than 30x."""
    import numpy as np

    values = [_num(v) for _, vs, _ in series for v in vs]
    finite = [v for v in values if _ok(v) and v > 0]
    if log is None:
        log = bool(finite) and max(finite) / min(finite) > 30
    # a series with nothing measured (a skipped peer) takes no room and no legend entry
    kept = [(i, s) for i, s in enumerate(series) if any(_ok(v) for v in s[1])]
    x = np.arange(len(groups))
    width = min(0.8 / max(1, len(kept)), 0.3)
    for k, (i, (name, vs, color)) in enumerate(kept):
        heights = [_num(v) for v in vs]
        bars = ax.bar(x + (k - (len(kept) - 1) / 2) * width, [h if _ok(h) else 0 for h in heights],
                      width, label=name, color=color, yerr=(yerr or {}).get(i),
                      error_kw={"elinewidth": 1, "capsize": 3, "ecolor": "#333333"})
        texts = (labels or {}).get(i)
        if texts is not None:
            strong = i in ratios
            ax.bar_label(bars, labels=[t if _ok(h) else "" for t, h in zip(texts, heights)],
                         padding=2, fontsize=9 if strong else 8,
                         fontweight="bold" if strong else "normal")
    ax.set_xticks(x, groups)
    ax.set_xlim(-0.75, len(groups) - 0.25)
    if log:
        _log_y(ax, min(finite, default=1.0), max(finite, default=10.0))
    elif finite:
        ax.set_ylim(0, max(finite) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _log_y(ax, lo: float, hi: float) -> None:
    """A log y axis from lo to hi with room above for labels, ticks as plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    bottom, top = lo / 2, hi * 4
    ax.set_ylim(bottom, top)
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:.2g}")
    ax.yaxis.set_major_formatter(plain)
    # with fewer than two powers of ten on the axis, label the minor ticks too
    decades = math.floor(math.log10(top)) - math.ceil(math.log10(bottom))
    ax.yaxis.set_minor_formatter(plain if decades < 1 else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=8)


def _vs(ours: float, base: float) -> str:
    """'3.1x\nlower' / '1.2x\nhigher': ours against base; '' when either is missing."""
    if not (_ok(ours) and _ok(base)) or ours <= 0 or base <= 0:
        return ""
    return f"{base / ours:.1f}x\nlower" if ours <= base else f"{ours / base:.1f}x\nhigher"


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=OTHER)
    ax.set_axis_off()


# -- the figures -----------------------------------------------------------------------


def _fork(fig, r: dict) -> None:
    from matplotlib.ticker import NullLocator

    cfg, rows = r["config"], r["lengths"]
    _title(fig, "fork / snapshot / rollback latency vs session length",
           f"{_machine(cfg)}; median of {cfg['repeats']} (HF re-prefill: {cfg['peer_repeats']}); "
           "HF fork = deepcopy of the DynamicCache, HF rollback = re-prefill of the prefix")
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax, "no session length fits the model's context")
        return
    n = [row["num_tokens"] for row in rows]
    lines = (("fork_us", "ours: fork", OURS, "o", "-"),
             ("snapshot_us", "ours: snapshot", OURS, "s", ":"),
             ("rollback_us", "ours: rollback", OURS, "^", "--"),
             ("peer_fork_us", "HF: deepcopy (fork)", PEER, "o", "-"),
             ("peer_rollback_us", "HF: re-prefill (rollback)", PEER, "^", "--"),
             ("peer_crop_us", "HF: DynamicCache.crop (one line of history)", "#ffbb78", "x", ":"))
    for key, label, color, marker, style in lines:
        ys = [_num(row.get(key)) for row in rows]
        if any(_ok(y) for y in ys):
            ax.plot(n, ys, marker=marker, linestyle=style, color=color, label=label, linewidth=2)
    for row in rows:
        for key, ratio_key in (("peer_fork_us", "fork_ratio"), ("peer_rollback_us", "rollback_ratio")):
            if _ok(row.get(key)) and _ok(row.get(ratio_key)):
                ax.annotate(_times(row[ratio_key], 1), (row["num_tokens"], row[key]),
                            xytext=(0, 7), textcoords="offset points", ha="center", fontsize=9,
                            color=PEER, fontweight="bold")
    ax.set_xscale("log")
    ys = [_num(row.get(key)) for row in rows for key, *_ in lines]
    _log_y(ax, min(y for y in ys if _ok(y)), max(y for y in ys if _ok(y)))
    ax.set_xticks(n, [f"{x:,}" for x in n])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(x=0.08)
    ax.set_xlabel("session length (tokens)")
    ax.set_ylabel("latency from the caller (µs, log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    fan = r.get("fanout")
    notes = []
    if fan is not None:
        notes.append(f"fork(n={fan['n']}) of a {fan['num_tokens']:,}-token session: "
                     f"{_num(fan['fork_us']):.0f} µs, {fan['blocks_added']} blocks added "
                     f"({fan['blocks_added_after_generate']} once every child wrote a token)")
    if r.get("skipped"):
        notes.append(f"skipped (beyond the context): {r['skipped']}")
    notes.append("labels: HF time / ours (how many times slower the peer is)")
    _footer(fig, "; ".join(notes))


def _decode(fig, r: dict) -> None:
    cfg, cases = r["config"], r["cases"]
    _title(fig, "greedy decode throughput: ours vs HF generate",
           f"{cfg['prompt_len']}-token prompts, {cfg['new_tokens']} new tokens each, prefill "
           f"included, median of {cfg['repeats']}; {_machine(cfg)}")
    ax = fig.add_subplot()
    groups = [f"{c['name']}\n{c['sessions']} session{'s' if c['sessions'] > 1 else ''}" for c in cases]
    _bars(ax, groups, [("ours", [c["ours_tok_s"] for c in cases], OURS),
                       ("HF generate", [c["hf_tok_s"] for c in cases], PEER)],
          labels={0: [fmt(c["ours_tok_s"]) + (f"\n{_times(_num(c['ratio']))} HF"
                                               if _ok(c["ratio"]) else "") for c in cases],
                  1: [fmt(c["hf_tok_s"]) for c in cases]}, ratios=(0,))
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    same = [f"{c['name']} {100 * c['agreement']:.1f}%" for c in cases if c["agreement"] is not None]
    _footer(fig, "labels on ours: ours / HF" + (f"; greedy tokens equal to HF's: {', '.join(same)}"
                                                 if same else ""))


_TREE_SYSTEMS = (("ours", "ours (fork)", OURS), ("hf", "HF deepcopy", PEER),
                 ("nofork", "no-fork, prefix cache", OTHER_2),
                 ("nocache", "no-fork, re-prefill", OTHER))


def _tree(fig, r: dict) -> None:
    cfg, wls = r["config"], r["workloads"]
    mcts = wls.get("mcts", {})
    _title(fig, "tree search over forks vs peers doing the same work",
           f"beam: width {cfg['width']}, depth {cfg['depth']}, {cfg['expand']} children per beam; "
           f"MCTS: {mcts.get('expansions', '?')} expansions of {cfg['mcts_expand']}, depth "
           f"{cfg['mcts_depth']}; {cfg['step_tokens']} tokens per branch, {cfg['prompt_len']}-token "
           f"prompt, median of {cfg['repeats']}; {_machine(cfg)}")
    names = [w for w in ("beam", "mcts") if w in wls]
    groups = [f"{'beam search' if w == 'beam' else 'MCTS'}\n{wls[w]['branches']} branches" for w in names]
    systems = [(key, label, color) for key, label, color in _TREE_SYSTEMS
               if any(wls[w]["systems"].get(key) for w in names)]
    for i, (metric, ratio_key, ylabel, scale) in enumerate((
            ("wall_s", "time", "wall time (s)", 1.0),
            ("peak_kv_bytes", "kv", "peak KV memory (MiB)", 1 / 2**20))):
        ax = fig.add_subplot(1, 2, i + 1)
        series, labels = [], {}
        for j, (key, label, color) in enumerate(systems):
            vals, texts = [], []
            for w in names:
                s = wls[w]["systems"].get(key)
                vals.append(_num(s[metric]) * scale if s else float("nan"))
                texts.append(f"{_num(s[metric]) * scale:.3g}" if key == "ours" and s else
                             _times(_num(wls[w]["ratios"].get(f"{ratio_key}_{key}_over_ours"))))
            series.append((label, vals, color))
            labels[j] = texts
        _bars(ax, groups, series, labels=labels, ratios=range(1, len(series)))
        ax.set_ylabel(ylabel)
        ax.set_title("wall time, prompt to result" if i == 0 else
                     "peak KV memory (blocks held x block bytes; HF: live caches)", fontsize=10)
        if i == 0:
            ax.legend(fontsize=9)
    notes = list(r.get("notes", []))
    _footer(fig, "labels: ours' value; on peers, peer / ours" + "".join(f"; {n}" for n in notes))


_CLASSES = ("<= 32 tokens", "33-256", "> 256")


def _agents(fig, r: dict) -> None:
    c = r["config"]
    rows = [(one["workload"], bound, one["bounds"][bound]) for one in r["workloads"]
            for bound in ("memory", "seats") if bound in one["bounds"]]
    fig.set_size_inches(12, 3.8 * len(rows) + 1.4)
    _title(fig, "agent turn latency: MLFQ vs FCFS on the same workloads, memory-bound and "
           "seat-bound",
           f"{c['sessions']} sessions x {c['turns']} turns, arrivals {c['arrival_rate']}/s "
           f"(Poisson or bursty), tool pauses ~{c['pause_ms']:.0f} ms, generation median "
           f"{c['gen_median']} tokens with {c['long_fraction']:.0%} long answers (median "
           f"{c['long_median']}); memory-bound: {c['max_batch_size']} seats, device pool "
           f"{c['memory_fraction']:.0%} of the working set, host tier 2x; seat-bound: "
           f"{c['seats']} seats; {_count(c['threads'], 'thread')}")
    policies = (("fcfs", "FCFS", PEER), ("mlfq", "MLFQ", OURS))
    for row, (w, bound, one) in enumerate(rows):
        pol = one["policies"]
        present = [(k, label, color) for k, label, color in policies if k in pol]
        ax = fig.add_subplot(len(rows), 2, 2 * row + 1)
        stats = (("mean_s", "mean"), ("p50_s", "p50"), ("p99_s", "p99"), ("max_s", "max"))
        series = [(label, [pol[k][s] for s, _ in stats], color) for k, label, color in present]
        labels = {}
        if {"fcfs", "mlfq"} <= pol.keys():
            labels[len(present) - 1] = [_vs(pol["mlfq"][s], pol["fcfs"][s]) for s, _ in stats]
        _bars(ax, [name for _, name in stats], series, labels=labels, ratios=(len(present) - 1,))
        ax.set_ylabel("turn latency (s)")
        tps = ", ".join(f"{label} {pol[k]['tokens_per_s']:.0f}" for k, label, _ in present)
        bound_name = {"memory": "memory-bound", "seats": "seat-bound"}[bound]
        ax.set_title(f"seed {w['seed']} ({w['arrivals']}), {bound_name}: latency per turn; "
                     f"tok/s {tps}", fontsize=10)
        ax.legend(fontsize=9)
        ax = fig.add_subplot(len(rows), 2, 2 * row + 2)
        counts = pol[present[0][0]]["by_length"]
        groups = [f"{c}\n({counts[c]['turns']} turns)" for c in _CLASSES if c in counts]
        series = [(label, [_num(pol[k]["by_length"][c]["mean_s"]) for c in _CLASSES if c in counts],
                   color) for k, label, color in present]
        labels = {}
        if {"fcfs", "mlfq"} <= pol.keys():
            labels = {len(present) - 1: [_vs(_num(pol["mlfq"]["by_length"][c]["mean_s"]),
                                             _num(pol["fcfs"]["by_length"][c]["mean_s"]))
                                         for c in _CLASSES if c in counts]}
        _bars(ax, groups, series, labels=labels, ratios=(len(present) - 1,))
        ax.set_ylabel("mean turn latency (s)")
        ax.set_xlabel("tokens the turn generated")
        ax.set_title("mean latency by turn length (do short turns wait behind long ones?)",
                     fontsize=10)
    _footer(fig, "labels on MLFQ: its latency against FCFS's")


def _swap(fig, r: dict) -> None:
    cfg, wl = r["config"], r["workload"]
    _title(fig, "swap: host-tier bandwidth, and throughput when the device pool is oversubscribed",
           f"{cfg['blocks']} blocks x {cfg['block_bytes'] / 1024:g} KiB per copy, median of "
           f"{cfg['repeats']}; workload: {wl['sessions']} concurrent sessions, ~{wl['prompt_len']}-token "
           f"prompts, {wl['turns']} turns of {wl['new_tokens']} tokens; {_machine(cfg)}")
    ax = fig.add_subplot(1, 2, 1)
    rows = r["bandwidth"]
    _bars(ax, [f"{b['direction']}\n{b['layout']}" for b in rows],
          [("swap (runner.swap_out / swap_in)", [b["swap_gb_s"] for b in rows], OURS),
           ("plain copy of the same bytes", [b["plain_gb_s"] for b in rows], PEER)],
          labels={0: [_times(_num(b["ratio"])) for b in rows]}, ratios=(0,))
    ax.set_ylabel("bandwidth (GB/s)")
    ax.set_xlabel("direction (out: device → host, in: host → device), slot layout")
    ax.set_title("bandwidth; labels: swap / plain copy", fontsize=10)
    ax.legend(fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    runs = r["runs"]
    colors = {"unconstrained": PEER, "swap": OURS, "drop": OTHER}
    groups = [f"{x['name']}\n{x['kv_blocks']} device" + (f" + {x['host_blocks']} host" if x["host_blocks"]
                                                           else "") + " blocks" for x in runs]
    xs = range(len(runs))
    bars = ax.bar(xs, [_num(x["tok_s"]) for x in runs], 0.5,
                  color=[colors.get(x["name"], OTHER) for x in runs])
    ax.bar_label(bars, labels=[
        _times(_num(x["ratio"])) + ("" if x["identical"] is None else
                                    f"\n{x['identical']}/{wl['sessions']} identical") for x in runs],
        padding=2, fontsize=9, fontweight="bold")
    ax.set_xticks(list(xs), groups)
    top = max((_num(x["tok_s"]) for x in runs if _ok(x["tok_s"])), default=1.0)
    ax.set_ylim(0, top * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"pool = 1/{cfg['oversubscribe']} of the working set "
                 f"({wl['working_set_blocks']} blocks); labels: x unconstrained", fontsize=10)
    _footer(fig, "drop: no host tier, pages that do not fit are dropped and recomputed from tokens; "
            "identical: sessions whose final greedy tokens equal the unconstrained run's")


def _tok_s_bars(fig, modes: dict, base: str, other: str, ratio: float, ratio_label: str,
                tick: Callable[[str], Any]) -> list[str]:
    """Two modes' tokens/s side by side (`base` in the peer's colour), `other` labelled with
    ratio_label around its time against base's; tick(mode) names each bar. Returns the
    modes drawn."""
    ax = fig.add_subplot()
    names = [n for n in (base, other) if n in modes]
    xs = range(len(names))
    bars = ax.bar(xs, [modes[n]["tok_s"] for n in names], 0.4,
                  color=[PEER if n == base else OURS for n in names])
    ax.bar_label(bars, labels=[f"{fmt(modes[n]['tok_s'])} tok/s" + (
        "\n" + ratio_label.format(_times(ratio)) if n == other and _ok(ratio) else "")
        for n in names], padding=2, fontsize=9, fontweight="bold")
    ax.set_xticks(list(xs), [tick(n) for n in names])
    ax.set_ylim(0, max(modes[n]["tok_s"] for n in names) * 1.2)
    ax.set_ylabel("generated tokens / s")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return names


def _determinism(fig, r: dict) -> None:
    cfg, modes = r["config"], r["modes"]
    _title(fig, "batch-invariant (deterministic) mode: what it costs",
           f"{cfg['sessions']} concurrent sessions, {cfg['min_prompt']}-{cfg['max_prompt']}-token "
           f"prompts, {cfg['new_tokens']} tokens each at temperature 1, median of "
           f"{_count(cfg['repeats'], 'run')} per mode; {_machine(cfg)}")
    names = _tok_s_bars(
        fig, modes, "default", "deterministic", _num(r.get("overhead")), "time {} default's",
        lambda n: f"{n}\nalone == in batch: tokens "
                  f"{'yes' if modes[n]['alone_equals_batch_tokens'] else 'no'}, logprobs "
                  f"{'bit for bit' if modes[n]['alone_equals_batch_logprobs'] else 'differ'}")
    _footer(fig, "; ".join(f"{n}: max |logprob alone - in batch| "
                           f"{modes[n]['alone_vs_batch_max_logprob_diff']:.1e}, repeated runs "
                           f"{'identical' if modes[n]['runs_identical'] else 'differ'}" for n in names))


def _api(fig, r: dict) -> None:
    cfg, ops = r["config"], r["ops"]
    _title(fig, "REST latency vs in-process calls",
           f"one session of {cfg['num_tokens']} tokens, {cfg['repeats']} timed repeats after "
           f"{cfg['warmup']} warm-up; `agentos serve` on loopback, keep-alive httpx, http.client, "
           "agentos.Client; "
           f"{_machine(cfg)}")
    ax = fig.add_subplot()
    transports = [("inprocess", "in-process Engine", PEER), ("json", "HTTP, JSON", OURS),
                  ("msgpack", "HTTP, msgpack", OURS_DARK)]
    if "stdlib" in ops[0]:  # results written before the http.client transport lack it
        transports.append(("stdlib", "HTTP, JSON, http.client", OURS_LIGHT))
    if "sdk" in ops[0]:  # and before the SDK's
        transports.append(("sdk", "agentos.Client (JSON)", SDK))
    series, labels, yerr = [], {}, {}
    for i, (t, label, color) in enumerate(transports):
        p50 = [_num(op[t]["p50_us"]) for op in ops]
        p99 = [_num(op[t]["p99_us"]) for op in ops]
        series.append((label, p50, color))
        yerr[i] = [[0] * len(ops), [max(0.0, b - a) if _ok(a) and _ok(b) else 0 for a, b in zip(p50, p99)]]
        if t != "inprocess":
            labels[i] = [_times(_num(op.get(f"{t}_ratio")), 1) for op in ops]
    _bars(ax, [op["op"] + (" (1 token)" if op["op"] == "generate" else "") for op in ops], series,
          labels=labels, ratios=(1, 2), log=True, yerr=yerr)
    ax.set_ylabel("latency from the caller, p50 (µs, log); whisker: p99")
    ax.legend(fontsize=9, loc="upper left")
    _footer(fig, "labels on HTTP bars: p50 / in-process p50 (the price of the REST layer)")


def _journal(fig, r: dict) -> None:
    cfg, metrics = r["config"], r["metrics"]
    _title(fig, "the journal's cost: Redis vs the in-memory store vs no journal",
           f"throughput: {cfg['sessions']} sessions x {cfg['prompt_len']}-token prompts x "
           f"{cfg['new_tokens']} new tokens, median of {cfg['repeats']}; ops: median of "
           f"{cfg['op_repeats']}; Redis {cfg['redis_server']}; {_machine(cfg)}")
    systems = (("memory", "in-memory store", PEER), ("redis", "Redis", OURS), ("off", "no journal", OTHER))
    gen = [m for m in metrics if m["metric"] == "generate_tok_s"]
    ops = [m for m in metrics if m["metric"] != "generate_tok_s"]
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 3])
    ax = fig.add_subplot(grid[0])
    if gen:
        m = gen[0]
        _bars(ax, ["generate"], [(label, [m[k]], color) for k, label, color in systems],
              labels={1: [_times(_num(m["redis_over_memory"]))], 2: [_times(_num(m["off_over_memory"]))]},
              ratios=(1, 2), log=False)
        ax.set_ylabel("generated tokens / s")
        ax.set_title("throughput", fontsize=10)
    else:
        _no_data(ax, "no throughput runs")
    ax = fig.add_subplot(grid[1])
    if ops:
        groups = [f"{m['metric'].removesuffix('_us')}\n@{m['num_tokens']:,}" for m in ops]
        _bars(ax, groups, [(label, [m[k] for m in ops], color) for k, label, color in systems],
              labels={1: [_times(_num(m["redis_over_memory"])) for m in ops]}, ratios=(1,), log=True)
        ax.set_ylabel("latency from the caller (µs, log)")
        ax.set_xlabel("operation @ session length (tokens)")
        ax.set_title("fork(1), snapshot, rollback", fontsize=10)
        ax.legend(fontsize=9, loc="upper left")
    else:
        _no_data(ax, "no session length fits the model's context")
    _footer(fig, "labels: system / in-memory store (tok/s: below 1 is slower; µs: above 1 is slower)"
            + (f"; skipped lengths (beyond the context): {r['skipped']}" if r.get("skipped") else ""))


def _gpu(fig, r: dict) -> None:
    cfg, shapes = r["config"], r["shapes"]
    fig.set_size_inches(14, 4.8 * max(1, len(shapes)) + 1)
    _title(fig, f"agentos on {r.get('device_name', cfg['device'])}",
           f"random-weight models; {cfg['prompt_len']}-token prompts, {cfg['new_tokens']} new "
           f"tokens, median of {cfg['repeats']}; {cfg['device']}, {cfg['dtype']}; device copy "
           f"bandwidth {_num(r['copy_gb_s']):.0f} GB/s")
    grid = fig.add_gridspec(len(shapes), 3, width_ratios=[3, 2, 1.5])
    for i, row in enumerate(shapes):
        bs = row["batches"]
        ax = fig.add_subplot(grid[i, 0])
        _bars(ax, [str(b["batch"]) for b in bs],
              [("ours, end to end", [b["ours_tok_s"] for b in bs], OURS),
               ("HF generate", [b["hf_tok_s"] for b in bs], PEER),
               ("ours, decode steps only", [b["steady_tok_s"] for b in bs], OURS_DARK)],
              labels={0: [_times(_num(b["ratio"]), 1) for b in bs]}, ratios=(0,), log=True)
        ax.set_xlabel("batch (concurrent sessions)")
        ax.set_ylabel("generated tokens / s (log)")
        ax.set_title(f"{row['shape']}: decode; labels: ours / HF", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax = fig.add_subplot(grid[i, 1])
        sw = row["swap"]
        _bars(ax, [f"{s['direction']}\n{s['layout']}" for s in sw],
              [("swap", [s["swap_gb_s"] for s in sw], OURS),
               ("plain pinned copy", [s["plain_gb_s"] for s in sw], PEER)],
              labels={0: [_times(_num(s["ratio"])) for s in sw]}, ratios=(0,), log=False)
        ax.set_ylabel("bandwidth (GB/s)")
        ax.set_title("swap vs plain copy; labels: swap / plain", fontsize=10)
        ax.legend(fontsize=8)
        ax = fig.add_subplot(grid[i, 2])
        ax.set_axis_off()
        one = next((b for b in bs if b["batch"] == 1), None)
        ops = row["ops"]
        lines = [f"fork of {ops['tokens']:,} tokens: {_num(ops['fork_s']) * 1e6:,.0f} µs",
                 f"rollback: {_num(ops['rollback_s']) * 1e6:,.0f} µs"]
        if one is not None and _ok(one.get("roofline")):
            lines = [f"batch-1 roofline: {100 * one['roofline']:.0f}%",
                     f"({_num(one['step_s']) * 1e3:.2f} ms per step,",
                     f" {one['bytes_per_step'] / 2**20:,.0f} MiB read per step)", "", *lines]
        ax.text(0, 0.95, "\n".join(lines), va="top", ha="left", fontsize=10, transform=ax.transAxes,
                family="monospace")
        ax.set_title("roofline, long-session ops", fontsize=10, loc="left")
    passed = sum(c["passed"] for c in r["checks"])
    _footer(fig, f"targets: {passed}/{len(r['checks'])} met; roofline = bytes a decode step must read "
            "/ step time / device copy bandwidth")


def _structured(fig, r: dict) -> None:
    cfg, modes = r["config"], r["modes"]
    _title(fig, "constrained decoding: what a JSON schema costs",
           f"{cfg['sessions']} concurrent sessions x {cfg['new_tokens']} tokens at temperature 1, "
           f"{cfg['prompt_len']}-token prompts, median of {_count(cfg['repeats'], 'run')} per "
           f"mode; {_machine(cfg)}")
    _tok_s_bars(fig, modes, "free", "json_schema", _num(r.get("cost")),
                "time per token {} unconstrained",
                {"free": "unconstrained", "json_schema": "JSON schema"}.get)
    passed = sum(c["passed"] for c in r["checks"])
    _footer(fig, f"targets: {passed}/{len(r['checks'])} met")


_DRAWERS: dict[str, Callable[[Any, dict], None]] = {
    "fork": _fork, "decode": _decode, "tree": _tree, "agents": _agents, "swap": _swap,
    "determinism": _determinism, "api": _api, "journal": _journal, "gpu": _gpu,
    "structured": _structured,
}
