"""`agentos top`: a live view of a running server, like htop.

Each refresh reads GET /v1/system and GET /v1/sessions (the sessions of the API key's
tenant) and draws a header (memory per tier, swap traffic and preemptions, steps and the
scheduler's cost per step, throughput, sessions by state, the MLFQ queue) over one row per
session (with its paging and scheduling history: swaps, time swapped, queue wait). Rates
are differences between two refreshes, so the first frame shows "-" for them.
`render_frame` is a pure function of what the server said, for tests; `run` is the loop
around it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

SORTS = ("activity", "tokens", "rate", "blocks", "swapped", "level", "state", "id")
# the order of the state sort: the sessions doing work first
STATES = ("running", "runnable", "swapped", "sleeping", "embryo", "zombie")
_STATE_STYLE = {"running": "bold green", "runnable": "yellow", "swapped": "magenta",
                "sleeping": "dim", "embryo": "cyan", "zombie": "red"}


@dataclass(slots=True)
class Frame:
    """What one refresh read, and when: the baseline of the next refresh's rates."""

    system: dict  # the body of GET /v1/system
    sessions: list[dict]  # the `data` of GET /v1/sessions
    at: float  # time.monotonic() when it was read


class TopError(Exception):
    """The server could not be read: unreachable, or it answered with an error."""


def fetch(http: httpx.Client) -> tuple[dict, list[dict]]:
    """Returns (GET /v1/system, GET /v1/sessions' data) from the server `http` points at.
    Raises TopError with a one-line reason when it cannot be reached or answers an error."""
    return _get(http, "/v1/system"), _get(http, "/v1/sessions")["data"]


def _get(http: httpx.Client, path: str) -> dict:
    where = str(http.base_url).rstrip("/") + path
    try:
        r = http.get(path)
    except httpx.HTTPError as e:
        raise TopError(f"cannot reach {where}: {type(e).__name__}: {e}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        hint = " (set --api-key or AGENTOS_API_KEY)" if r.status_code in (401, 403) else ""
        raise TopError(f"{where}: HTTP {r.status_code}: {message}{hint}")
    try:
        return r.json()
    except ValueError:
        raise TopError(f"{where}: not a JSON answer: {r.text[:200]!r}") from None


# -- rendering -------------------------------------------------------------------------


def render_frame(system: dict, sessions: list[dict], previous: Frame | None,
                 sort: str = "activity", limit: int | None = None, *, url: str = "",
                 at: float | None = None, now: float | None = None) -> Group:
    """The frame for one refresh: the header over the sessions table, a rich renderable.

    previous is the last refresh (None on the first: rates show "-", the mean step time is
    the lifetime one); at is this refresh's time.monotonic() (default: now), now the wall
    clock that last activity is measured from (default: time.time()). Sessions are sorted
    by `sort` (one of SORTS) and at most `limit` are shown. Changes nothing. Raises
    ValueError for an unknown sort."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    at = time.monotonic() if at is None else at
    now = time.time() if now is None else now
    dt = at - previous.at if previous is not None else 0.0
    before = previous if previous is not None and dt > 0 else None
    return Group(_header(system, before, dt, url), _sessions(sessions, before, dt, sort, limit, now))


def _header(system: dict, previous: Frame | None, dt: float, url: str) -> Table:
    st = system["stats"]
    kv = st["kv"]
    last = previous.system["stats"] if previous is not None else None
    if last is not None and st.get("steps", 0) < last.get("steps", 0):
        last = None  # the counters went back: a restarted server

    def n(name: str) -> int | float:  # a counter; 0 when this server does not report it
        return st.get(name, 0)

    def rate(name: str, scale: float = 1.0) -> float | None:
        return None if last is None else (n(name) - last.get(name, 0)) * scale / dt

    block = kv.get("block_bytes", 0)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    uptime = system.get("uptime_s", st.get("uptime_s"))
    grid.add_row("server", _join(
        escape(url) or None, f"model {escape(str(system.get('model', '?')))}",
        f"scheduler {escape(str(st.get('scheduler', '?')))}",
        f"up {_duration(uptime)}" if uptime is not None else None,
        f"weights v{st.get('weight_version', 0)}",
        "[bold red]PAUSED[/]" if st.get("paused") else None,
        "[bold yellow]ASLEEP[/]" if st.get("asleep") else None))
    used, idle, total = (kv.get(k, 0) for k in ("device_blocks_used", "device_blocks_cached",
                                                "device_blocks_total"))
    grid.add_row("device", _join(
        f"{_bar(used, idle, total)} {used}/{total} blocks, {_bytes(used * block)} of "
        f"{_bytes(total * block)}", f"{_bytes(block)} per block",
        f"prefix cache {kv.get('prefix_cache_blocks', 0)} blocks ({idle} idle, "
        f"{kv.get('prefix_cache_evictions', 0)} evicted)"))
    used, total = kv.get("host_blocks_used", 0), kv.get("host_blocks_total", 0)
    grid.add_row("host", f"{_bar(used, 0, total)} {used}/{total} blocks, {_bytes(used * block)} of "
                 f"{_bytes(total * block)}" if total else
                 "no host tier: pages that do not fit are dropped and recomputed")
    grid.add_row("swap", _join(
        f"out {n('swap_out_blocks')} blocks ({_bytes(n('swap_out_blocks') * block)}), "
        f"{_per_s(rate('swap_out_blocks', block), _bytes)}",
        f"in {n('swap_in_blocks')} blocks ({_bytes(n('swap_in_blocks') * block)}), "
        f"{_per_s(rate('swap_in_blocks', block), _bytes)}",
        f"dropped {n('dropped_blocks')} blocks",
        f"{n('preemptions')} preemptions, {_per_s(rate('preemptions'), _num)}"))
    # per step over the last refresh (over the lifetime on the first)
    steps = n("steps") - (last.get("steps", 0) if last is not None else 0)
    step_time = n("step_time_s") - (last.get("step_time_s", 0.0) if last is not None else 0.0)
    sched_time = n("sched_s") - (last.get("sched_s", 0.0) if last is not None else 0.0)
    mean = f"{step_time / steps * 1e3:.2f} ms" if steps > 0 else "- (idle)"
    sched = f"{sched_time / steps * 1e6:.0f} µs" if steps > 0 and "sched_s" in st else "-"
    grid.add_row("steps", _join(f"{n('steps')}, {_per_s(rate('steps'), _num)}",
                                f"mean step {mean}{' over the lifetime' if last is None else ''}",
                                f"scheduling {sched} per step"))
    grid.add_row("tokens", _join(
        f"generated {n('tokens_generated')}, {_per_s(rate('tokens_generated'), _num, ' tok/s')}",
        f"prefilled {n('tokens_prefilled')}, {_per_s(rate('tokens_prefilled'), _num, ' tok/s')}",
        f"prefix hits {n('prefix_hit_tokens')}"))
    sessions, tenant = st.get("sessions", {}), system.get("tenant", {})
    grid.add_row("sessions", _join(
        f"{sessions.get('total', 0)} on the server"
        + (f": {_counts(sessions['by_state'], STATES)}" if sessions.get("by_state") else ""),
        f"tenant {escape(str(tenant.get('name', '?')))}: {tenant.get('sessions', '?')} sessions, "
        f"{tenant.get('snapshots', '?')} snapshots",
        f"{n('forks')} forks, {n('cow_copies')} copy-on-write copies"))
    by_level = st.get("queue", {}).get("by_level", {})
    grid.add_row("queue", ", ".join(f"L{k} {by_level[k]}" for k in sorted(by_level, key=int))
                 or "empty")
    store = st.get("store")
    if store:
        rest = (escape(f"{k.replace('_', ' ')} {v}") for k, v in store.items()
                if k not in ("up", "worker_id"))
        grid.add_row("store", _join("[green]up[/]" if store.get("up") else "[bold red]DOWN[/]",
                                    f"worker {escape(str(store.get('worker_id')))}", *rest))
    return grid


def _sessions(sessions: list[dict], previous: Frame | None, dt: float, sort: str,
              limit: int | None, now: float) -> Table:
    generated = {s["id"]: s["num_generated"] for s in previous.sessions} if previous else {}
    rows = []
    for s in sessions:
        was = generated.get(s["id"])
        rows.append((s, None if was is None else max(0, s["num_generated"] - was) / dt))
    rows.sort(key=lambda row: (*_SORT_KEYS[sort](*row), row[0]["id"]))
    shown = rows if limit is None else rows[:max(0, limit)]
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    # NOTE: ids are never cut (they are what an operator copies); a narrow terminal
    # squeezes the other columns first
    id_width = max((len(s["id"]) for s, _ in shown), default=2)
    for name, justify in (("ID", "left"), ("PARENT", "left"), ("STATE", "left"), ("LVL", "right"),
                          ("TOKENS", "right"), ("CACHED", "right"), ("GEN", "right"),
                          ("DEV", "right"), ("HOST", "right"), ("SWAPS", "right"),
                          ("SWAPPED", "right"), ("WAIT", "right"), ("TOK/S", "right"),
                          ("ACTIVE", "right")):
        table.add_column(name, justify=justify, no_wrap=True,
                         min_width=id_width if name == "ID" else None)
    for s, tok_s in shown:
        state = s["state"]
        table.add_row(Text(s["id"]), Text(s.get("parent_id") or "-"),
                      Text(state, style=_STATE_STYLE.get(state, "")), str(s["level"]),
                      str(s["num_tokens"]), str(s["num_cached"]), str(s["num_generated"]),
                      str(s["device_blocks"]), str(s["host_blocks"]),
                      str(s.get("swap_count", "-")), _seconds(s.get("swapped_s")),
                      _seconds(s.get("queue_wait_s")),
                      "-" if tok_s is None else f"{tok_s:.1f}",
                      f"{_duration(max(0.0, now - s['last_active']))} ago")
    hidden = len(rows) - len(shown)
    table.caption = (f"{len(rows)} sessions, sorted by {sort}"
                     f"{f'; {hidden} more not shown' if hidden else ''}")
    return table


# sort -> key of a (session, tokens/s or None) row; ties go by id
_SORT_KEYS = {
    "activity": lambda s, rate: (-s["last_active"],),
    "tokens": lambda s, rate: (-s["num_tokens"],),
    "rate": lambda s, rate: (-(rate if rate is not None else -1.0),),
    "blocks": lambda s, rate: (-(s["device_blocks"] + s["host_blocks"]),),
    "swapped": lambda s, rate: (-s.get("swapped_s", 0.0), -s.get("swap_count", 0)),
    "level": lambda s, rate: (s["level"], -s["last_active"]),
    "state": lambda s, rate: (STATES.index(s["state"]) if s["state"] in STATES else len(STATES),
                              -s["last_active"]),
    "id": lambda s, rate: (),
}


def _bar(used: int, cached: int, total: int, width: int = 20) -> str:
    # █ mapped, ▒ idle cached (reclaimable), ░ free: readable without colors
    if total <= 0:
        return "[" + " " * width + "]"
    a = round(width * used / total)
    b = min(width - a, round(width * cached / total))
    return f"[[red]{'█' * a}[/][yellow]{'▒' * b}[/][dim]{'░' * (width - a - b)}[/]]"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _num(x: float) -> str:
    return f"{x:.1f}"


def _per_s(value: float | None, fmt, unit: str = "/s") -> str:
    return f"{'-' if value is None else fmt(value)}{unit}"


def _join(*parts: str | None) -> str:
    return " · ".join(p for p in parts if p)


def _counts(counts: dict, order: tuple[str, ...]) -> str:
    keys = sorted(counts, key=lambda k: (order.index(k) if k in order else len(order), k))
    return ", ".join(f"{k} {counts[k]}" for k in keys)


def _seconds(s: float | None) -> str:
    # "-" from a server that does not report it
    return "-" if s is None else _duration(max(0.0, s))


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    if s < 86400:
        return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return f"{s // 86400:.0f}d{s % 86400 // 3600:02.0f}h"


# -- the loop --------------------------------------------------------------------------


def run(url: str, api_key: str | None = None, interval: float = 1.0, sort: str = "activity",
        limit: int | None = None, once: bool = False, console: Console | None = None) -> int:
    """Shows the server at `url` until 'q' or Ctrl-C (one frame and back with `once`).
    Returns the exit status: 0, or 1 when the first read fails (the reason printed on
    stderr in one line); later failures are shown in the view while it retries."""
    if interval <= 0:
        raise ValueError(f"--interval must be > 0, got {interval}")
    if sort not in SORTS:
        raise ValueError(f"--sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    api_key = api_key if api_key is not None else os.environ.get("AGENTOS_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = url.rstrip("/")
    if console is None:
        # a pipe or file gets plain text, wide enough that the tables are not squeezed
        console = Console(highlight=False) if sys.stdout.isatty() else Console(
            highlight=False, width=int(os.environ.get("COLUMNS", 0)) or 200)
    with httpx.Client(base_url=url, headers=headers, timeout=max(5.0, 2 * interval)) as http:
        try:
            system, sessions = fetch(http)
        except TopError as e:
            print(f"agentos top: {e}", file=sys.stderr)
            return 1
        frame = Frame(system, sessions, time.monotonic())
        if once:
            console.print(render_frame(system, sessions, None, sort, limit, url=url, at=frame.at))
            return 0
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way out without a tty
            _live(http, url, frame, interval, sort, limit, console)
    return 0


def _live(http: httpx.Client, url: str, frame: Frame, interval: float, sort: str,
          limit: int | None, console: Console) -> None:
    """Refreshes until 'q' (or Ctrl-C, raised to the caller). On a terminal the frame is
    redrawn in place; into a pipe or file each frame is printed after the last (batch mode,
    like `top -b`)."""
    keys = _Keys.open()
    previous: Frame | None = None
    error = ""

    def draw():
        rows = limit
        if rows is None and console.is_terminal:  # the header and table borders take ~18 lines
            rows = max(1, console.size.height - 18)
        view = render_frame(frame.system, frame.sessions, previous, sort, rows, url=url,
                            at=frame.at)
        help_line = f"s: sort (now {sort})  q: quit" if keys else "Ctrl-C: quit"
        return Group(view, Text(error, style="bold red") if error else Text(help_line, style="dim"))

    live = Live(draw(), console=console, auto_refresh=False, screen=True,
                vertical_overflow="crop") if console.is_terminal else None
    try:
        with live or contextlib.nullcontext():
            if live is None:
                console.print(draw())
            deadline = time.monotonic() + interval
            while True:
                key = keys.get(deadline - time.monotonic()) if keys else _sleep_until(deadline)
                if key == "q":
                    return
                if key == "s":
                    sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                elif time.monotonic() >= deadline:
                    deadline = time.monotonic() + interval
                    try:
                        system, sessions = fetch(http)
                        previous, frame = frame, Frame(system, sessions, time.monotonic())
                        error = ""
                    except TopError as e:
                        error = f"{e} (retrying every {interval:g}s)"
                else:
                    continue  # another key: nothing changed
                if live is not None:
                    live.update(draw(), refresh=True)
                else:
                    console.print()
                    console.print(draw())
    finally:
        if keys:
            keys.close()


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


class _Keys:
    """Keystrokes from a terminal in cbreak mode (no echo, no line buffering), read by a
    daemon thread. `open` returns None when stdin is not a terminal (or there is no
    termios: Windows); `close` restores the terminal's mode."""

    def __init__(self, fd: int, saved):
        self.fd, self.saved = fd, saved
        self.keys: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="agentos-top-keys", daemon=True)
        self.thread.start()

    @classmethod
    def open(cls) -> _Keys | None:
        try:
            import termios
            import tty
        except ImportError:
            return None
        try:
            if not sys.stdin.isatty():
                return None
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except (OSError, ValueError, termios.error):  # no usable terminal after all: no keys
            return None
        return cls(fd, saved)

    def _read(self) -> None:
        import select

        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                data = os.read(self.fd, 32)
                if not data:
                    return
                for ch in data.decode(errors="ignore").lower():
                    self.keys.put(ch)

    def get(self, timeout: float) -> str | None:
        """The next key, or None once timeout seconds pass without one."""
        try:
            return self.keys.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        import termios

        self.stop.set()
        self.thread.join(timeout=1.0)
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
