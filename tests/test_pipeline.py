"""`mdlm-sched pipeline`: the quickstart experiment, shortened, end to end; resume; the guards; the lr schedule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mdlm_sched.artifacts import SweepDir
from mdlm_sched.cli import main
from mdlm_sched.config import TrainConfig
from mdlm_sched.errors import UserError
from mdlm_sched.fileio import read_jsonl
from mdlm_sched.pipeline import load_experiment
from mdlm_sched.summary import best_placement
from mdlm_sched.train import learning_rate

from conftest import REPO

QUICKSTART = REPO / "configs" / "experiment" / "quickstart.yaml"


# The latent cache refreshed at every step draws the exact sampler's tokens: a variant whose comparison is known.
EXACT_CACHE = {"r1": {"settings": {"latent_cache": True, "latent_refresh_every": 1},
                      "groups": {"cached": {"schedules": ["all-large", "late-small"]}}}}


def short_quickstart(tmp_path: Path, shared_data: Path, *train_extra: str) -> list[str]:
    """The quickstart's words, cut to seconds: 4 training steps, T = 8, 2 samples a point, one fraction; and a
    latent-cache variant of two schedules."""
    cache = tmp_path / "cache"
    overlay = tmp_path / "short.yaml"
    quickstart = OmegaConf.to_container(OmegaConf.load(QUICKSTART), resolve=False)  # ${data_root} stays as is
    train_common = [*quickstart["train_common"], "train.steps=4", "train.val_every=4",
                    "train.ckpt_every=4", "train.val_batches=1", "data.max_docs=200", f"data.cache_dir={cache}",
                    *train_extra]
    OmegaConf.save(OmegaConf.create({"train_common": train_common, "variants": EXACT_CACHE}), overlay)
    return [str(QUICKSTART), str(overlay), f"data_root={shared_data}", f"out_dir={tmp_path / 'qs'}",
            "analysis.steps=8", "analysis.grid=3", "analysis.num_blocks=4", "analysis.trajectory_samples=2",
            "analysis.batch_size=4", f"analysis.cache_dir={cache}", "sweep.step_counts=[8]", "sweep.num_samples=2",
            "sweep.batch_size=2", "sweep.reference.num_samples=4", f"sweep.cache_dir={cache}",
            "fraction_curve.fractions=[0.5]", "fraction_curve.num_samples=2", "optimise.bins=4"]


def test_quickstart_pipeline_end_to_end_then_resume(tmp_path, shared_data, capsys) -> None:
    words = short_quickstart(tmp_path, shared_data)
    assert main(["pipeline", "--no-progress", *words]) == 0
    out = tmp_path / "qs"
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["train/small", "train/large", "train/judge", "analysis", "sweep", "variant/r1",
                                     "report"]
    small = state["training"]["small"]
    assert small["steps"] == 4 and small["tokens_seen"] == 4 * 8 * 128
    assert small["passes"] == pytest.approx(small["tokens_seen"] / small["train_tokens"])
    assert small["val"]["owt"]["last_step"] == 4 and small["val"]["owt"]["last"] > 1

    records = read_jsonl(out / "sweep" / "results.jsonl")
    points = [r for r in records if r["kind"] == "point"]
    assert [r["kind"] for r in records].count("reference") == 1
    assert len(points) == 6 * 2 + 2 + 1  # the six placements and the optimised schedule x 2 seeds, the curve's one
    optimised = [p for p in points if p["groups"] == ["optimised"]]
    planned = json.loads((out / "optimise" / "optimise.json").read_text())["schedules"][0]
    assert [p["label"] for p in optimised] == ["optimised-0.25"] * 2
    assert optimised[0]["segments"] == planned["segments"] and optimised[0]["flops"]["saving_blocks_only"] >= 0.25
    calibrated = json.loads((out / "calibrated" / "optimise.json").read_text())
    assert calibrated["cost_model"]["calibrated_on"] >= 5 and len(calibrated["schedules"]) == 2
    choice = best_placement(SweepDir(out / "sweep").read().points, "placements")
    best, candidates = choice["placement"], choice["gen_ppl"]
    assert choice["steps"] == 8 and set(candidates) == {"early-small", "late-small", "sandwich", "small-in-the-middle"}
    assert candidates[best] == min(candidates.values()) and choice["runner_up"] in candidates
    assert choice["separated"] == (choice["ratio_high"] < 1)  # the stated rule: the paired CI excludes 1
    assert points[-1]["label"] == f"{best}@0.5" and points[-1]["groups"] == ["fraction"]
    assert state["fraction_curve"]["placement"] == best

    # The variant: its two schedules again through the latent cache, paired with the sweep's samples.
    compare = json.loads((out / "variants" / "r1" / "compare" / "compare.json").read_text())
    assert compare["differing"] == ["latent_cache", "latent_refresh_every"]  # (the quickstart has one reference)
    assert [r["label"] for r in compare["rows"]] == ["all-large", "late-small"]
    for row in compare["rows"]:
        assert row["pairs"] == 4 and row["paired_seeds"] == [0, 1]
        assert row["ppl_ratio"] == row["ppl_ratio_low"] == row["ppl_ratio_high"] == pytest.approx(1, abs=1e-12)
        assert row["flops_ratio_full"] > 1  # refreshing every step recomputes everything, and the cache's own work
        # Against the exact all-large, the cached schedule stands where the exact one does (the same tokens).
        assert row["against_a_heavy"]["b"] == row["against_a_heavy"]["a"] and row["against_a_heavy"]["a"]["pairs"] == 4
        assert row["seconds_per_sample"]["a"] > 0 and row["seconds_per_sample"]["b"] > 0
    heavy, late = (r["against_a_heavy"]["b"] for r in compare["rows"])
    assert heavy["ppl_ratio"] == 1 and late["ppl_ratio"] != 1 and late["ppl_ratio_low"] < late["ppl_ratio_high"]
    variant = read_jsonl(out / "variants" / "r1" / "sweep" / "results.jsonl")
    assert [r["kind"] for r in variant].count("point") == 4

    report = (out / "report" / "report.md").read_text()
    for heading in ("## Experiment", "### Training", "## Per-step analysis", "### Fraction curve",
                    "## Schedule optimiser", "## Sampler settings compared", "## Quality against sampling time",
                    "## Against the paper"):
        assert heading in report
    assert (out / "report" / "quality_time_compared.png").is_file() and "| r1 | late-small T=" in report
    assert "passes over" in report and "times fewer" in report
    assert (out / "report" / "experiment.json").is_file()
    assert len(list((out / "report").glob("*.png"))) == len(list((out / "report").glob("*.pdf"))) >= 4

    # The same command again: every stage is found done, nothing is trained, sampled or analysed twice.
    def trained_steps() -> list[int]:
        return [r["step"] for r in read_jsonl(out / "train" / "large" / "log.jsonl") if r["kind"] == "train"]

    lines, steps_logged = (out / "sweep" / "results.jsonl").read_text(), trained_steps()
    variant_lines = (out / "variants" / "r1" / "sweep" / "results.jsonl").read_text()
    analysis = (out / "analysis" / "per_step.json").read_text()
    capsys.readouterr()
    assert main(["pipeline", "--no-progress", *words]) == 0
    said = capsys.readouterr().out
    assert "small (mdlm, 2 x 64) already trained to step 4" in said and "training to step" not in said
    assert trained_steps() == steps_logged
    assert (out / "sweep" / "results.jsonl").read_text() == lines
    assert (out / "variants" / "r1" / "sweep" / "results.jsonl").read_text() == variant_lines
    assert (out / "analysis" / "per_step.json").read_text() == analysis
    rerun = json.loads((out / "pipeline.json").read_text())["stages"]
    assert rerun["train/small"] == state["stages"]["train/small"]
    # Each point counted once, also those the fraction curve's group plans again.
    assert state["stages"]["sweep"]["points_done"] == rerun["sweep"]["points_done"] == len(points)

    # Training on: the old analysis is refused rather than reported beside models it was not made from.
    capsys.readouterr()
    assert main(["pipeline", "--no-progress", *short_quickstart(tmp_path, shared_data, "train.steps=5")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the export's progress bars)
    assert last.startswith("mdlm-sched: error:") and "was made from models at steps" in last
    # The training summary is written once training ends, before a later stage can stop the run.
    assert json.loads((out / "pipeline.json").read_text())["training"]["small"]["steps"] == 5


@pytest.mark.parametrize("extra, message", [
    ({"models": {"small": ["model=tiny"]}}, "give at least two"),
    ({"judge": ["model=tiny"]}, "expected gpt2"),
    ({"fraction_curve": {"among": "nothing"}}, "fraction_curve.among"),
    ({"fraction_curve": {"fractions": [1.0]}}, "must lie in (0, 1)"),
    # The analysis settings and every schedule are checked against the configured models before training:
    ({"analysis": {"grid": 0}}, "grid=0 must be in [1, steps=100]"),
    ({"analysis": {"trajectory_samples": -1}}, "trajectory_samples=-1 must be >= 0"),
    ({"analysis": {"shade": ["sandwitch"]}}, "'sandwitch' is not a preset"),
    ({"sweep": {"groups": {"placements": {"schedules": ["L50,X50"]}}}}, "'X' names no model"),
    ({"sweep": {"groups": {"placements": {"schedules": ["L50,H40"]}}}}, "add up to 90 steps but steps=100"),
    ({"optimise": {"savings": [0.9]}}, "no schedule of these models saves 90.0%"),
    ({"optimise": {"tolerances": [-0.1]}}, "tolerance=-0.1 must be >= 0"),
    ({"optimise": {"bins": 101}}, "bins=101 exceeds the analysis's steps=100"),
    ({"optimise": {"group": "placements"}}, "is a group of the sweep already"),
    ({"optimise": {"seeds": []}}, "optimise.seeds is empty"),
    ({"optimise": {"num_samples": 0}}, "optimise.num_samples=0 must be in [1,"),
    ({"fraction_curve": {"seeds": [-1]}}, "fraction_curve.seeds entry=-1 must be in [0,"),
    # A variant may change only sampler settings that keep its samples paired with the sweep's, to valid values:
    ({"variants": {"v": {"settings": {"t_min": 0.0}, "groups": {"g": {"schedules": ["all-large"]}}}}},
     "not t_min: the variant's samples must pair"),
    ({"variants": {"v": {"settings": {}, "groups": {"g": {"schedules": ["all-large"]}}}}}, "must replace one or more"),
    ({"variants": {"v": {"settings": {"latent_refresh_share": 2.0}, "groups": {"g": {"schedules": ["all-large"]}}}}},
     "latent_refresh_share=2.0 must be in [0, 1]"),
    ({"variants": {"v": {"settings": {"top_p": "abc"}, "groups": {"g": {"schedules": ["all-large"]}}}}},
     "bad value for 'top_p'"),  # typed as in the sweep's own section, not passed through raw
    ({"variants": {"v": {"settings": {"top_p": 0.9}}}}, "variants.v.groups is empty"),
    ({"variants": {"v": {"settings": {"top_p": 0.9}, "groups": {"g": {"schedules": ["late-smal"]}}}}},
     "'late-smal' is not a preset"),
])
def test_experiment_errors_come_before_any_work(tmp_path, shared_data, extra, message) -> None:
    overlay = tmp_path / "overlay.yaml"  # a file's mapping replaces the one before it (models: a single one)
    OmegaConf.save(OmegaConf.create(extra), overlay)
    with pytest.raises(UserError, match=re.escape(message)):
        load_experiment([str(QUICKSTART), str(overlay), f"data_root={shared_data}", f"out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("experiment", sorted((REPO / "configs" / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_experiment_resolves(tmp_path, shared_data, experiment) -> None:
    # Every stage's settings and schedules checked against the configured models (the GPU ones moved to the CPU).
    plan = load_experiment([str(experiment), f"data_root={shared_data}", f"out_dir={tmp_path / 'out'}",
                            "runtime.device=cpu"])
    assert len(plan.runs) >= 3 and plan.sweep.groups
    for name, variant in plan.variants.items():
        assert Path(variant.out_dir) == tmp_path / "out" / "variants" / name / "sweep"


@pytest.mark.parametrize("overlay", sorted((REPO / "configs" / "experiment").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_committed_overlay_resolves_on_its_base(tmp_path, shared_data, overlay) -> None:
    # configs/experiment/NAME/X.yaml is laid over configs/experiment/NAME.yaml
    base = overlay.parent.with_suffix(".yaml")
    plan = load_experiment([str(base), str(overlay), f"data_root={shared_data}", f"out_dir={tmp_path / 'out'}",
                            "runtime.device=cpu"])
    assert plan.sweep.groups and all(variant.settings for variant in plan.experiment.variants.values())


def test_lr_schedules() -> None:
    constant = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert [learning_rate(constant, s) for s in (0, 9, 50, 99)] == [0.1, 1.0, 1.0, 1.0]
    cosine = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine", lr_final=0.1)
    assert learning_rate(cosine, 9) == pytest.approx(1.0) and learning_rate(cosine, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 99) == pytest.approx(0.1)
    assert learning_rate(cosine, 10 + 89 // 2) == pytest.approx(0.55, abs=0.01)  # half-way down
    values = [learning_rate(cosine, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
