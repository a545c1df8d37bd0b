"""Per-step analysis, sweeps and reports on tiny trained models: end to end, resume after SIGKILL, failures."""

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

from analysis.plots import _dodged
from analysis.sweep_section import sweep_section
from mdlm_sched.artifacts import AnalysisDir, ReportDir, SweepDir
from mdlm_sched.cli import main
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.errors import ConfigError, DataError, ScheduleError
from mdlm_sched.fileio import append_jsonl, read_jsonl
from mdlm_sched.flops import forward_flops
from mdlm_sched.modelset import open_models
from mdlm_sched.per_step import _evaluate_states, _UnitSums, analyze, kl_divergence
from mdlm_sched.sampling_config import AnalysisConfig, load_sweep
from mdlm_sched.schedule import coarse_segment_specs, grid_steps
from mdlm_sched.summary import pareto_front
from mdlm_sched.sweep import plan, run_sweep

CPU = RuntimeConfig(device="cpu")

from conftest import REPO, SHARED_DATA


def sweep_yaml(path: Path, trained: dict[str, Path], out: Path, groups: str, **extra: str) -> Path:
    """A sweep file over the tiny trained models: T = 16, 3 samples in batches of 2 (the last one short)."""
    fields = {"models": f"{{small: {trained['small']}, large: {trained['large']}}}", "judge": str(trained["judge"]),
              "step_counts": "[16]", "seeds": "[0]", "seq_len": "64", "num_samples": "3", "batch_size": "2",
              "judge_batch_size": "4",
              "reference": f"{{sources: {{owt: {SHARED_DATA / 'owt_val.jsonl.xz'}}}, num_samples: 4}}",
              "cache_dir": str(trained["cache"]), "out_dir": str(out), "runtime": "{device: cpu}", **extra}
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()) + "groups:\n" + groups + "\n")
    return path


# --------------------------------------------------------------------------------------------- units


def test_grid_steps_and_coarse_segments():
    assert grid_steps(1000, 5) == [0, 250, 500, 749, 999]
    assert grid_steps(8, 8) == list(range(8))
    with pytest.raises(ConfigError, match="grid=9"):
        grid_steps(8, 9)
    specs = coarse_segment_specs(4, 1000)
    assert len(specs) == 16 and len({s for _, s in specs}) == 16
    assert dict(specs)["LHHL"] == "L250,H500,L250" and dict(specs)["HHHH"] == "H1000"
    for label, spec in coarse_segment_specs(3, 10):  # uneven cut: 3, 4, 3 steps
        assert sum(int(part[1:]) for part in spec.split(",")) == 10
    with pytest.raises(ScheduleError):
        coarse_segment_specs(0, 10)


def test_kl_in_float64_against_a_direct_sum():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen, dtype=torch.float64).log_softmax(-1)
    b = torch.randn(5, 7, generator=gen, dtype=torch.float64).log_softmax(-1)
    direct = [sum(float(a[i, v].exp() * (a[i, v] - b[i, v])) for v in range(7)) for i in range(5)]
    assert kl_divergence(a, b).tolist() == pytest.approx(direct, rel=1e-12)
    assert kl_divergence(a, a).tolist() == [0.0] * 5
    a[:, 3], b[:, 3] = float("-inf"), float("-inf")  # the [MASK] column: 0 log 0 counts as 0, not nan
    assert torch.isfinite(kl_divergence(a.log_softmax(-1), b.log_softmax(-1))).all()


def test_schedules_of_nearly_equal_flops_are_drawn_side_by_side():
    # Four placements of one light share (FLOPs apart by 1e-4), and two schedules far from them.
    xs = [1.0, 0.7777, 0.11, 0.7776, 0.7779, 0.7775]
    got = _dodged(xs, 0.03)
    assert got[0] == 1.0 and got[2] == 0.11  # alone at their x
    cluster = sorted((got[i], xs[i]) for i in (1, 3, 4, 5))
    assert [x for _, x in cluster] == sorted(xs[i] for i in (1, 3, 4, 5))  # the true order is kept
    np.testing.assert_allclose(np.diff([g for g, _ in cluster]), 0.03)
    assert abs(np.mean([g for g, _ in cluster]) - np.mean([xs[i] for i in (1, 3, 4, 5)])) < 1e-12


def test_pareto_front_and_torn_results_line(tmp_path):
    assert pareto_front([(1.0, 10.0, "a"), (0.8, 11.0, "b"), (0.9, 12.0, "c"), (0.5, 20.0, "d")]) == ["d", "b", "a"]
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"key": "a"})
    with path.open("a") as fh:
        fh.write('{"key": "b", "trunc')  # a write cut short by a kill
    assert read_jsonl(path) == [{"key": "a"}]
    append_jsonl(path, {"key": "c"})
    assert read_jsonl(path) == [{"key": "a"}, {"key": "c"}] and path.read_text().endswith("}\n")
    path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')  # damage inside the file is not skipped silently
    with pytest.raises(DataError, match="results.jsonl:2 is not a JSON line"):
        read_jsonl(path)


def test_sweep_plan_dedups_points_and_rejects_bad_input(trained_tiny, tmp_path):
    groups = ("  placements: {schedules: [all-large, sandwich, 'L4,H12']}\n"
              "  fraction: {placements: [sandwich], fractions: [0.25, 0.5], seeds: [0, 1]}\n"
              "  exhaustive: {segments: 2}")
    cfg = load_sweep([str(sweep_yaml(tmp_path / "s.yaml", trained_tiny, tmp_path / "out", groups))])
    model_set = open_models(cfg.models, CPU)
    points = plan(cfg, model_set.light_to_heavy)
    keys = [p.key for p in points]
    assert len(keys) == len(set(keys))
    by_segments = {(p.schedule.segments_str(), p.seed): p for p in points}
    # sandwich (placements) and sandwich@0.25 (fraction, seed 0) are one point; all-large is exhaustive's HH
    assert by_segments[("small:2,large:12,small:2", 0)].groups == ["placements", "fraction"]
    assert by_segments[("large:16", 0)].groups == ["placements", "exhaustive"]
    assert len(points) == 3 + 3 + 3  # placements; sandwich@0.25 seed 1, sandwich@0.5 seeds 0 and 1; HL, LH, LL
    with pytest.raises(ConfigError, match="unknown config key 'judge_batch'"):
        load_sweep([str(tmp_path / "s.yaml"), "judge_batch=3"])
    with pytest.raises(ConfigError, match="groups.g has no schedules"):
        load_sweep([str(tmp_path / "s.yaml"), "groups={g: {seeds: [1]}}"])
    bad = load_sweep([str(tmp_path / "s.yaml"), "groups={g: {schedules: [middle-small]}}"])
    with pytest.raises(ScheduleError, match="middle-small"):
        plan(bad, model_set.light_to_heavy)


def test_the_kls_and_ces_of_a_batch_of_states_against_the_models_own_logits(trained_tiny):
    # Two different models: KL(large || small) and KL(small || large) differ, so a swapped direction shows.
    model_set = open_models({"small": str(trained_tiny["small"]), "large": str(trained_tiny["large"])}, CPU,
                            seq_len=64)
    mask_id = model_set.config.mask_token_id
    targets = torch.randint(0, mask_id, (3, 64), generator=torch.Generator().manual_seed(0))
    masked = torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) < 0.4
    x_t = targets.masked_fill(masked, mask_id)
    sums = _UnitSums()
    with torch.no_grad():
        _evaluate_states(model_set, x_t, targets, 0.5, "masked", 0, sums)
        logits = {n: m.model(x_t).double() for n, m in model_set.models.items()}  # [B, L, V], the plain forward
    for logit in logits.values():
        logit[..., mask_id] = -torch.inf  # SUBS: [MASK] has zero probability
    dist = {n: torch.distributions.Categorical(logits=v) for n, v in logits.items()}
    for a, b in (("large", "small"), ("small", "large")):
        per_position = torch.distributions.kl_divergence(dist[a], dist[b]) * masked  # [B, L]
        ((totals, counts),) = sums.values["masked", 0, "kl", f"{a}||{b}"]
        assert totals == pytest.approx(per_position.sum(dim=1).numpy(), rel=1e-9)
        assert counts.tolist() == masked.sum(dim=1).tolist()
    for name, d in dist.items():
        ce = -(d.log_prob(targets) * masked).sum(dim=1)
        assert sums.values["masked", 0, "ce", name][0][0] == pytest.approx(ce.numpy(), rel=1e-9)
    ((forward, _),), ((backward, _),) = sums.values["masked", 0, "kl", "large||small"], \
        sums.values["masked", 0, "kl", "small||large"]
    assert np.abs(forward - backward).max() > 1e-6 * forward.max()  # the two directions differ beyond tolerance


def test_identical_models_have_zero_kl_and_gap(trained_tiny, tmp_path):
    model_set = open_models({"a": str(trained_tiny["small"]), "b": str(trained_tiny["small"])}, CPU, seq_len=64)
    settings = AnalysisConfig(steps=16, grid=4, data=str(SHARED_DATA / "owt_val.jsonl.xz"), num_blocks=4,
                               trajectory_samples=2, batch_size=2, shade=["sandwich"],
                               cache_dir=str(trained_tiny["cache"]))
    record = analyze(model_set, settings, AnalysisDir(tmp_path), {}, progress=False)
    rows = [line.split(",") for line in (tmp_path / "per_step.csv").read_text().splitlines()[1:]]
    kl = [float(r[5]) for r in rows if r[3] in ("kl", "ce_gap")]
    assert len(kl) == 2 * 4 * 3 and all(v == 0.0 for v in kl)  # 2 sources x 4 steps x (2 KLs + gap)
    assert record["grid_steps"] == [0, 5, 10, 15] and record["shade"][0]["steps"] == [[0, 2], [14, 16]]


def test_a_sweep_with_the_latent_cache_refreshed_every_step_judges_the_exact_samples(trained_tiny, tmp_path):
    results = {}
    for name, extra in (("exact", {}), ("cached", {"latent_cache": "true", "latent_refresh_every": "1"})):
        cfg = sweep_yaml(tmp_path / f"{name}.yaml", trained_tiny, tmp_path / name,
                         "  g: {schedules: [sandwich]}", **extra)
        assert main(["sweep", "--no-progress", str(cfg)]) == 0
        (results[name],) = SweepDir(tmp_path / name).read().points
    exact, cached = results["exact"], results["cached"]
    assert cached.per_sample == exact.per_sample and cached.gen_ppl == exact.gen_ppl  # the same samples
    # FLOPs count what ran: each refresh computes the latents once more for the cache.
    assert exact.flops.blocks_only < cached.flops.blocks_only < 1.05 * exact.flops.blocks_only
    # Across the two folders the samples pair: the cached sweep's gen PPL over the exact one's is exactly 1.
    assert main(["compare", str(tmp_path / "exact"), str(tmp_path / "cached"), "--out", str(tmp_path / "cmp")]) == 0
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compared["differing"] == ["latent_cache", "latent_refresh_every"]
    (row,) = compared["rows"]
    assert row["pairs"] == 3 and row["ppl_ratio"] == row["ppl_ratio_low"] == row["ppl_ratio_high"] == 1.0
    assert row["flops_ratio_full"] > 1.0 and row["label"] == "sandwich"  # the refreshes' extra latent projection
    assert "no difference in gen PPL detectable at ±0.0%" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(ConfigError, match="another latent_cache"):  # one sampler per results folder
        run_sweep(load_sweep([str(tmp_path / "exact.yaml"), f"out_dir={tmp_path / 'cached'}"]), progress=False,
                  echo=lambda _: None)


# ------------------------------------------------------------------------------------------ end to end


def test_end_to_end_analyze_sweep_report(trained_tiny, tmp_path, capsys):
    ana = tmp_path / "analysis"
    code = main(["analyze", "--no-progress", "--model", f"small={trained_tiny['small']}", "--model",
                 f"large={trained_tiny['large']}", "--steps", "32", "--grid", "6", "--data",
                 str(SHARED_DATA / "owt_val.jsonl.xz"), "--num-blocks", "6", "--trajectory-samples", "4",
                 "--batch-size", "3", "--seq-len", "64", "--cache-dir", str(trained_tiny["cache"]), "--out", str(ana)])
    assert code == 0
    meta = json.loads((ana / "per_step.json").read_text())
    rows = (ana / "per_step.csv").read_text().splitlines()
    assert rows[0] == "source,step,t,metric,model,mean,ci_low,ci_high,units,tokens"
    masked_kl = [r.split(",") for r in rows[1:] if r.startswith("masked,") and ",kl,large||small," in r]
    assert len(masked_kl) == 6 and all(float(r[5]) > 0 and 1 <= int(r[8]) <= 6 for r in masked_kl)
    banded = [r for r in masked_kl if int(r[8]) >= 2]  # a band needs two blocks with masked tokens
    assert banded and all(float(r[6]) <= float(r[5]) <= float(r[7]) for r in banded)
    assert all(r[6] == "nan" for r in masked_kl if int(r[8]) < 2)
    assert {p["source"] for p in meta["peaks"]} == {"masked", "trajectory"}
    assert all(p["step_low"] <= p["step_high"] for p in meta["peaks"]) and "bootstrap" in meta["conventions"]
    for axis in ("step", "t"):
        assert (ana / f"per_step_analysis_{axis}.png").stat().st_size > 10_000
        assert (ana / f"per_step_analysis_{axis}.pdf").is_file()

    sweep = tmp_path / "sweep"
    cfg = sweep_yaml(tmp_path / "sweep.yaml", trained_tiny, sweep,
                     "  placements: {schedules: [all-large, all-small, sandwich]}", seeds="[0, 1]", mauve="true",
                     mauve_seeds="[0]", save_features="true")
    assert main(["sweep", "--no-progress", str(cfg)]) == 0
    # MAUVE from the saved judge features equals the MAUVE measured during the sweep (same features, same seed).
    features = np.load(sweep / "features" / "all-large-T16-s0-n3.npy")
    assert features.shape == (3, 64) and features.dtype == np.float32 and np.isfinite(features).all()
    assert np.load(sweep / "features" / "reference.npy").shape == (4, 64)
    assert main(["mauve", "--no-progress", str(sweep), "--seeds", "0"]) == 0
    later = json.loads((sweep / "mauve.json").read_text())
    assert {p.key: later[p.key]["values"] for p in SweepDir(sweep).read().points} == \
        {p.key: p.mauve.values for p in SweepDir(sweep).read().points} and len(later) == 6
    records = read_jsonl(sweep / "results.jsonl")
    points = [r for r in records if r["kind"] == "point"]
    assert [r["kind"] for r in records].count("reference") == 1 and len(points) == 6
    # all-large's first batch, timed again after the last point: the spread wall-clock savings are set against
    assert [(r["kind"], r["key"]) for r in records[-1:]] == [("timing", "large:16|T16|seed0|n3")]
    small, large = (forward_flops(open_models({n: str(trained_tiny[n])}, CPU).config, 64)
                    for n in ("small", "large"))
    for p in points:
        assert p["num_samples"] == 3 and len(p["batch_wall_s"]) == 2  # 3 samples in batches of 2
        assert {rule: len(v) for rule, v in p["per_sample"]["nll"].items()} == \
            {"mdlm": 3, "first-eos": 3, "every-token": 3}
        assert 1 < p["gen_ppl"]["ppl"] < float("inf") and p["gen_ppl"]["token_rule"] == "mdlm"
        assert 0 < p["entropy"]["mean"] <= np.log(64) and p["wall_s"] > 0
        assert p["gen_ppl"]["tokens"] == sum(p["per_sample"]["tokens"]["mdlm"])
        assert p["gen_ppl_rules"]["first-eos"]["tokens"] <= p["gen_ppl"]["tokens"] <= \
            p["gen_ppl_rules"]["every-token"]["tokens"]
        assert 0 <= p["mauve"]["mean"] <= 1 and p["mauve"]["reference_samples"] == 4
        sequences = p["flops"]["sequences_run"]
        blocks = sum(n * (small if m == "small" else large).blocks_only for m, n in sequences.items())
        assert p["flops"]["blocks_only"] == blocks  # FLOPs of the calls made, in the results file
        samples = (sweep / "samples" / f"{p['label']}-T16-s{p['seed']}-n3.jsonl").read_text().splitlines()
        assert len(samples) == 3
    sandwich = next(p for p in points if p["label"] == "sandwich")
    assert sandwich["steps_per_model"] == {"small": 4, "large": 12} and 0 < sandwich["flops"]["saving_full"] < \
        sandwich["flops"]["saving_blocks_only"] < 0.5

    report = tmp_path / "report"
    assert main(["report", str(ana), str(sweep), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()
    for figure in ("sweep_sweep", "per_step_analysis_step", "per_step_analysis_t"):
        assert f"({figure}.png)" in text
        assert (report / f"{figure}.png").stat().st_size > 10_000 and (report / f"{figure}.pdf").is_file()
    assert "| sandwich | small:2,large:12,small:2 | 0.250 |" in text  # its table row
    assert "### All-light against all-heavy" in text and "Reference rows (real validation text" in text
    assert "gen PPL / all-heavy [95% CI]" in text and "MDLM's token rule" in text and "## Against the paper" in text
    summary = json.loads((report / "summary_sweep.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert {k: r["seeds"] for k, r in rows.items()} == {"all-large": 2, "all-small": 2, "sandwich": 2}
    assert rows["sandwich"]["pairs"] == 6 and rows["sandwich"]["ppl_ratio_low"] <= rows["sandwich"]["ppl_ratio"] \
        <= rows["sandwich"]["ppl_ratio_high"]


def test_killed_sweep_resumes_without_repeating_or_losing_points(trained_tiny, tmp_path):
    cfg = sweep_yaml(tmp_path / "sweep.yaml", trained_tiny, tmp_path / "out",
                     "  many: {schedules: [all-large, all-small, sandwich, early-small, late-small, "
                     "small-in-the-middle, alternating], seeds: [0, 1]}", save_samples="false")
    results = tmp_path / "out" / "results.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mdlm_sched", "sweep", "--no-progress", str(cfg)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(read_jsonl(results)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # reference + 3 points
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(results)
    assert 4 <= len(before) < 15, "the kill should land midway through the 14 points"
    kept = results.read_text()

    assert main(["sweep", "--no-progress", str(cfg)]) == 0
    after = read_jsonl(results)
    keys = [r["key"] for r in after if r["kind"] != "timing"]
    assert len(keys) == len(set(keys)) == 15  # the reference and 14 points, each once
    assert results.read_text().startswith(kept.rpartition("\n")[0])  # finished lines untouched
    assert after[: len(before)] == before
    # a third run finds nothing to do (and times nothing again)
    assert main(["sweep", "--no-progress", str(cfg)]) == 0 and read_jsonl(results) == after
    # points drawn under another sampler randomness layout (other samples for the same seeds) are not mixed in
    settings = tmp_path / "out" / "sweep.json"
    saved = json.loads(settings.read_text())
    saved["shared"]["sampler_randomness"] = 1
    settings.write_text(json.dumps(saved))
    assert main(["sweep", "--no-progress", str(cfg)]) == 2 and read_jsonl(results) == after


def test_a_failing_point_keeps_the_others_and_a_rerun_retries_it(trained_tiny, tmp_path, monkeypatch, capsys):
    import mdlm_sched.sweep as sweep_module

    cfg = sweep_yaml(tmp_path / "sweep.yaml", trained_tiny, tmp_path / "out",
                     "  p: {schedules: [all-large, sandwich, all-small]}", save_samples="false")
    real = sweep_module.run_schedule

    def flaky(model_set, schedule, *args, **kwargs):
        if schedule.spec == "sandwich":
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in failure for this test)")
        return real(model_set, schedule, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_schedule", flaky)
    assert main(["sweep", "--no-progress", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "1 points failed" in err and "rerun the same command" in err
    labels = [r["label"] for r in read_jsonl(tmp_path / "out" / "results.jsonl") if r["kind"] == "point"]
    assert labels == ["all-large", "all-small"]
    assert read_jsonl(tmp_path / "out" / "failures.jsonl")[0]["label"] == "sandwich"

    monkeypatch.setattr(sweep_module, "run_schedule", real)
    assert main(["sweep", "--no-progress", str(cfg)]) == 0
    labels = [r["label"] for r in read_jsonl(tmp_path / "out" / "results.jsonl") if r["kind"] == "point"]
    assert labels == ["all-large", "all-small", "sandwich"]
    # another batch size would change every sample: refused rather than mixed into these results
    assert main(["sweep", "--no-progress", str(cfg), "batch_size=3"]) == 2
    assert "another batch_size" in capsys.readouterr().err


def test_the_paper_sweep_preset_loads(monkeypatch):
    monkeypatch.chdir(REPO)  # its reference source is ../shared/data/owt_val.jsonl.xz
    cfg = load_sweep([str(REPO / "configs" / "sweep" / "paper.yaml"), "judge=gpt2-large"])
    assert cfg.judge == "gpt2-large" and cfg.groups["exhaustive"].segments == 4
    assert cfg.groups["placements"].schedules[-1] == "small-in-the-middle"


def test_mauve_from_saved_features_is_read_into_the_points(trained_tiny, tmp_path):
    out = tmp_path / "later"
    cfg = sweep_yaml(tmp_path / "later.yaml", trained_tiny, out, "  g: {schedules: [all-large]}", save_features="true")
    assert main(["sweep", "--no-progress", str(cfg)]) == 0
    assert SweepDir(out).read().points[0].mauve is None
    assert main(["mauve", "--no-progress", str(out), "--seeds", "0", "1"]) == 0
    (point,) = SweepDir(out).read().points
    assert len(point.mauve.values) == 2 and point.mauve.samples == 3 and point.mauve.reference_samples == 4
    lines, _ = sweep_section(out, ReportDir(tmp_path / "report"))
    table = next(line for line in lines if line.startswith("| all-large |"))
    assert f"| {point.mauve.mean:.3f} | 1 × 3 |" in table  # the MAUVE column, beside the sample count
    assert any("each point's 3 samples against 4 reference texts" in line for line in lines)
    (out / "features" / "reference.npy").unlink()
    assert main(["mauve", "--no-progress", str(out)]) == 2  # one line: the features are missing
