"""torchrun with 2 gloo processes on the CPU: the training steps, resumes and sweep results of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdlm_sched.cli import main
from mdlm_sched.config_load import load
from mdlm_sched.fileio import read_jsonl
from mdlm_sched.train import train

from conftest import REPO
from test_analysis import sweep_yaml

# Weights of a 2-rank run against one process's: measured at most 3.5e-6 apart after 6 steps (float32 sums
# in another order, which Adam amplifies where gradients are tiny). Without the gradient all-reduce (each
# rank stepping on its half) they were 3e-3 apart after 2 steps, 150 times this bound.
WEIGHT_ATOL = 2e-5
# Logged loss and grad norm: measured at most 1.2e-7 apart (relative). Rank 0's loss instead of the mean
# over the ranks was 1e-3 off, a gradient without the all-reduce 30% off in norm, and a factor of 2 in the
# loss scaling is 100%. The grad norm is what catches a wrong gradient scale: Adam and clipping make the
# weights nearly blind to it.
LOG_RTOL = 1e-5


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` on this checkout, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@contextmanager
def one_thread() -> Iterator[None]:
    """One thread in this process too, as in the children: the same float32 kernels, summing in the same order."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_args(out: Path, cache: Path, steps: int, shared_data: Path) -> list[str]:
    """The tiny MDLM without dropout; a global batch of 8 = 4 micro-batches of 2 (one process) or 2 per rank."""
    return ["model=tiny", "data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={shared_data}",
            f"data.cache_dir={cache}", "data.seq_len=64", "model.dropout=0", f"train.out_dir={out}",
            f"train.steps={steps}", "train.batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
            "train.log_every=1", "train.val_every=2", "train.ckpt_every=2", "train.keep_checkpoints=3",
            "train.val_batches=1"]


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    """`single`: 6 steps in one process. `chain`: steps 1-2 on 2 ranks, 3-4 in one process, 5-6 on 2 ranks."""
    root = tmp_path_factory.mktemp("ddp_train")
    cache, single, chain = root / "cache", root / "single", root / "chain"
    # From an empty data cache: rank 0 tokenises and writes it, rank 1 then reads it.
    proc = torchrun("-m", "mdlm_sched", "train", "--no-progress", *train_args(chain, cache, 2, shared_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained mdlm to step 2") == 1  # rank 0 reports for both
    with one_thread():
        train(load(train_args(single, cache, 6, shared_data)), progress=False)
        train(load(train_args(chain, cache, 4, shared_data)), progress=False)
    proc = torchrun("-m", "mdlm_sched", "train", "--no-progress", *train_args(chain, cache, 6, shared_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"single": single, "chain": chain}


def assert_same_log(single: Path, other: Path, steps: range) -> None:
    a = {r["step"]: r for r in train_log(single) if r["kind"] == "train"}
    b = {r["step"]: r for r in train_log(other) if r["kind"] == "train"}
    for step in steps:
        for name in ("loss", "grad_norm", "tokens_seen"):
            assert b[step][name] == pytest.approx(a[step][name], rel=LOG_RTOL), (step, name)


def assert_same_state(single: Path, other: Path, step: int) -> None:
    for stem in ("model", "ema"):
        a = load_file(single / "checkpoints" / f"step-{step:08d}" / f"{stem}.safetensors")
        b = load_file(other / "checkpoints" / f"step-{step:08d}" / f"{stem}.safetensors")
        assert a.keys() == b.keys()  # the plain model's names: no DDP "module." prefix
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=WEIGHT_ATOL, msg=f"{stem} {key} at {step}")


def test_two_ranks_take_the_single_process_steps(runs):
    assert_same_log(runs["single"], runs["chain"], range(1, 3))
    assert_same_state(runs["single"], runs["chain"], 2)
    meta = json.loads((runs["chain"] / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert meta["world_size"] == 2
    vals = {r["step"]: r["loss"] for r in train_log(runs["single"]) if r["kind"] == "val"}
    chain_vals = {r["step"]: r["loss"] for r in train_log(runs["chain"]) if r["kind"] == "val"}
    assert chain_vals[2] == pytest.approx(vals[2], rel=LOG_RTOL)  # validated once, by rank 0, on the same weights


def test_resume_with_another_number_of_ranks(runs):
    events = [(r["step"], r["kind"], r["world_size"]) for r in train_log(runs["chain"]) if "world_size" in r]
    assert events == [(0, "start", 2), (2, "resume", 1), (4, "resume", 2)]
    assert_same_log(runs["single"], runs["chain"], range(1, 7))
    assert_same_state(runs["single"], runs["chain"], 4)  # one process resumed the 2-rank run
    assert_same_state(runs["single"], runs["chain"], 6)  # 2 ranks resumed the one-process run
    assert len([r for r in train_log(runs["chain"]) if r["kind"] == "val" and r["step"] == 6]) == 1


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, shared_data):
    args = train_args(tmp_path / "run", tmp_path / "cache", 2, shared_data)
    proc = torchrun("-m", "mdlm_sched", "train", "--no-progress", *args, "train.batch_size=6")
    assert proc.returncode != 0
    assert ("mdlm-sched: error: train.batch_size=6 does not split into 2 ranks x train.micro_batch_size=2; make "
            "train.batch_size a multiple of 4 or change train.micro_batch_size\n") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_sharded_sweep_equals_the_single_process_sweep(trained_tiny, tmp_path):
    # 5 samples in sampler batches of 2 (2, 2, 1: rank 0 runs batches 0 and 2) and judge batches of 2.
    settings = dict(num_samples="5", judge_batch_size="2")
    single = sweep_yaml(tmp_path / "single.yaml", trained_tiny, tmp_path / "single",
                        "  p: {schedules: [all-large, sandwich]}", **settings)
    with one_thread():
        assert main(["sweep", "--no-progress", str(single)]) == 0
    # all-small's sampling fails on rank 1 only: both ranks must record the failure and go on together.
    sharded = sweep_yaml(tmp_path / "sharded.yaml", trained_tiny, tmp_path / "sharded",
                         "  p: {schedules: [all-large, all-small, sandwich]}", **settings)
    proc = torchrun(str(REPO / "tests" / "sweep_failing_rank.py"), str(sharded), "all-small")
    assert proc.returncode != 0 and "1 points failed" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("sweep: 3 points run") == 0 and proc.stdout.count("sweep: 2 points run") == 1
    failures = read_jsonl(tmp_path / "sharded" / "failures.jsonl")
    assert [f["label"] for f in failures] == ["all-small"] and "rank 1 only" in failures[0]["error"]

    expected = {r["key"]: r for r in read_jsonl(tmp_path / "single" / "results.jsonl") if r["kind"] != "timing"}
    got = {r["key"]: r for r in read_jsonl(tmp_path / "sharded" / "results.jsonl") if r["kind"] != "timing"}
    assert list(got) == list(expected) and len(got) == 3  # the reference row and two points, in the same order
    for key, record in got.items():
        assert record["provenance"]["hardware"]["world_size"] == 2
        assert expected[key]["provenance"]["hardware"]["world_size"] == 1
        # Exactly equal, not close: every sampler batch and judge batch is the same computation as in one process
        # (same generator, same rows, same kernels) and rank 0 adds the float64 NLLs up in the same order.
        ignore = {"wall_s", "batch_wall_s", "judge_s", "provenance"}
        assert {k: v for k, v in record.items() if k not in ignore} == \
            {k: v for k, v in expected[key].items() if k not in ignore}, key
    for path in (tmp_path / "single" / "samples").iterdir():
        assert (tmp_path / "sharded" / "samples" / path.name).read_text() == path.read_text()
