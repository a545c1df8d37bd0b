"""benchmarks/mla_recipe.py on a CPU at tiny sizes, so that the script cannot rot: runs queued one at a time, their
logs collected, and the report's paired comparison against the DiT of the same depth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
        "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.max_seq_len=64", "model.vocab_pad_multiple=1",
        "model.num_hidden_layers=2", "runtime=cpu", "data=owt_tiny", f"data.root={SHARED_DATA}", "data.seq_len=64",
        "train.val_every=2", "train.val_batches=1", "train.micro_batch_size=4", "train.batch_size=4",
        "train.log_every=1"]


def test_mla_recipe_runs_and_reports(tmp_path):
    script = str(REPO / "benchmarks" / "mla_recipe.py")
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, script, "run", "--data-root", str(SHARED_DATA), "--out", str(tmp_path / "r"),
                          "--runs", "dit12:4", "gated12:4", "--parallel", "1", "--collect", str(data),
                          "--override", *TINY],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    launches = json.loads((data / "runs.json").read_text())
    # --parallel 1: the second run started after the first ended, so neither shared the machine.
    assert [launches[k]["launches"][0]["with"] for k in ("dit12-4", "gated12-4")] == [["dit12-4"], ["gated12-4"]]
    assert launches["gated12-4"]["launches"][0]["start"] >= launches["dit12-4"]["launches"][0]["end"]
    tiny_model = [w for w in TINY if w.startswith("model.")] + ["data.seq_len=64"]
    speed = subprocess.run([sys.executable, script, "speed", "--runs", "dit12", "gated12", "--batches", "1", "2",
                            "--steps", "2", "--reps", "1", "--out", str(data / "speed.json"), "--override", *tiny_model],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert speed.returncode == 0, speed.stderr[-2000:]
    report = subprocess.run([sys.executable, script, "report", str(data), "--out", str(tmp_path / "rep"),
                             "--baseline", "gated12"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    gated = summary["gated12-4"]
    assert gated["vs"] == "dit12-4" and gated["delta_ci"][0] <= gated["delta_nats"] <= gated["delta_ci"][1]
    assert "vs" not in summary["dit12-4"]
    # --baseline: each run's paired difference to the baseline of its budget (the DiT's is the gated model's, negated)
    assert list(summary["dit12-4"]["vs_baselines"]) == ["gated12-4"] and "vs_baselines" not in gated
    assert summary["dit12-4"]["vs_baselines"]["gated12-4"]["delta_nats"] == pytest.approx(-gated["delta_nats"])
    assert summary["gated12-4"]["cache"] == 32 + 8 and summary["dit12-4"]["cache"] == 2 * 4 * 16
    compare = subprocess.run([sys.executable, script, "compare", str(data / "gated12-4"), str(data / "dit12-4")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-2000:]
    last = compare.stdout.strip().splitlines()[-1]  # | step | owt gap [CI] |: the report's paired difference again
    assert last.startswith("| 4 |") and f"{gated['delta_nats']:+.3f}" in last
    missing = subprocess.run([sys.executable, script, "compare", str(data / "nothere-4"), str(data / "dit12-4")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "nothere-4" in missing.stderr
    for bad, word in ((["--runs", "nothere"], "nothere"), (["--runs", "dit12", "--steps", "0"], "--steps"),
                      (["--runs", "dit12", "--out", str(data / "speed.json" / "x.json")], "--out")):
        refused = subprocess.run([sys.executable, script, "speed", "--out", str(tmp_path / "s.json"), *bad],
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and word in refused.stderr
    assert summary["gated12-4"]["blocks"] >= 1 and (tmp_path / "rep" / "validation_curves.png").is_file()
    # speed.json's timings of each shape, and the bound at the middle validation, in the table and the summary
    assert set(summary["gated12-4"]["ms_per_step"]) == {"1", "2"} and summary["dit12-4"]["ms_per_step"]["2"] > 0
    assert summary["gated12-4"]["middle"]["step"] == 2  # validations at steps 2 and 4: the first is the middle
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "sampling ms / step, B = 2" in table and "eager" in table
    assert (tmp_path / "rep" / "bound_vs_cache.png").is_file()


def test_the_attention_ablation_shapes_differ_in_attention_alone(tmp_path):
    # Issue 31's runs, at full size: the same gated block, DiT final layer and 12 query heads; the caches pair up.
    import importlib.util

    from mdlm_sched.config_load import load
    from mdlm_sched.models import denoiser_config

    spec = importlib.util.spec_from_file_location("mla_recipe", REPO / "benchmarks" / "mla_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    configs = {name: denoiser_config(load(recipe.run_words(str(SHARED_DATA), tmp_path, name, 10, ["runtime=cpu"])),
                                     50257, 50256, "gpt2")
               for name in ("dit12", "gqa4", "gqa2", "mqa", "mla512", "mla256", "mla128")}
    assert {n: c.kv_cache_elements for n, c in configs.items()} == {
        "dit12": 1536, "gqa4": 512, "gqa2": 256, "mqa": 128, "mla512": 512, "mla256": 256, "mla128": 128}
    for c in configs.values():
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.ada_ln, c.head_bias) == \
            (12, 768, 12, True, True)
    assert {c.attention for c in configs.values()} == {"mha", "mla"}
