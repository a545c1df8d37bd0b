"""benchmarks/ddp_scaling.py on a CPU (gloo, tiny models), so that the script cannot rot: one torchrun job per world
size, each training and sampling; its figures come from GPUs."""

from __future__ import annotations

import json

from conftest import SHARED_DATA
from test_benchmark_smoke import run_benchmark


def test_the_scaling_benchmark_runs_one_torchrun_job_per_world_size(tmp_path):
    out = tmp_path / "ddp.json"
    stdout = run_benchmark("ddp_scaling.py", "--smoke", "--gpus", "1", "2", "--data-root", str(SHARED_DATA),
                           "--out", str(out))
    jobs = json.loads(out.read_text())["jobs"]
    assert [j["world_size"] for j in jobs] == [1, 2]
    for job in jobs:  # every rank count trains every model and samples every schedule
        assert [r["model"] for r in job["train"]] == ["tiny", "tiny_large", "judge_tiny"]
        assert all(r["world_size"] == job["world_size"] and r["tokens_per_s"] > 0 for r in job["train"])
        assert [r["schedule"] for r in job["sweep"]] == ["all-large", "sandwich"]
        assert all(r["samples"] == 8 and r["wall_s"] > 0 for r in job["sweep"])
    assert "N=2" in stdout and "eff." in stdout  # the strong-scaling table
