"""Training on real OWT text with tiny models: loss falls, checkpoints, exact resume after SIGKILL, guards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from mdlm_sched.config_load import load
from mdlm_sched.errors import CheckpointError, NonFiniteLossError
from mdlm_sched.train import EMA, batch_indices, train, train_step

from conftest import REPO


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def tiny_args(out_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """A CPU-sized MDLM run on owt_tiny: 64-token blocks, 4 sequences a step in 2 micro-batches."""
    return ["model=tiny", "data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"train.out_dir={out_dir}",
            f"data.cache_dir={cache_dir}", "data.seq_len=64", "train.batch_size=4", "train.micro_batch_size=2",
            "train.log_every=5", "train.val_batches=2", *extra]


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mdlm_sched", "train", "--no-progress", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_cli_trains_tiny_mdlm_loss_falls_and_writes_hf_checkpoint(tmp_path, cache_dir) -> None:
    out = tmp_path / "run"
    proc = run_cli(tiny_args(out, cache_dir, "train.steps=60", "train.val_every=30", "train.ckpt_every=30"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "val/owt_heldout perplexity bound" in stdout
    assert "perplexity bound" in stderr  # the periodic validation is logged during training too

    records = [r for r in read_log(out) if r["kind"] == "train"]
    losses = [r["loss"] for r in records]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses  # from ~10.8 (uniform) downwards
    vals = [r for r in read_log(out) if r["kind"] == "val" and r["source"] == "owt_heldout"]
    assert [v["step"] for v in vals] == [30, 60] and vals[1]["loss"] < vals[0]["loss"]

    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.mask_token_id == len(tokenizer) == 50257
    assert model.config.max_position_embeddings == 128 and model.config.tokenizer_hash
    x = torch.full((1, 64), 50257)
    assert torch.isfinite(model(x)).all()

    # The exported model (what sample and analyze load) holds the EMA weights, not the raw ones.
    exported, ckpt = load_file(model_dir / "model.safetensors"), out / "checkpoints" / "step-00000060"
    ema, raw = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "model.safetensors")
    shared = exported.keys() & ema.keys()
    assert len(shared) >= len(ema) - 1  # all but a tied output head, which the export stores once
    assert all(torch.equal(exported[k], ema[k].to(exported[k].dtype)) for k in shared)
    assert any(not torch.equal(exported[k], raw[k].to(exported[k].dtype)) for k in shared)


def test_sigkill_midway_then_resume_matches_uninterrupted_run(tmp_path, cache_dir) -> None:
    common = ["train.steps=24", "train.ckpt_every=8", "train.val_every=12"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_cli(tiny_args(straight, cache_dir, *common))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    proc = run_cli(tiny_args(killed, cache_dir, *common))
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed midway"
    killed_at = latest.read_text().strip()
    assert killed_at < "step-00000024", killed_at

    proc = run_cli(tiny_args(killed, cache_dir, *common))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"resumed from {killed / 'checkpoints'} at step {int(killed_at[5:])}" in stderr

    final = "checkpoints/step-00000024"
    for stem in ("model", "ema"):
        a, b = load_file(straight / final / f"{stem}.safetensors"), load_file(killed / final / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stem, key)
    loss = {r["step"]: r["loss"] for r in read_log(straight) if r["kind"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_log(killed) if r["kind"] == "train"}
    assert resumed == loss  # every logged training loss, before and after the kill


def test_judge_gpt2_trains_and_loads_with_auto_classes(tmp_path, cache_dir) -> None:
    out = tmp_path / "judge"
    cfg = load(tiny_args(out, cache_dir, "model=judge_tiny", "train.steps=30", "train.val_every=30",
                         "train.ckpt_every=30"))
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in read_log(out) if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert set(result.val) == {"owt_heldout"} and result.val["owt_heldout"] < 50257
    judge = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    assert judge.config.model_type == "gpt2" and judge.config.n_positions == 128
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    ids = torch.tensor([tokenizer.encode("The city council met on Tuesday.")])
    assert torch.isfinite(judge(ids).logits).all()


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, cache_dir) -> None:
    out = tmp_path / "diverge"
    # An absurd learning rate sends the weights to ~1e30 after one step; the next loss overflows.
    cfg = load(tiny_args(out, cache_dir, "train.steps=20", "train.lr=1e30", "train.warmup_steps=0",
                         "train.grad_clip=0", "train.ckpt_every=1", "train.log_every=1"))
    with pytest.raises(NonFiniteLossError, match="stopped before the optimizer step"):
        train(cfg, progress=False)
    last_logged = max(r["step"] for r in read_log(out))
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{last_logged:08d}"  # the diverging step left no checkpoint and no log entry
    weights = load_file(out / "checkpoints" / latest / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_another_model_and_a_corrupt_checkpoint(tmp_path, cache_dir) -> None:
    out = tmp_path / "run"
    train(load(tiny_args(out, cache_dir, "train.steps=2", "train.ckpt_every=2")), progress=False)
    with pytest.raises(CheckpointError, match="different 'model'"):
        train(load(tiny_args(out, cache_dir, "train.steps=4", "model.num_hidden_layers=3")), progress=False)
    (out / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(load(tiny_args(out, cache_dir, "train.steps=4")), progress=False)


def test_batch_indices_cover_each_epoch_once() -> None:
    n, batch = 10, 4
    seen = np.concatenate([batch_indices(step, batch, n, seed=3) for step in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a fresh order each epoch
    assert np.array_equal(batch_indices(2, batch, n, seed=3), seen[8:12])
    assert not np.array_equal(batch_indices(0, batch, n, seed=4), seen[:4])


def test_ema_warms_up_its_decay_and_applies_its_weights_only_inside_the_context() -> None:
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, num_updates=0)  # warm-up: decay min(0.99, 1/10) = 0.1
    for shadow, s0 in zip(ema.shadow, start):
        torch.testing.assert_close(shadow, 0.1 * s0 + 0.9 * (s0 + 1), rtol=0, atol=1e-6)
    after_first = [x.clone() for x in ema.shadow]
    ema.update(model, num_updates=10**6)  # past warm-up: the configured 0.99
    for shadow, s1, s0 in zip(ema.shadow, after_first, start):
        torch.testing.assert_close(shadow, 0.99 * s1 + 0.01 * (s0 + 1), rtol=0, atol=1e-6)
    with ema.applied(model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
    assert all(torch.equal(p, s0 + 1) for p, s0 in zip(model.parameters(), start))  # raw weights restored


def _linear_step(scale: float) -> tuple[torch.nn.Module, list[torch.Tensor], float]:
    """One train_step of a linear model whose loss is scaled by `scale`: (model, weights before, loss)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_loss(m: torch.nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
        return m(x).pow(2).mean() * scale

    loss, _ = train_step(model, step_loss, optimizer, (torch.ones(4, 4),), accum=2, device=torch.device("cpu"),
                         amp=None, grad_clip=1.0)
    return model, before, loss


def test_a_non_finite_loss_takes_no_optimizer_step_and_drops_its_gradients() -> None:
    model, before, loss = _linear_step(float("inf"))
    assert loss == float("inf")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    model, before, loss = _linear_step(1.0)  # the same step with a finite loss does move the weights
    assert loss > 0 and any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
