"""The training and attention benchmarks on a CPU at tiny sizes, so that the scripts cannot rot (their
figures come from the GPU; here only that every part runs and reports what it measured)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, SHARED_DATA


def run_benchmark(script: str, *args: str) -> str:
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_the_training_throughput_benchmark_runs_the_trainer_and_prices_its_flops(tmp_path):
    out = tmp_path / "bench.json"
    run_benchmark("train_throughput.py", "--models", "tiny", "--batches", "2", "--accum", "2", "--seq-len", "64",
                  "--steps", "8", "--log-every", "2", "--runtime", "cpu", "--data-root", str(SHARED_DATA),
                  "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model"], row["micro_batch"], row["accum"], row["seq_len"]) == ("tiny", 2, 2, 64)
    assert row["loss_kernel"] == "torch"  # the default; the fused kernels need a GPU
    assert row["compile_mode"] is None  # the cpu runtime does not compile
    assert abs(row["mfu_executed_spec"] - row["mfu_executed"] * 776 / 989) < 2e-4  # the same FLOPs, against the spec
    assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_intervals"]) == 2  # 4 logged intervals, first 2 dropped
    # the head at about half the positions: executed FLOPs lie between blocks only and the head everywhere
    assert row["fwd_gflop_per_token_blocks"] < row["fwd_gflop_per_token_executed"]
    assert row["mfu_blocks_only"] <= row["mfu_executed"] <= row["mfu_head_everywhere"]
    assert 0.4 < row["masked_fraction"] < 0.6


def test_the_training_profile_benchmark_groups_the_step_by_family():
    stdout = run_benchmark("train_profile.py", "--model", "tiny", "--batch", "2", "--seq-len", "64", "--runtime",
                           "cpu", "--data-root", str(SHARED_DATA), "--top", "3")
    assert "wall-clock per step" in stdout and "kernel time per step" in stdout
    assert "optimizer / EMA / clipping" in stdout  # the fused AdamW and the EMA are found by name
    assert len(stdout.split("longest kernels (ms per step):")[1].strip().splitlines()) == 3


def test_the_attention_backend_benchmark_times_the_unequal_head_widths():
    stdout = run_benchmark("attention_backends.py", "--device", "cpu", "--batch", "1", "--heads", "2", "--seq-len",
                           "32", "--reps", "2")
    rows = [line.split() for line in stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("MATH", "as"), ("MATH", "padded")]
    assert all(float(r[-2]) > 0 for r in rows)  # ms per forward + backward
