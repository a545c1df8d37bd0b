"""benchmarks/ddp_scaling.py on a CPU (gloo, tiny models), so that the script cannot rot: its torchrun job trains and
samples on two ranks; its figures come from GPUs."""

from __future__ import annotations

import json

from conftest import SHARED_DATA
from test_benchmark_smoke import run_benchmark


def test_the_scaling_benchmark_runs_its_torchrun_job(tmp_path):
    # One job of two ranks (a second world size would double the test's time and test nothing more of the script).
    out = tmp_path / "ddp.json"
    stdout = run_benchmark("ddp_scaling.py", "--smoke", "--gpus", "2", "--data-root", str(SHARED_DATA),
                           "--out", str(out))
    (job,) = json.loads(out.read_text())["jobs"]
    assert job["world_size"] == 2
    assert [r["model"] for r in job["train"]] == ["tiny", "tiny_large", "judge_tiny"]  # trains every model
    assert all(r["world_size"] == 2 and r["tokens_per_s"] > 0 for r in job["train"])
    assert [r["schedule"] for r in job["sweep"]] == ["all-large", "sandwich"]  # and samples every schedule
    assert all(r["samples"] == 8 and r["wall_s"] > 0 for r in job["sweep"])
    assert "N=2" in stdout and "eff." in stdout  # the strong-scaling table
