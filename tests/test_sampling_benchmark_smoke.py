"""benchmarks/sampling.py on a CPU at tiny sizes (every part; the profile of CPU operators), so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_the_sampling_benchmark_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--smoke", "--parts", "network",
                          "profile", "steps", "full", "latency", "--profile-batch", "1", "--batches", "1", "2",
                          "--reps", "1", "--short-steps", "4",
                          "--samples", "4", "--batch", "2", "--cache-samples", "2", "--full-steps", "8",
                          "--latency-batches", "1", "--latency-reps", "1", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["model"], r["batch"]) for r in result["network"]] == [("small", 1), ("small", 2), ("large", 1),
                                                                      ("large", 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["network"])
    profile = result["profile"]  # batch 1 <= the 16 graph rows: the graphed call's profile too
    assert [profile["path"], profile["graphed"]["path"]] == ["plain", "graphs<=16"]
    assert all(p["gpu_ops_per_call"] > 0 and p["kernel_ms_per_call"] > 0 and abs(sum(p["shares"].values()) - 1) < 1e-3
               for p in (profile, profile["graphed"]))
    steps = {r["batch"]: r for r in result["steps"]}
    assert set(steps) == {1, 2} and all(not r["cache"] and r["cache_stats"]["skipped"] == 0 for r in steps.values())
    full = {(r["schedule"], r["cache"], r["samples"]): r for r in result["full"]}  # then a cache-off run and its pair
    assert set(full) == {("all-large", True, 4), ("sandwich", True, 4), ("all-large", False, 2), ("all-large", True, 2)}
    assert full[("sandwich", True, 4)]["flops_blocks_only"] < full[("all-large", True, 4)]["flops_blocks_only"]
    assert full[("all-large", False, 2)]["flops_blocks_only"] >= full[("all-large", True, 2)]["flops_blocks_only"]
    assert all(0 <= r["outside_network_share"] < 1 for r in [*result["full"], *result["latency"]])
    variants = {(r["cuda_graph_rows"], r["cast_weights"], r["fold_modulation"]) for r in result["latency"]}
    assert variants == {(0, False, False), (16, False, False), (16, True, False), (16, True, True)}
    assert all(r["tokens_equal_to_no_graphs"] == "1/1" for r in result["latency"] if r["cuda_graph_rows"])
