"""scripts/gpu_check.sh's CPU dry run: every part of the GPU check runs on small shapes, so
the script is known to work before device time is spent on it. The benchmarks' targets
are the GPU's and are not asserted here; the kernels' and the greedy runs' agreement is."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["env"]["torch"], proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == ["env", "triton_kernels", "greedy", "families", "bench_gpu",
                           "bench_gpu_torch_attention", "bench_gpu_no_graphs", "determinism",
                           "agents", "tree"]
    assert {n: p["status"] for n, p in parts.items()} == {n: "ok" for n in parts}
    checks = {c["name"]: c for c in report["checks"]}
    kernels = checks["Triton kernels equal the torch reference"]
    assert kernels["passed"], kernels
    (greedy,) = [c for name, c in checks.items() if "greedy tokens identical" in name]
    assert greedy["passed"], greedy
    families = [c for name, c in checks.items() if "greedy equals transformers" in name]
    assert len(families) == 6 and all(c["passed"] for c in families), families
    for bench in ("bench_gpu", "determinism", "agents", "tree"):  # their checks are carried over
        assert any(name.startswith(f"{bench}: ") for name in checks), bench
    variants = [parts[n]["result"]["config"] for n in ("bench_gpu_torch_attention",
                                                       "bench_gpu_no_graphs")]
    assert variants[0]["attention"] == "torch" and not variants[1]["cuda_graphs"]
    summary = (tmp_path / "gpu_check.txt").read_text()
    assert "dry run" in summary and "[PASS] Triton kernels" in summary


def test_unknown_part_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path), "--parts", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown parts" in proc.stderr
