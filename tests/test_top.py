"""`agentos top`: render_frame on hand-made server answers (sorting, rates between two
frames, "-" on the first), then `agentos top` against a real server with API keys (--once,
the live view in a pseudo-terminal), and against no server."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
from rich.console import Console

from agentos import Client
from agentos.bench.api import free_port, run_server
from agentos.cli import _parser
from agentos.top import SORTS, Frame, render_frame

BLOCK = 65536


def system(**stats) -> dict:
    """A GET /v1/system answer: an idle server of 64 device and 32 host blocks."""
    st = {"kv": {"device_blocks_total": 64, "device_blocks_used": 16, "device_blocks_cached": 4,
                 "host_blocks_total": 32, "host_blocks_used": 8, "block_size": 16,
                 "block_bytes": BLOCK, "prefix_cache_blocks": 6, "prefix_cache_evictions": 1},
          "sessions": {"total": 3, "by_state": {"sleeping": 2, "running": 1}},
          "scheduler": "mlfq", "queue": {"runnable": 3, "by_level": {"1": 1, "0": 2}},
          "weight_version": 2, "paused": False, "asleep": False, "steps": 10,
          "tokens_generated": 100, "tokens_prefilled": 500, "forks": 1, "cow_copies": 0,
          "step_time_s": 1.0, "swap_out_blocks": 0, "swap_in_blocks": 0, "dropped_blocks": 0,
          "prefix_hit_tokens": 0, "tokens_scored": 0, "snapshots": 1, "preemptions": 0,
          "swapped_s": 0.0, "sched_s": 0.0005}
    st.update(stats)
    return {"model": "tiny", "tenant": {"name": "alice", "sessions": 3, "snapshots": 1},
            "stats": st}


def session(sid: str, **info) -> dict:
    return {"id": sid, "object": "session", "parent_id": None, "state": "sleeping", "level": 0,
            "num_tokens": 10, "num_cached": 9, "num_generated": 0, "device_blocks": 1,
            "host_blocks": 0, "created_at": 900.0, "last_active": 990.0, "swap_count": 0,
            "swapped_s": 0.0, "queue_wait_s": 0.0, **info}


def text(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def order(out: str, ids) -> list[str]:
    """ids in the order their rows appear."""
    return sorted(ids, key=lambda i: re.search(rf"^{i} ", out, re.M).start())


def row(out: str, sid: str) -> list[str]:
    return re.search(rf"^{sid} .*$", out, re.M).group(0).split()


SESSIONS = [session("sess_a", num_tokens=50, last_active=980.0, level=1, state="running",
                    queue_wait_s=0.004),
            session("sess_b", num_tokens=300, last_active=999.0, device_blocks=9, host_blocks=4,
                    parent_id="sess_a", swap_count=1, swapped_s=2.5, queue_wait_s=0.75),
            session("sess_c", num_tokens=20, last_active=950.0, level=0, state="swapped",
                    device_blocks=0, host_blocks=2, swap_count=3, swapped_s=75.0)]


@pytest.mark.parametrize("sort,expected", [
    ("activity", ["sess_b", "sess_a", "sess_c"]),  # most recent first
    ("tokens", ["sess_b", "sess_a", "sess_c"]),
    ("level", ["sess_b", "sess_c", "sess_a"]),  # level 0 first, then most recent
    ("state", ["sess_a", "sess_c", "sess_b"]),  # running, swapped, sleeping
    ("blocks", ["sess_b", "sess_c", "sess_a"]),
    ("swapped", ["sess_c", "sess_b", "sess_a"]),  # the longest off the device first
    ("id", ["sess_a", "sess_b", "sess_c"])])
def test_sort(sort, expected):
    out = text(render_frame(system(), SESSIONS, None, sort, now=1000.0))
    assert order(out, ["sess_a", "sess_b", "sess_c"]) == expected
    assert f"3 sessions, sorted by {sort}" in out


def test_first_frame_has_no_rates():
    out = text(render_frame(system(), SESSIONS, None, url="http://h:1", now=1000.0))
    assert row(out, "sess_b") == ["sess_b", "sess_a", "sleeping", "0", "300", "9", "0", "9",
                                  "4", "1", "2.5s", "0.8s", "-", "1.0s", "ago"]
    assert row(out, "sess_c")[-6:] == ["3", "1m15s", "0.0s", "-", "50.0s", "ago"]
    assert row(out, "sess_a")[-6:-3] == ["0", "0.0s", "0.0s"]
    assert "http://h:1 · model tiny · scheduler mlfq · weights v2" in out
    assert "16/64 blocks, 1.0 MiB of 4.0 MiB · 64.0 KiB per block" in out
    assert "prefix cache 6 blocks (4 idle, 1 evicted)" in out
    assert "8/32 blocks, 512.0 KiB of 2.0 MiB" in out
    assert "10, -/s · mean step 100.00 ms over the lifetime" in out  # 1.0 s / 10 steps
    assert "scheduling 50 µs per step" in out  # 0.5 ms / 10 steps
    assert "dropped 0 blocks · 0 preemptions, -/s" in out
    assert "generated 100, - tok/s" in out
    assert "3 on the server: running 1, sleeping 2 · tenant alice: 3 sessions" in out
    assert "L0 2, L1 1" in out
    assert "store" not in out and "PAUSED" not in out


def test_rates_between_two_frames():
    before = Frame(system(), [session("sess_a", num_generated=10),
                              session("sess_b", num_generated=7)], at=100.0)
    now = system(steps=30, step_time_s=1.4, tokens_generated=300, swap_out_blocks=4,
                 swap_in_blocks=2, paused=True, preemptions=3, sched_s=0.0045,
                 store={"worker_id": "w1", "up": False, "queued_writes": 3})
    now["model"] = "[red]m[/red]"  # printed as it is, not read as markup
    sessions = [session("sess_a", num_generated=30), session("sess_b", num_generated=7),
                session("sess_new", num_generated=5)]
    out = text(render_frame(now, sessions, before, "rate", at=102.0, now=1000.0))
    assert order(out, ["sess_a", "sess_b", "sess_new"]) == ["sess_a", "sess_b", "sess_new"]
    assert row(out, "sess_a")[-3] == "10.0"  # 20 tokens in 2 s
    assert row(out, "sess_b")[-3] == "0.0"
    assert row(out, "sess_new")[-3] == "-"  # no baseline yet
    assert "30, 10.0/s · mean step 20.00 ms · scheduling 200 µs per step" in out  # 0.4 s, 4 ms
    assert "3 preemptions, 1.5/s" in out
    assert "over the lifetime" not in out
    assert "generated 300, 100.0 tok/s" in out
    assert "out 4 blocks (256.0 KiB), 128.0 KiB/s · in 2 blocks (128.0 KiB), 64.0 KiB/s" in out
    assert "PAUSED" in out and "model [red]m[/red]" in out
    assert "DOWN · worker w1 · queued writes 3" in out
    # a restarted server (counters went back) is read as a first frame
    out = text(render_frame(system(steps=2, step_time_s=0.5), sessions, before, at=102.0))
    assert "2, -/s · mean step 250.00 ms over the lifetime" in out


def test_limit_and_bad_sort():
    out = text(render_frame(system(), SESSIONS, None, "tokens", limit=1, now=1000.0))
    assert re.findall(r"^sess_\w+", out, re.M) == ["sess_b"]
    assert "3 sessions, sorted by tokens; 2 more not shown" in out
    with pytest.raises(ValueError, match="sort must be one of"):
        render_frame(system(), SESSIONS, None, "size")


def test_server_without_history():
    """An older server reports no history: its columns show "-", its counters 0."""
    st = system()
    for key in ("preemptions", "swapped_s", "sched_s"):
        del st["stats"][key]
    old = [{k: v for k, v in s.items() if k not in ("swap_count", "swapped_s", "queue_wait_s")}
           for s in SESSIONS]
    out = text(render_frame(st, old, None, "swapped", now=1000.0))
    assert row(out, "sess_c")[-6:] == ["-", "-", "-", "-", "50.0s", "ago"]
    assert "0 preemptions" in out and "scheduling - per step" in out


def test_cli_sort_choices_are_the_sorts():
    top = _parser()._subparsers._group_actions[0].choices["top"]
    sort = next(a for a in top._actions if a.dest == "sort")
    assert tuple(sort.choices) == SORTS and sort.default == "activity"


# -- against a server ------------------------------------------------------------------


def top(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    """Runs `agentos top *args` into a pipe, with AGENTOS_API_KEY=api_key (unset: None)."""
    env = {k: v for k, v in os.environ.items() if k != "AGENTOS_API_KEY"}
    if api_key is not None:
        env["AGENTOS_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "agentos.cli", "top", *args], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_top_against_a_server(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-alice": "alice", "sk-bob": "bob"},
                                "tenants": {"alice": {"admin": True}}}))  # engine-wide counters
    with run_server(["--kv-blocks", "16", "--host-blocks", "64", "--api-keys", str(keys),
                     "--log-level", "warning"]) as url:
        with Client(url, api_key="sk-alice") as alice, Client(url, api_key="sk-bob") as bob:
            a = alice.create_session(tokens=list(range(1, 121)), seed=1)  # 8 blocks, then 9
            a.generate(max_tokens=4, ignore_eos=True)
            b = alice.create_session(tokens=list(range(2, 122)), seed=2)
            b.generate(max_tokens=4, ignore_eos=True)
            snap = a.snapshot()
            kids = a.fork(n=2)
            kids[0].generate(max_tokens=12, ignore_eos=True)  # past the device pool: swaps
            other = bob.create_session(prompt="not alice's")
            st = alice.stats()
            infos = {i["id"]: i for i in alice.list_sessions()}
            ids = [a.id, b.id, *(k.id for k in kids)]

        r = top("--once", "--url", url, "--api-key", "sk-alice")
        assert r.returncode == 0, r.stderr
        out = r.stdout
        for sid in ids:
            assert re.search(rf"^{sid} ", out, re.M), out
        assert other.id not in out
        assert row(out, kids[0].id)[1] == a.id  # the parent column
        # each session's history: SWAPS, SWAPPED, WAIT (before TOK/S and ACTIVE)
        for sid in ids:
            swaps, swapped, wait = row(out, sid)[-6:-3]
            assert int(swaps) == infos[sid]["swap_count"] >= 0
            assert re.fullmatch(r"\d+\.\ds", swapped) and re.fullmatch(r"\d+\.\ds", wait)
        assert st["preemptions"] >= 1 and sum(i["swap_count"] for i in infos.values()) >= 1
        assert f"{st['preemptions']} preemptions, -/s" in out
        assert re.search(r"scheduling \d+ µs per step", out)
        kv = st["kv"]
        assert f"{kv['device_blocks_used']}/{kv['device_blocks_total']} blocks" in out
        assert f"{kv['host_blocks_used']}/{kv['host_blocks_total']} blocks" in out
        assert st["swap_out_blocks"] > 0 and f"out {st['swap_out_blocks']} blocks" in out
        assert f"generated {st['tokens_generated']}, - tok/s" in out
        assert "tenant alice: 4 sessions, 1 snapshots" in out
        assert "4 sessions, sorted by activity" in out
        assert "\x1b[" not in out  # no colors into a pipe
        assert snap.num_tokens == 124

        r = top("--once", "--url", url, "--sort", "tokens", "--limit", "1",
                api_key="sk-alice")  # the key from the environment
        assert r.returncode == 0, r.stderr
        assert re.findall(r"^sess_\w+", r.stdout, re.M) == [kids[0].id]  # the longest
        assert "3 more not shown" in r.stdout

        r = top("--once", "--url", url)  # no key
        assert r.returncode == 1 and r.stdout == ""
        assert "HTTP 401" in r.stderr and "--api-key" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1

        if hasattr(os, "openpty"):
            live_view(url)


def live_view(url: str) -> None:
    """The live view in a pseudo-terminal: it draws, 's' changes the sort, 'q' quits."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {**os.environ, "AGENTOS_API_KEY": "sk-alice", "TERM": "xterm"}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen([sys.executable, "-m", "agentos.cli", "top", "--url", url,
                             "--interval", "0.2"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    seen = b""

    def wait_for(pattern: bytes, timeout: float = 15.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while pattern not in seen:
            assert time.monotonic() < deadline, f"no {pattern!r} in {seen[-2000:]!r}"
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
        assert pattern in seen, seen[-2000:]

    try:
        wait_for(b"sorted by activity")
        os.write(master, b"s")
        wait_for(b"sorted by tokens")
        wait_for(b"0.0 tok/s")  # a later frame, with rates (idle: 0.0)
        os.write(master, b"q")
        assert proc.wait(timeout=10) == 0
        assert b"Traceback" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_unreachable_server():
    r = top("--once", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("agentos top: cannot reach http://127.0.0.1:")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
