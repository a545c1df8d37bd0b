"""The schedule optimiser on synthetic per-step costs: planted optima, exact budgets, three models, the
t-threshold string, calibration, and its bad input (through `python -m mdlm_sched optimise`)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.optimise_section import solution_lines
from mdlm_sched.artifacts import AnalysisDir, OptimiseDir, SweepDir
from mdlm_sched.errors import ConfigError
from mdlm_sched.optimise import (calibrate, optimise, predicted_change, run_optimise, schedule_feature, schedule_flops,
                                 step_costs, uncalibrated)
from mdlm_sched.schedule import parse_schedule, time_grid

from conftest import REPO

T_MIN = 1e-5


def analysis(kl: dict[str, callable], per_forward: dict[str, float], steps: int = 40, grid: int = 41,
             ce: dict[str, callable] | None = None) -> tuple[list[dict], dict]:
    """per_step.csv rows and per_step.json of an analysis whose KL(heavy || m) at time t is kl[m](t) (band +-10%),
    and whose masked CE gap is ce[m](t) (default: the same as the KL); models light to heavy as per_forward."""
    names = list(per_forward)
    heavy = names[-1]
    rows = []
    for light in names[:-1]:
        for k, t in enumerate(np.linspace(1.0, T_MIN, grid)):
            for source, metric, model, value in (
                    ("trajectory", "kl", f"{heavy}||{light}", kl[light](t)),
                    ("masked", "kl", f"{heavy}||{light}", kl[light](t)),
                    ("masked", "ce_gap", f"{light}-{heavy}", (ce or kl)[light](t)),
                    ("trajectory", "ce_gap", f"{light}-{heavy}", (ce or kl)[light](t))):
                rows.append({"source": source, "step": k, "t": float(t), "metric": metric, "model": model,
                             "mean": value, "ci_low": 0.9 * value, "ci_high": 1.1 * value, "units": 8, "tokens": 100})
    meta = {"light_to_heavy": names, "settings": {"steps": steps, "t_min": T_MIN}, "seq_len": 64,
            "flops_per_forward": {n: {"blocks_only": f, "full": f * 1.1} for n, f in per_forward.items()}}
    return rows, meta


def brute_force(costs, feature: str, bins: int, budget: float | None = None, tolerance: float | None = None):
    """(cost, flops) of the best assignment of models to equal bins, tried one by one."""
    edges = [round(k * costs.steps / bins) for k in range(bins + 1)]
    best = None
    for assignment in itertools.product(costs.names, repeat=bins):
        per_step = [m for b, m in enumerate(assignment) for _ in range(edges[b], edges[b + 1])]
        cost, flops = schedule_feature(costs, feature, per_step)[0], schedule_flops(costs, per_step)
        if budget is not None and flops <= budget + 1e-12 and (best is None or cost < best[0] - 1e-12):
            best = (cost, flops)
        if tolerance is not None and cost <= tolerance + 1e-12 and (best is None or flops < best[1] - 1e-12):
            best = (cost, flops)
    return best


def bump(t: float) -> float:
    """Large in the middle steps, small at both ends: the seed paper's picture."""
    return 0.02 + math.exp(-((t - 0.5) / 0.12) ** 2)


def test_a_planted_optimum_is_recovered():
    # The light model costs nothing at t >= 0.7 and t <= 0.3: the first 12 and the last 12 of 40 steps (bins 0-2
    # and 7-9 of 10), exactly the 60% of steps a 40% saving needs at a FLOPs ratio of 1/3; 1 elsewhere.
    rows, meta = analysis({"small": lambda t: 1.0 if 0.31 < t < 0.69 else 0.0}, {"small": 1.0, "large": 3.0})
    costs = step_costs(rows, meta)
    solution = optimise(costs, uncalibrated(costs), bins=10, saving=0.4)
    assert solution.per_step == ["small"] * 12 + ["large"] * 16 + ["small"] * 12
    assert solution.predicted[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("saving", [0.0, 0.1, 1 / 6, 0.25, 0.35, 0.5, 2 / 3])
def test_budgets_are_met_and_nothing_within_them_is_better(saving):
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0})
    costs = step_costs(rows, meta)
    solution = optimise(costs, uncalibrated(costs), bins=10, saving=saving)
    assert solution.flops_share <= 1 - saving + 1e-12  # never over the budget
    assert solution.flops_share == pytest.approx(schedule_flops(costs, solution.per_step))
    cost, _ = brute_force(costs, "kl_trajectory", 10, budget=1 - saving)
    assert solution.predicted[0] == pytest.approx(cost, rel=1e-9, abs=1e-12)
    # The ends are cheaper than the middle, so the light steps sit at both ends (none in the middle bins).
    assert "small" not in solution.per_step[16:24] or saving > 0.5


def test_three_models_reach_a_budget_two_cannot():
    # medium alone saves 50%, tiny alone 95%; tiny is poor in the middle steps, medium nearly as good as large.
    per_forward = {"tiny": 0.5, "medium": 5.0, "large": 10.0}
    rows, meta = analysis({"tiny": lambda t: 20 * bump(t), "medium": lambda t: bump(t) / 10}, per_forward, steps=12)
    with pytest.raises(ConfigError, match="saves 50.0%"):
        two = step_costs(rows, meta, models=["medium", "large"])
        optimise(two, uncalibrated(two), bins=6, saving=0.6)
    costs = step_costs(rows, meta)
    solution = optimise(costs, uncalibrated(costs), bins=6, saving=0.6)
    assert solution.segments == "tiny:2,medium:8,tiny:2" and solution.flops_share <= 0.4 + 1e-12
    cost, _ = brute_force(costs, "kl_trajectory", 6, budget=0.4)
    assert solution.predicted[0] == pytest.approx(cost, rel=1e-9)


def test_a_tolerance_gives_the_cheapest_schedule_within_it():
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0})
    costs = step_costs(rows, meta)
    for tolerance in (0.0, 0.01, 0.05, 0.2, 1.0):
        solution = optimise(costs, uncalibrated(costs), bins=8, tolerance=tolerance)
        _, flops = brute_force(costs, "kl_trajectory", 8, tolerance=math.log1p(tolerance))
        assert solution.predicted[0] <= math.log1p(tolerance) + 1e-12
        assert solution.flops_share == pytest.approx(flops, rel=1e-12)  # the fewest FLOPs within the tolerance


@pytest.mark.parametrize("steps", [40, 37])
def test_the_strings_give_back_the_same_schedule(steps):
    rows, meta = analysis({"small": bump, "medium": lambda t: bump(t) / 3}, {"small": 1.0, "medium": 2.0,
                                                                            "large": 3.0}, steps=steps)
    costs = step_costs(rows, meta)
    solution = optimise(costs, uncalibrated(costs), bins=7, saving=0.4)
    for spec in (solution.segments, solution.thresholds):
        assert list(parse_schedule(spec, steps, costs.names, T_MIN).names) == solution.per_step
    assert solution.thresholds.startswith("t:")


def test_executed_flops_count_the_steps_that_run_a_sequence():
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0}, steps=200)
    blocks, executed = step_costs(rows, meta), step_costs(rows, meta, flops="executed")
    assert blocks.flops["large"].sum() == pytest.approx(1.0) == executed.flops["large"].sum()
    dt = -np.diff(time_grid(200, T_MIN))
    runs = 1 - (1 - dt) ** 64  # the chance a sequence of 64 tokens has a token to unmask at the step
    assert executed.flops["large"] == pytest.approx(runs / runs.sum())
    assert executed.flops["small"].sum() == pytest.approx(1 / 3)


def test_calibration_recovers_a_planted_kappa_and_feature():
    # Measured log ratios are 2.5 x the masked CE gap, which differs in shape from the KL: the fit finds both.
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0},
                          ce={"small": lambda t: 0.05 + t / 5})
    costs = step_costs(rows, meta)
    measured = []
    for k, spec in enumerate(["small:10,large:30", "large:30,small:10", "large:10,small:20,large:10",
                              "small:5,large:30,small:5", "small:40"]):
        per_step = parse_schedule(spec, 40, costs.names).names
        y = 2.5 * schedule_feature(costs, "ce_gap_masked", per_step)[0]
        measured.append({"label": f"s{k}", "segments": spec, "groups": ["g"], "saving_blocks_only": 0.0,
                         "ppl_ratio": math.exp(y), "ppl_ratio_low": math.exp(y - 0.01), "ppl_ratio_high":
                         math.exp(y + 0.01)})
    calibration = calibrate(costs, measured)
    assert calibration.feature in ("ce_gap_masked", "ce_gap_trajectory")  # the same values in this planted set
    assert calibration.kappa == {"small": pytest.approx(2.5)}
    assert calibration.per_feature["kl_trajectory"]["loo_mean_abs_error"] > 1e-3
    assert all(m["loo_predicted"] == pytest.approx(m["measured"]) for m in calibration.measured)
    # With kappa fitted, a tolerance is in gen PPL: the schedule's predicted ratio stays within it.
    solution = optimise(costs, calibration, bins=8, tolerance=0.05)
    assert math.exp(solution.predicted[0]) <= 1.05 + 1e-12 and solution.flops_share < 1


def _write_analysis(folder: Path) -> None:
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0})
    AnalysisDir(folder).write(rows, meta)


def test_run_optimise_writes_its_record(tmp_path):
    _write_analysis(tmp_path / "analysis")
    record = run_optimise(AnalysisDir(tmp_path / "analysis"), OptimiseDir(tmp_path / "opt"), [0.25], [0.1],
                          bins=10, echo=lambda _: None)
    assert json.loads((tmp_path / "opt" / "optimise.json").read_text()) == json.loads(json.dumps(record))
    first = record["schedules"][0]
    assert first["target"] == "saving" and first["saving"] >= 0.25 and record["cost_model"]["calibrated_on"] == 0
    assert "uncalibrated" in record["cost_model"]["unit"]


@pytest.mark.parametrize("words, message", [
    (["--saving", "0.9"], "no schedule of these models saves 90.0%"),
    (["--tolerance", "-0.01"], "tolerance=-0.01 must be >= 0"),
    (["--saving", "0.2", "--model", "medium"], "model 'medium' is not in the per-step analysis"),
    (["--saving", "0.2", "--bins", "0"], "bins=0 must be at least 1"),
    ([], "give at least one FLOPs saving"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, words, message):
    _write_analysis(tmp_path / "analysis")
    proc = subprocess.run([sys.executable, "-m", "mdlm_sched", "optimise", "--analysis", str(tmp_path / "analysis"),
                           "--out", str(tmp_path / "opt"), *words], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "opt").exists()


def test_a_sweep_of_other_models_is_refused(tmp_path):
    _write_analysis(tmp_path / "analysis")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"shared": {"models": {"a": "x", "b": "y"}}, "config": {}}))
    (sweep / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match="the analysis compares small, large"):
        run_optimise(AnalysisDir(tmp_path / "analysis"), OptimiseDir(tmp_path / "opt"), [0.2],
                     sweep=SweepDir(sweep))


def test_a_negative_slope_is_kept_and_reorders_the_schedules():
    # Measured costs fall where the KL rises (the middle steps are the cheap ones): kappa = -1, not clamped to 0.
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0})
    costs = step_costs(rows, meta)
    measured = []
    for k, spec in enumerate(["small:10,large:30", "large:10,small:20,large:10", "large:30,small:10", "small:40"]):
        y = -schedule_feature(costs, "kl_trajectory", parse_schedule(spec, 40, costs.names).names)[0]
        measured.append({"label": f"s{k}", "segments": spec, "groups": ["g"], "saving_blocks_only": 0.0,
                         "ppl_ratio": math.exp(y), "ppl_ratio_low": math.exp(y - 0.01),
                         "ppl_ratio_high": math.exp(y + 0.01)})
    calibration = calibrate(costs, measured)
    assert calibration.feature == "kl_trajectory" and calibration.kappa == {"small": pytest.approx(-1.0)}
    assert calibration.kappa_high["small"] < 0
    assert calibration.per_feature["light_share"]["loo_mean_abs_error"] > 1e-3  # the share alone predicts worse
    # Uncalibrated, the ends (low KL) are cheaper than the middle; calibrated, the order turns round.
    ends, middle = (parse_schedule(spec, 40, costs.names).names for spec in ("small:5,large:30,small:5",
                                                                            "large:15,small:10,large:15"))
    assert predicted_change(costs, uncalibrated(costs), ends)[0] < predicted_change(costs, uncalibrated(costs),
                                                                                     middle)[0]
    assert predicted_change(costs, calibration, middle)[0] < predicted_change(costs, calibration, ends)[0] < 0
    low, est, high = (predicted_change(costs, calibration, middle)[k] for k in (1, 0, 2))
    assert low <= est <= high


@pytest.mark.parametrize("saving", [0.2, 0.4])
def test_equal_costs_resolve_to_the_fewest_switches(saving):
    # Under the light-share feature every placement of the same number of light bins costs the same: the pick
    # among them is one light run at an end (one switch), not the scattered bins of whichever came first.
    rows, meta = analysis({"small": bump}, {"small": 1.0, "large": 3.0})
    costs = step_costs(rows, meta)
    solution = optimise(costs, uncalibrated(costs, "light_share"), bins=10, saving=saving)
    assert solution.flops_share <= 1 - saving + 1e-12
    assert len(solution.segments.split(",")) == 2, solution.segments
    # With a cost that does vary (the KL bump), the tie-break changes nothing: still the brute-force optimum.
    solution = optimise(costs, uncalibrated(costs), bins=10, saving=saving)
    assert solution.predicted[0] == pytest.approx(brute_force(costs, "kl_trajectory", 10, 1 - saving)[0], rel=1e-9)


def test_the_report_says_a_light_share_pick_is_one_of_many_equals(tmp_path):
    _write_analysis(tmp_path / "analysis")
    record = run_optimise(AnalysisDir(tmp_path / "analysis"), OptimiseDir(tmp_path / "opt"), [0.25], bins=10,
                          echo=lambda _: None)
    assert "one of many equal picks" not in solution_lines(record)[0]  # the KL feature ranks placements
    record["cost_model"]["feature"] = "light_share"
    assert "one of many equal picks" in solution_lines(record)[0]
    record.update(measured=[{}], cost_model={**record["cost_model"], "kappa": {"small": 0.0}})
    assert "these picks carry no information" in solution_lines(record)[0]  # a fit of 0: nothing was learnt
