"""Smoke tests of the benchmarks and the CLI at toy sizes: they run end to end and write
the JSON they promise. No timing is asserted (the machine may be busy)."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys

import pytest
from test_plot import assert_png

from agentos.cli import main

pytest.importorskip("transformers")

FORK_ARGS = ["--lengths", "32,80", "--fanout-len", "48", "--fanout", "4", "--repeats", "2",
             "--peer-repeats", "1", "--warmup", "1"]
DECODE_ARGS = ["--sessions", "3", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"]


def test_bench_fork_json(tmp_path, capsys):
    path, png = tmp_path / "fork.json", tmp_path / "plots" / "fork.png"
    assert main(["bench", "fork", *FORK_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "fork"
    assert {"config", "lengths", "fanout", "checks", "passed", "fork_long_short_ratio",
            "rollback_long_short_ratio", "skipped"} <= out.keys()
    assert [r["num_tokens"] for r in out["lengths"]] == [32, 80]
    for row in out["lengths"]:
        assert {"fork_us", "snapshot_us", "rollback_us", "peer_fork_us", "peer_rollback_us",
                "peer_crop_us", "fork_ratio", "rollback_ratio"} <= row.keys()
        assert row["fork_us"] > 0 and row["peer_rollback_us"] > 0
    fan = out["fanout"]
    assert (fan["num_tokens"], fan["n"]) == (48, 4)
    # fork maps the parent's pages: no block is added until a child writes its shared tail
    assert fan["blocks_added"] == 0
    assert fan["blocks_added_after_generate"] == 4
    assert len(out["checks"]) == 5 and all(isinstance(c["passed"], bool) for c in out["checks"])
    assert "PASS" in capsys.readouterr().out


def test_bench_decode_json(tmp_path):
    path, png = tmp_path / "decode.json", tmp_path / "decode.png"
    assert main(["bench", "decode", *DECODE_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "decode"
    assert [c["name"] for c in out["cases"]] == ["batch", "single"]
    batch = out["cases"][0]
    assert {"sessions", "ours_tok_s", "hf_tok_s", "ratio", "ours_runs_s", "hf_runs_s",
            "agreement", "identical_sequences", "compared_sequences",
            "first_mismatch"} <= batch.keys()
    assert batch["sessions"] == 3 and len(batch["ours_runs_s"]) == 1
    assert batch["ours_tok_s"] > 0 and batch["hf_tok_s"] > 0
    # the split: a one-token run per side and repeat; the decode steps are the rest
    assert len(batch["ours_first_runs_s"]) == len(batch["hf_first_runs_s"]) == 1
    for side in ("ours", "hf"):
        first, full = batch[f"{side}_prefill_s"], batch[f"{side}_runs_s"][0]
        assert first == batch[f"{side}_first_runs_s"][0] > 0
        if full > first:
            assert batch[f"{side}_decode_tok_s"] == pytest.approx(3 * 3 / (full - first))
    assert batch["prefill_ratio"] == pytest.approx(batch["hf_prefill_s"] / batch["ours_prefill_s"])
    # identical weights, greedy, fp32: the same tokens as transformers
    assert batch["agreement"] == 1.0 and batch["first_mismatch"] is None
    assert {c["name"] for c in out["checks"]} >= {"batch greedy tokens equal HF's"}


def test_bench_without_peer(tmp_path):
    path = tmp_path / "fork.json"
    args = ["--lengths", "32", "--fanout-len", "32", "--fanout", "2", "--repeats", "1",
            "--warmup", "0", "--no-peer"]
    assert main(["bench", "fork", *args, "--json", str(path), "--plot", str(tmp_path / "f.png")]) == 0
    assert_png(tmp_path / "f.png")  # the peer's NaNs are left out, not drawn
    out = json.loads(path.read_text())
    row = out["lengths"][0]
    assert "peer_fork_us" not in row and row["fork_ratio"] is None
    # read back from JSON (NaN is null there), a result plots the same; folders are made
    from agentos.bench.plot import plot

    assert_png(plot(out, tmp_path / "new" / "f.png"))


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "fork", "--lengths", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "fork", "--lengths", "x,y"])
    assert e.value.code == 2


def test_run_subprocess():
    r = subprocess.run([sys.executable, "-m", "agentos.cli", "run", "--n", "2",
                        "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "fork (n=2)" in out and "equal to the snapshot" in out
    assert "device_blocks_used" in out
    assert "the tiny model has random weights" in out


def test_import_cli_stays_light():
    code = "import sys, agentos.cli, agentos.bench.common; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "False", r.stderr


API_ARGS = ["--tokens", "40", "--repeats", "3", "--warmup", "1"]


def test_bench_api_json(tmp_path, capsys):
    path, png = tmp_path / "api.json", tmp_path / "api.png"
    assert main(["bench", "api", *API_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "api"
    assert {"config", "ops", "server_log", "checks", "passed"} <= out.keys()
    assert (out["config"]["num_tokens"], out["config"]["repeats"]) == (40, 3)
    assert [r["op"] for r in out["ops"]] == ["fork", "snapshot", "rollback", "generate"]
    for row in out["ops"]:
        for transport in ("json", "msgpack", "stdlib", "sdk", "inprocess"):
            s = row[transport]
            assert 0 < s["p50_us"] <= s["p99_us"] and s["mean_us"] > 0, (row["op"], transport)
        assert all(row[f"{t}_ratio"] > 0 for t in ("json", "msgpack", "stdlib", "sdk"))
        # the server's access log timed each of those requests: within what the caller saw
        for transport in ("json", "msgpack", "stdlib", "sdk"):
            s = row[transport]
            assert 0 < s["app_p50_us"] <= s["p99_us"], (row["op"], transport)
    assert [c["name"] for c in out["checks"]] == [
        f"{op} p50 over HTTP <= 1 ms ({how})" for op in ("fork", "rollback")
        for how in ("SDK Client", "plain httpx", "http.client")]
    assert all(isinstance(c["passed"], bool) for c in out["checks"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "HTTP msgpack" in printed and "in-process" in printed and "workload" in printed
    assert "http.client" in printed and "SDK Client" in printed and "app p50 us" in printed
    assert not any(" msg=request " in line for line in out["server_log"])
    # the server is gone: its port can be listened on again
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", out["config"]["port"]))
        sock.listen()


def test_bench_api_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["bench", "api", "--tokens", "1"])
    assert e.value.code == 2


SWAP_ARGS = ["--blocks", "8", "--repeats", "1", "--warmup", "0", "--sessions", "6",
             "--prompt-len", "40", "--turns", "2", "--new-tokens", "4", "--max-tool-tokens", "8"]


def test_bench_swap_json(tmp_path, capsys):
    path, png = tmp_path / "swap.json", tmp_path / "swap.png"
    assert main(["bench", "swap", *SWAP_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "swap"
    assert {"config", "bandwidth", "workload", "runs", "checks", "passed"} <= out.keys()
    assert [(r["direction"], r["layout"]) for r in out["bandwidth"]] == [
        ("out", "contiguous"), ("out", "scattered"), ("in", "contiguous"), ("in", "scattered")]
    for row in out["bandwidth"]:
        assert row["bytes"] == 8 * out["config"]["block_bytes"]
        assert row["swap_gb_s"] > 0 and row["plain_gb_s"] > 0 and row["ratio"] > 0
    wl = out["workload"]
    assert (wl["sessions"], wl["turns"], wl["new_tokens"], wl["tool_tokens"]) == (6, 2, 4, [1, 8])
    ref, swap, drop = out["runs"]
    assert [r["name"] for r in out["runs"]] == ["unconstrained", "swap", "drop"]
    assert swap["kv_blocks"] == drop["kv_blocks"] == -(-wl["working_set_blocks"] // 4)
    assert ref["host_blocks"] == drop["host_blocks"] == 0 < swap["host_blocks"]
    for r in out["runs"]:
        assert r["generated_tokens"] == 6 * 2 * 4 and r["failed"] == 0 and r["tok_s"] > 0
    # a quarter of the working set on the device: pages went to host (or were dropped) and
    # came back, and greedy outputs do not depend on where they lived
    assert swap["swap_out_blocks"] > 0 and swap["swap_in_blocks"] > 0
    assert swap["dropped_blocks"] == 0 < drop["dropped_blocks"]
    assert swap["identical"] == drop["identical"] == 6 and ref["identical"] is None
    assert len(out["checks"]) == 6 and all(isinstance(c["passed"], bool) for c in out["checks"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "swap bandwidth >= 0.5x plain copy" in printed and "workload: 6 concurrent" in printed


AGENTS_ARGS = ["--sessions", "6", "--turns", "2", "--arrival-rate", "50", "--prompt-median", "16",
               "--tool-median", "4", "--gen-median", "3", "--long-fraction", "0.3",
               "--long-median", "40", "--gen-max", "64", "--pause-ms", "5", "--threads", "1"]


def test_bench_agents_json(tmp_path, capsys):
    """Two seeded workloads (Poisson, then bursty), each memory-bound and seat-bound, both
    policies; the report carries the workloads, the engine sizing, per-policy latencies
    and paging counters, the ratios and their medians (no timing is asserted)."""
    path = tmp_path / "agents.json"
    args = ["bench", "agents", *AGENTS_ARGS, "--seeds", "0,1", "--memory-fraction", "0.25",
            "--json", str(path), "--plot", str(tmp_path / "agents.png")]
    assert main(args) == 0
    assert_png(tmp_path / "agents.png")  # one row of panels per workload and bound
    out = json.loads(path.read_text())
    assert out["bench"] == "agents" and out["primary"] == "memory"
    assert [(w["workload"]["seed"], w["workload"]["arrivals"]) for w in out["workloads"]] == \
        [(0, "poisson"), (1, "bursty")]
    for one in out["workloads"]:
        wl, bounds = one["workload"], one["bounds"]
        assert (wl["sessions"], wl["turns_total"]) == (6, 12) and set(bounds) == {"memory", "seats"}
        mem, seats = bounds["memory"]["engine"], bounds["seats"]["engine"]
        # memory-bound: all seats, a fraction of the working set on the device, swap for all
        assert mem["max_batch_size"] == 256 and mem["host_blocks"] == 2 * wl["working_set_blocks"]
        assert wl["largest_session_blocks"] < mem["kv_blocks"] < wl["working_set_blocks"]
        # seat-bound: 2 seats, a pool that holds everything, no host tier
        assert seats["max_batch_size"] == 2 and seats["host_blocks"] == 0
        assert seats["kv_blocks"] > wl["working_set_blocks"]
        for bound in bounds.values():
            assert set(bound["policies"]) == {"fcfs", "mlfq"}
            for p in bound["policies"].values():
                assert p["tokens"] == wl["tokens_to_generate"]  # ignore_eos: the same work
                assert sum(c["turns"] for c in p["by_length"].values()) == 12
                assert 0 < p["p50_s"] <= p["max_s"] and p["tokens_per_s"] > 0 and p["steps"] > 0
                assert p["prefill_per_token"] >= 0 and p["sched_us_per_step"] >= 0
                for key in ("swap_out_blocks", "swap_in_blocks", "dropped_blocks", "preemptions",
                            "swapped_s"):
                    assert p[key] >= 0, key
                assert p["slowdown"] > 0  # each turn against its own alone latency
            assert set(bound["ratios"]) >= {"mean_latency_fcfs_over_mlfq",
                                            "tokens_per_s_mlfq_over_fcfs", "slowdown_fcfs_over_mlfq"}
            # the ceiling is FCFS's mean over the workload's alone mean
            assert bound["ratios"]["mean_latency_ceiling"] == pytest.approx(
                bound["policies"]["fcfs"]["mean_s"] / wl["alone_mean_s"])
        for p in bounds["seats"]["policies"].values():  # no host tier: nothing swapped
            assert p["swap_out_blocks"] == p["swap_in_blocks"] == 0
    means = sorted(w["bounds"]["memory"]["ratios"]["mean_latency_fcfs_over_mlfq"]
                   for w in out["workloads"])
    assert out["medians"]["memory"]["mean_latency_fcfs_over_mlfq"] == pytest.approx(sum(means) / 2)
    assert len(out["checks"]) == 3 and isinstance(out["passed"], bool)
    printed = " ".join(capsys.readouterr().out.split())
    assert "agent workloads: 6 sessions x 2 turns" in printed and "workload 2 (seed 1, bursty)" in printed
    assert "memory-bound" in printed and "seat-bound" in printed and "median of 2" in printed
    assert "MLFQ mean turn latency" in printed and "memory-bound, median of 2 workloads" in printed


def test_bench_agents_one_bound(tmp_path, capsys):
    """--seed runs one workload, --bound seats only the seat-bound engines; the targets
    then apply to what ran."""
    path = tmp_path / "agents.json"
    args = ["bench", "agents", *AGENTS_ARGS, "--seed", "3", "--arrivals", "bursty", "--bound",
            "seats", "--seats", "3", "--json", str(path)]
    assert main(args) == 0
    out = json.loads(path.read_text())
    (one,) = out["workloads"]
    assert (one["workload"]["seed"], one["workload"]["arrivals"]) == (3, "bursty")
    assert set(one["bounds"]) == {"seats"} and one["bounds"]["seats"]["engine"]["max_batch_size"] == 3
    assert out["primary"] == "seats" and "seat-bound, median of 1" in out["checks"][0]["detail"]


def test_agents_workloads():
    """The default set alternates arrival shapes; bursty arrivals come in groups at the same
    mean rate; the memory-bound pool is the stated fraction of the working set."""
    from agentos.bench.agents import AgentsBench, arrival_times, engine_options, make_workload

    assert AgentsBench().workloads == [(0, "poisson"), (1, "bursty"), (2, "poisson")]
    assert AgentsBench(seeds=(4, 5), arrivals="bursty").workloads == [(4, "bursty"), (5, "bursty")]
    assert AgentsBench(seed=7).workloads == [(7, "poisson")]
    with pytest.raises(ValueError):
        AgentsBench(arrivals="uniform")
    with pytest.raises(ValueError):
        AgentsBench(memory_fraction=0)
    b = AgentsBench(sessions=4000, arrival_rate=4.0, burst_size=8)
    for shape in ("poisson", "bursty"):
        times = arrival_times(b, shape, random.Random(0))
        assert len(times) == 4000 and times == sorted(times)
        assert 4000 / times[-1] == pytest.approx(4.0, rel=0.2)  # the same mean rate
    gaps = [y - x for x, y in zip(times, times[1:])]
    assert sum(g < 0.2 for g in gaps) > 0.7 * len(gaps)  # bursty: most arrive together
    b = AgentsBench(sessions=100)
    work = make_workload(b, 0, "poisson")
    options = engine_options(b, "memory", work)
    working_set = sum(-(-sum(len(t.tokens) + t.max_tokens for t in turns) // b.block_size)
                      for _, turns in work)
    assert options == {"max_batch_size": 256, "host_blocks": 2 * working_set,
                       "kv_blocks": math.ceil(0.2 * working_set)}


TREE_ARGS = ["--prompt-len", "64", "--width", "2", "--depth", "2", "--mcts-iterations", "3",
             "--mcts-depth", "2", "--repeats", "1"]


def test_bench_tree_json(tmp_path, capsys):
    """Beam search and MCTS run on all three systems with equal work; the report carries
    per-system wall time, tokens/s, peak KV and the ratios (no timing is asserted)."""
    path, png = tmp_path / "tree.json", tmp_path / "tree.png"
    assert main(["bench", "tree", *TREE_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "tree"
    assert {"config", "workloads", "notes", "checks", "passed"} <= out.keys()
    assert (out["config"]["prompt_len"], out["config"]["width"], out["config"]["depth"]) == (64, 2, 2)
    beam, mcts = out["workloads"]["beam"], out["workloads"]["mcts"]
    # beam: the prompt becomes 2 beams, then each of the 2 beams gets 2 children
    assert (beam["branches"], beam["tokens"]) == (6, 6 * 16)
    assert mcts["expansions"] == 3 and mcts["branches"] == 3 * 4 and mcts["nodes"] == 13
    for wl in (beam, mcts):
        assert set(wl["systems"]) == {"ours", "hf", "nofork", "nocache"}
        for s in wl["systems"].values():
            assert {"wall_s", "runs_s", "tok_s", "peak_kv_bytes", "prefix_hit_tokens"} <= s.keys()
            assert s["wall_s"] > 0 and len(s["runs_s"]) == 1 and s["peak_kv_bytes"] > 0
        assert set(wl["ratios"]) == {f"{m}_{p}_over_ours" for m in ("time", "kv")
                                     for p in ("hf", "nofork", "nocache")}
        assert all(x > 0 for x in wl["ratios"].values())
    assert wl["systems"]["hf"]["prefix_hit_tokens"] is None
    assert [c["name"] for c in out["checks"]] == [
        "beam search >= 5x faster than HF deepcopy",
        "beam search >= 3x faster than no-fork re-prefilling (prefix cache off)",
        "beam search peak KV < HF deepcopy's", "beam search peak KV < no-fork re-prefilling's",
        "every block free after the runs"]
    # with the prefix cache off, the no-fork peer prefills every branch's whole prefix
    assert beam["systems"]["nocache"]["prefix_hit_tokens"] == 0
    assert beam["systems"]["nofork"]["prefix_hit_tokens"] > 0
    assert out["checks"][-1]["passed"] is True
    printed = " ".join(capsys.readouterr().out.split())
    assert "beam search: width 2, depth 2" in printed and "HF deepcopy" in printed


def test_bench_tree_without_peer(tmp_path):
    path = tmp_path / "tree.json"
    args = [*TREE_ARGS, "--step-tokens", "4", "--no-peer", "--plot", str(tmp_path / "tree.png")]
    assert main(["bench", "tree", *args, "--json", str(path)]) == 0
    assert_png(tmp_path / "tree.png")
    beam = json.loads(path.read_text())["workloads"]["beam"]
    assert beam["systems"]["hf"] is None and beam["ratios"]["time_hf_over_ours"] is None
    assert beam["systems"]["nofork"]["tok_s"] > 0


def test_bench_tree_transformers_missing(tmp_path, monkeypatch):
    """Without transformers the HF peer is skipped with a note; the rest still runs."""
    from agentos.bench import tree

    def missing(*args, **kwargs):
        raise ImportError("the transformers peer needs `pip install agentos[bench]`")

    monkeypatch.setattr(tree, "load_peer", missing)
    path = tmp_path / "tree.json"
    args = [*TREE_ARGS, "--step-tokens", "4", "--mcts-iterations", "1"]
    assert main(["bench", "tree", *args, "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["workloads"]["mcts"]["systems"]["hf"] is None
    assert out["notes"] and "transformers peer skipped" in out["notes"][0]
    assert "beam search >= 5x faster than HF deepcopy" not in [c["name"] for c in out["checks"]]


def test_bench_determinism_json(tmp_path):
    path = tmp_path / "det.json"
    assert main(["bench", "determinism", "--sessions", "3", "--new-tokens", "6", "--max-prompt",
                 "40", "--repeats", "1", "--json", str(path), "--strict",
                 "--plot", str(tmp_path / "det.png")]) == 0
    assert_png(tmp_path / "det.png")
    out = json.loads(path.read_text())
    det = out["modes"]["deterministic"]
    assert det["alone_equals_batch_tokens"] and det["alone_equals_batch_logprobs"]
    assert det["alone_vs_batch_max_logprob_diff"] == 0.0 and out["overhead"] > 0
    assert out["passed"] and {c["name"] for c in out["checks"]}


def test_bench_structured_json(tmp_path):
    """Both modes generate the same tokens; the constrained outputs are JSON prefixes and
    the completed documents validate (the cost is a measurement: not asserted here)."""
    path = tmp_path / "structured.json"
    main(["bench", "structured", "--sessions", "3", "--new-tokens", "12", "--prompt-len", "8",
          "--repeats", "1", "--json", str(path), "--plot", str(tmp_path / "s.png")])
    assert_png(tmp_path / "s.png")
    out = json.loads(path.read_text())
    checks = {c["name"]: c for c in out["checks"]}
    for name, c in checks.items():
        assert c["passed"] or name.startswith("a JSON-schema constraint costs"), c
    assert out["modes"]["free"]["tokens"] == out["modes"]["json_schema"]["tokens"] == 36
    assert out["cost"] > 0


JOURNAL_ARGS = ["--sessions", "3", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "3",
                "--lengths", "32,80", "--op-repeats", "3", "--warmup", "1"]


def test_bench_journal_json(tmp_path, capsys):
    """The three systems (in-memory store, Redis, no journal) run the same work; every metric
    has a finite positive median on each, and ratios to the in-memory store. Needs
    redis-server: without it RedisServer raises RuntimeError and the test fails."""
    path, png = tmp_path / "journal.json", tmp_path / "journal.png"
    assert main(["bench", "journal", *JOURNAL_ARGS, "--json", str(path), "--plot", str(png)]) == 0
    assert_png(png)
    out = json.loads(path.read_text())
    assert out["bench"] == "journal"
    assert {"config", "systems", "metrics", "skipped", "checks", "passed"} <= out.keys()
    assert set(out["systems"]) == {"memory", "redis", "off"}
    assert [(m["metric"], m["num_tokens"]) for m in out["metrics"]] == [
        ("generate_tok_s", None), ("fork_us", 32), ("fork_us", 80), ("snapshot_us", 32),
        ("snapshot_us", 80), ("rollback_us", 32), ("rollback_us", 80)]
    for m in out["metrics"]:
        for key in ("memory", "redis", "off", "redis_over_memory", "off_over_memory"):
            assert isinstance(m[key], float) and 0 < m[key] < float("inf"), (m, key)
    for name, s in out["systems"].items():
        assert len(s["generate_runs_s"]) == 3 and [r["num_tokens"] for r in s["ops"]] == [32, 80]
        # the journal writes every generated token; without it, nothing
        assert (s["journal_writes"] >= 3 * 3 * 4) if name != "off" else s["journal_writes"] == 0
    assert out["passed"] and len(out["checks"]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "journal cost" in printed and "redis x" in printed


def test_bench_gpu_runs_on_cpu_small(tmp_path):
    """`agentos bench gpu` end to end on the CPU with a small grouped-query shape: every part
    reports finite numbers (its targets are the GPU's: not asserted here), greedy tokens
    agree with transformers, and the long-session ops leave the pool consistent."""
    path = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--device", "cpu", "--dtype", "float32", "--shapes", "tiny-gqa",
                 "--batches", "1,3", "--prompt-len", "16", "--new-tokens", "6", "--fork-len", "300",
                 "--op-repeats", "3", "--swap-blocks", "16", "--copy-bytes", "4000000",
                 "--repeats", "1", "--json", str(path), "--plot", str(tmp_path / "gpu.png")]) == 0
    assert_png(tmp_path / "gpu.png")
    out = json.loads(path.read_text())
    (shape,) = out["shapes"]
    assert [b["batch"] for b in shape["batches"]] == [1, 3]
    for b in shape["batches"]:
        assert b["ours_tok_s"] > 0 and b["hf_tok_s"] > 0 and b["step_s"] > 0
        assert b["agreement"] == 1.0
    assert shape["batches"][0]["roofline"] > 0  # on a CPU the weights may sit in cache: no bound
    assert shape["ops"]["tokens"] == 300 and shape["ops"]["fork_s"] > 0
    assert {(r["direction"], r["layout"]) for r in shape["swap"]} == {
        ("out", "contiguous"), ("out", "scattered"), ("in", "contiguous"), ("in", "scattered")}
    assert out["copy_gb_s"] > 0 and out["checks"]


def test_agents_simulate_runs_the_real_policy_and_pager_on_modelled_time():
    from agentos.bench import simulate

    result = simulate.run(simulate.quick((20, 120)))
    runs = {(r["sessions"], r["scheduler"]): r for r in result["runs"]}
    assert set(runs) == {(n, s) for n in (20, 120) for s in ("fcfs", "mlfq")}
    for r in runs.values():
        assert r["completed"] == r["turns"] and r["steps"] > 0 and r["step_us"] > 0
        # modelled time: a shared step never beats the alone one, so no mean is below it
        assert r["mean_s"] >= r["alone_mean_s"] > 0
    # the small pool binds at 120 sessions: the pager evicts, and the policies differ
    assert runs[120, "mlfq"]["preemptions"] > 0
    assert runs[120, "mlfq"]["mean_s"] != runs[120, "fcfs"]["mean_s"]
    names = [c["name"] for c in result["checks"]]
    assert any("per-step scheduling cost" in n for n in names)
    simulate.render(result)


def test_bench_tenants_json(tmp_path, capsys):
    """A short run: whatever attacks ran got the answers they must (never a 5xx), and the
    well-behaved tenant's outputs were the same alone and under attack."""
    path = tmp_path / "tenants.json"
    # NOTE: 96-token turns keep each phase near a second: the processes' CPU clocks tick in
    # 10 ms, and a phase of 0.2 s (16-token turns on a quick machine) could read 0
    main(["bench", "tenants", "--agents", "1", "--turns", "3", "--max-tokens", "96", "--rounds",
          "1", "--attackers", "2", "--idle-connections", "5", "--no-rates", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["bench"] == "tenants"
    phases = out["phases"]
    assert phases["alone"]["turns"] == phases["attacked"]["turns"] == phases["control"]["turns"] == 3
    assert phases["attacked"]["attacker_cores"] > 0 and phases["control"]["attacker_cores"] > 0
    assert out["identical"] is True
    expected = {"stop list of 100,000": {"422"}, "import, draws 2^40": {"400"},
                "import, garbage KV and mask": {"400"}, "import of 24 MiB": {"400", "413"},
                "tokenize 12 MiB": {"400", "413"}, "lone surrogate": {"400"},
                "generate walked away from": {"200"}, "body short of Content-Length": {"refused"},
                "another tenant's id": {"404"}, "weights without admin": {"403"},
                "connections never finishing their headers": {"closed by the server",
                                                              "still open"}}
    assert out["attacks"], "no attack ran"
    for name, a in out["attacks"].items():
        assert set(a["statuses"]) <= expected[name], (name, a["statuses"])
        assert a["5xx"] == 0 and a["failed"] == 0, (name, a)
    assert [c["name"] for c in out["checks"]][2:] == [
        "the well-behaved tenant's outputs identical", "no attack got a 5xx"]
    assert "What each attack got" in capsys.readouterr().out


def test_bench_rl_json(tmp_path, capsys):
    """A short run: with the prefix cache each group's prompt is prefilled once and each
    later turn only its new tokens (the tool's and the last sampled one); without it, far
    more. (The prompt fills whole pages: siblings that start together share full pages
    as they are computed, but each computes a partly filled last one itself.)"""
    path = tmp_path / "rl.json"
    main(["bench", "rl", "--groups", "2", "--samples", "3", "--turns", "3", "--prompt-len",
          "48", "--max-tokens", "4", "--tool-tokens", "5", "--tool-pause-ms", "0", "--steps",
          "1", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["bench"] == "rl"
    ours, peer = out["results"]["agentos"], out["results"]["no prefix cache"]
    assert ours["tokens"] == peer["tokens"] == 2 * 3 * 3 * 4
    assert ours["computed"] == 2 * 48 + 2 * 3 * 2 * (5 + 1)
    assert peer["computed"] > 2 * ours["computed"]
    assert "AgentOS over the peer" in capsys.readouterr().out


def test_a_missing_bench_extra_is_found_before_any_work(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    for argv in (["bench", "decode"], ["bench", "fork"], ["bench", "gpu", "--device", "cpu"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "pip install 'agentos[bench]'" in capsys.readouterr().err
    # without the peer it needs nothing more: the check lets it through
    from agentos.cli import _missing_bench_extra, _parser

    assert _missing_bench_extra(_parser().parse_args(["bench", "decode", "--no-peer"])) is None
