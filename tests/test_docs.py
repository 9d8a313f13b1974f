"""The documentation cannot rot: every code block of README.md and docs/*.md is run or
checked here.

- python blocks run as scripts (a block that talks to http://127.0.0.1:8000 gets a live
  server instead);
- bash blocks: each `agentos ...` command must parse; `run` and `top` run; `serve` and
  `gateway` start (on free ports, with a private Redis) and answer /health; a `bench`
  scenario must have a smoke test in tests/test_bench.py (full default runs take minutes);
  installs, lint and the test run must be the CI command, which must be the README's;
- json blocks load (a keys file loads as tenants);
- docs/rest.md is what `python -m agentos.api.reference` prints now;
- relative links point at files that exist.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agentos.bench.api import free_port, run_agentos, run_server
from agentos.bench.redis_server import RedisServer
from agentos.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
CI_LINE = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
DOC_URL = "http://127.0.0.1:8000"


def blocks(lang: str) -> list[tuple[str, str]]:
    """(where, code) of every `lang` block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            if m.group(1) == lang:
                line = text[: m.start()].count("\n") + 1
                out.append((f"{path.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def commands() -> list[tuple[str, str]]:
    """(where, command) of every command of every bash block, split at `&&`."""
    out = []
    for where, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("(command -v"):  # the CI command as a whole
                out.append((where, line))
                continue
            out += [(where, part.strip()) for part in line.split("&&")]
    return out


@pytest.fixture(scope="module")
def server():
    with run_server(["--kv-blocks", "2048", "--log-level", "warning"]) as url:
        yield url


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as r:
        yield r


@pytest.mark.parametrize("where,code", blocks("python"), ids=lambda x: x if ":" in str(x) else "")
def test_python_blocks_run(where, code, server, tmp_path):
    code = code.replace(DOC_URL, server)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, f"{where}:\n{r.stderr[-2000:]}"


def test_json_blocks_load(tmp_path):
    from agentos.api.tenants import load_tenants

    found = blocks("json")
    assert found
    for where, code in found:
        data = json.loads(code)
        if "keys" in data:
            path = tmp_path / "keys.json"
            path.write_text(code)
            assert load_tenants(str(path)).keys, where


def test_ci_runs_the_readme_test_command():
    readme = [c for w, c in commands() if w.startswith("README") and c.startswith("(command -v")]
    assert readme == [CI_LINE]


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "agentos.cli"]:
        argv = argv[3:]
    elif argv[0] == "agentos":
        argv = argv[1:]
    return argv


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i + 1], value, *argv[i + 2:]]
    return [*argv, flag, value]


INSTALLS = ("pip install -e .", 'pip install -e ".[bench]"')


def test_the_documented_installs_are_within_the_test_install():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["bench"]) <= set(extras["test"])


def _check_gpu_check_args(argv: list[str], where: str) -> None:
    """The flags exist and the parts named are the script's."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = gpu_check.make_parser().parse_args(argv)
    known = {p["name"] for p in gpu_check.part_list("cuda", False)}
    assert not args.parts or set(args.parts.split(",")) <= known, f"{where}: {argv}"


def test_every_command_is_run_or_checked(server, redis):
    bench_tests = (ROOT / "tests" / "test_bench.py").read_text()
    seen = set()
    servers: dict[str, list[list[str]]] = {}  # per block, started together (workers, gateway)
    for where, cmd in commands():
        if cmd == CI_LINE or cmd in CI_LINE.split(" && ") or cmd in INSTALLS:
            continue  # run by CI itself (these installs are subsets of the test install's)
        if cmd.startswith("bash scripts/gpu_check.sh"):  # its dry run: tests/test_gpu_check.py
            _check_gpu_check_args(shlex.split(cmd)[2:], where)
            continue
        assert cmd.startswith(("agentos ", "python -m agentos")), f"{where}: unchecked {cmd!r}"
        argv = _argv(cmd)
        _parser().parse_args(argv)  # every flag exists (SystemExit otherwise)
        kind = argv[0]
        seen.add(kind)
        if kind == "bench":
            assert f'"bench", "{argv[1]}"' in bench_tests, f"{where}: no smoke test of {cmd!r}"
        elif kind == "run":
            r = subprocess.run([sys.executable, "-m", "agentos.cli", *argv], capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, f"{where}: {r.stderr[-2000:]}"
        elif kind == "top":
            argv = _with(argv, "--url", server)
            r = subprocess.run([sys.executable, "-m", "agentos.cli", *argv], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0 and "sessions" in r.stdout, f"{where}: {r.stderr[-2000:]}"
        elif kind in ("serve", "gateway"):
            servers.setdefault(where, []).append(argv)
        else:
            pytest.fail(f"{where}: no check for `agentos {kind}`")
    assert {"run", "serve", "gateway", "top", "bench"} <= seen
    for where, group in servers.items():
        with contextlib.ExitStack() as stack:
            for argv in group:  # in the block's order: workers before their gateway
                port = str(free_port())
                argv = _with(_with(argv, "--port", port), "--log-level", "warning")
                if "--redis" in argv:
                    argv = _with(argv, "--redis", redis.url)
                if argv[0] == "serve" and "--kv-blocks" not in argv:
                    argv = _with(argv, "--kv-blocks", "1024")
                url = f"http://127.0.0.1:{port}"
                stack.enter_context(run_agentos(argv, url))
                assert httpx.get(f"{url}/health", timeout=30).status_code == 200, (where, argv)


def test_rest_reference_is_current():
    from agentos.api.app import ServerSettings, create_app
    from agentos.api.reference import render

    want = render(create_app(ServerSettings()).openapi())
    assert (ROOT / "docs" / "rest.md").read_text() == want, \
        "docs/rest.md is stale: python -m agentos.api.reference > docs/rest.md"


def test_links_point_at_files():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: broken link {target}"
