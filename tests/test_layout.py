"""The code stays readable as it grows: no function past 80 lines (argument-parser tables
excepted), the kernel's core under 500, and the benchmarks out of the serving path's
imports."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agentos", "api", "kernel", "snapshot")
# argument-parser tables: one add_argument per flag, nothing to read but the flags
TABLES = {("agentos/cli.py", "_parser")}


def functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield rel, node.name, node.end_lineno - node.lineno + 1


def test_no_function_past_80_lines():
    long = [(rel, name, n) for rel, name, n in functions() if n >= 80 and (rel, name) not in TABLES]
    assert not long, long


def test_kernel_core_under_500_lines():
    assert len((ROOT / "kernel/core.py").read_text().splitlines()) < 500


def test_serving_path_does_not_import_the_benchmarks():
    code = ("import sys, agentos, agentos.engine, agentos.client, agentos.api.app, "
            "agentos.snapshot.durable.journal; "
            "print([m for m in sys.modules if m.startswith('agentos.bench')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
