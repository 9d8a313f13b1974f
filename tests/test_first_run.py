"""A first run without surprises: `agentos --version`, and `agentos serve` finding a taken
port before it loads the model, a bad model path in one line (exit 2, no traceback), and
one summary line once it serves."""

from __future__ import annotations

import socket
import subprocess
import sys

from agentos import __version__
from agentos.bench.api import free_port, run_server

CLI = [sys.executable, "-m", "agentos.cli"]


def test_version():
    out = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"agentos {__version__}"


def test_a_taken_port_is_found_before_the_model_is_loaded():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a model that would fail to load: the port's error comes first
        out = subprocess.run([*CLI, "serve", "--port", str(port), "--model", "/nonexistent"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"agentos serve: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_bad_model_path_is_one_line():
    out = subprocess.run([*CLI, "serve", "--port", str(free_port()), "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("agentos serve: cannot load the model '/nonexistent'")
    assert "Traceback" not in out.stderr


def test_serve_prints_one_summary_line():
    log: list[str] = []
    with run_server(["--kv-blocks", "512", "--host-blocks", "256"], log_lines=log) as url:
        pass
    (line,) = [x for x in log if x.startswith("agentos serve: ")]
    assert line == (f"agentos serve: tiny on cpu (float32), KV 8,192 tokens (under one "
                    f"full-length session of 32,768), host tier 4,096 tokens; {url} "
                    f"(dashboard {url}/dashboard, docs {url}/docs)")
