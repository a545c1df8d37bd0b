"""The report's section on the schedule optimiser (an optimise.json calibrated on a sweep): the cost model,
how well it predicts every measured schedule (leave-one-out), each non-preset schedule against all-heavy and
against the best hand preset of the same FLOPs, and the schedules the calibrated model picks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from analysis import plots
from analysis.sweep_section import SweepView, ratio_text, verdict
from mdlm_sched.artifacts import OptimiseDir, ReportDir
from mdlm_sched.optimise import kappa_text
from mdlm_sched.schedule import PRESETS
from mdlm_sched.stats import change_verdict, interval
from mdlm_sched.summary import paired, placement_of, row_points

SAME_BUDGET = 0.02  # a hand preset is "at the same budget" when its blocks-only saving is within 2 points
GOAL_TOLERANCE = 0.05  # the goal: the largest saving whose paired CI upper bound is at most +5%
RHO_RESAMPLES = 2000


def is_hand_preset(label: str) -> bool:
    """A preset (all-large and all-small included), at its default or any other fraction."""
    return label in PRESETS or placement_of(label) in PRESETS


def _rho(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Spearman's rho, NaN where it is undefined (one side constant: no ranks to correlate)."""
    if np.ptp(predicted) == 0 or np.ptp(measured) == 0:
        return math.nan
    return float(spearmanr(predicted, measured).statistic)


def _rank_correlation(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float, float]:
    """Spearman's rho with a bootstrap 95% interval over schedules (resamples of under 3 schedules left out)."""
    rho = _rho(predicted, measured)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(predicted), (RHO_RESAMPLES, len(predicted)))
    draws = np.array([_rho(predicted[p], measured[p]) if len(set(p)) > 2 else math.nan for p in picks])
    low, high = interval(draws)
    return rho, float(low), float(high)


def _model_text(record: Mapping[str, Any]) -> str:
    model, measured = record["cost_model"], record["measured"]
    text = (f"Cost model: predicted change in log gen PPL = Σ_steps κ_m · dt_i · f_m(t_i), with f = "
            f"`{model['feature']}` (0 for the heaviest model), dt_i the share of tokens step i decides; "
            f"{record['bins']} bins at T = {record['steps']}; FLOPs {record['flops']}. ")
    if not measured:
        return text + ("Not calibrated (no measured schedules): κ = 1, so predictions are in nats per token of the "
                       "feature, and only their order means something.")
    if isinstance(model["kappa"], (int, float)):  # the first optimiser: one slope, clamped at 0
        return text + (f"κ ≥ 0 fitted on {len(measured)} measured schedules: κ = {model['kappa']:.3g}, 95% bootstrap "
                       f"interval over schedules [{model['kappa_low']:.3g}, {model['kappa_high']:.3g}]; a "
                       f"prediction's interval combines the per-step bands with κ's.")
    bounds = ", ".join(f"{m} [{model['kappa_low'][m]:.3g}, {model['kappa_high'][m]:.3g}]" for m in model["kappa"])
    return text + (f"Each light model's κ fitted with its sign on {len(measured)} measured schedules: "
                   f"{kappa_text(model['kappa'])} (95% bootstrap intervals over schedules: {bounds}); a negative "
                   f"κ means the measured cost falls where the feature rises. A prediction's interval combines the "
                   f"per-step bands with the κ intervals.")


def _fit_lines(record: Mapping[str, Any], out: ReportDir, name: str) -> list[str]:
    model, measured = record["cost_model"], record["measured"]
    lines = [_model_text(record), ""]
    if model["per_feature"]:
        lines += ["Features compared by their leave-one-out error (the one with the least predicts):", "",
                  "| feature | κ | mean abs. leave-one-out error (log gen PPL) |", "|---|---:|---:|"]
        lines += [f"| {f} | {kappa_text(v['kappa'])} | {v['loo_mean_abs_error']:.4f} |"
                  for f, v in model["per_feature"].items()]
        lines.append("")
    usable = [m for m in measured if math.isfinite(m["loo_predicted"])]
    if not measured:
        return lines
    if len(usable) < 3:
        return lines + [f"{len(usable)} measured schedule(s) with a leave-one-out prediction: too few to judge the "
                        f"cost model.", ""]
    for m in measured:
        m["hand"] = is_hand_preset(m["label"])
    stem = out.figure("optimise", name)
    plots.optimise_figure(usable, stem)
    predicted = np.array([m["loo_predicted"] for m in usable])
    actual = np.array([m["measured"] for m in usable])
    error = float(np.mean(np.abs(predicted - actual)))
    if np.ptp(predicted) == 0:  # e.g. kappa = 0 for every left-out fit: nothing to rank
        ranking = ("the leave-one-out predictions are all equal (κ = 0: no feature grows with the measured changes), "
                   "so they rank nothing")
    else:
        rho, low, high = _rank_correlation(predicted, actual)
        ranking = (f"the leave-one-out prediction (κ fitted without the schedule) ranks them with Spearman ρ = "
                   f"{rho:.2f} [{low:.2f}, {high:.2f}] (95% bootstrap over schedules)")
    lines += [f"![predicted against measured]({stem.name}.png)", "",
              f"Over {len(usable)} measured schedules, {ranking}; it misses the measured log gen PPL ratio by "
              f"{error:.4f} on average (×{math.exp(error):.3f} in gen PPL).",
              "", "| schedule | FLOPs saved (blocks only, calls made) | measured gen PPL / all-heavy [95% CI] | "
              "predicted (fit) | predicted (leave-one-out) |", "|---|---:|---|---:|---:|"]
    for m in sorted(measured, key=lambda m: m["saving"]):
        lines.append(f"| {m['label']} | {m['saving']:.1%} | {math.exp(m['measured']):.3f} "
                     f"[{math.exp(m['measured_low']):.3f}, {math.exp(m['measured_high']):.3f}] | "
                     f"{math.exp(m['predicted']):.3f} | {math.exp(m['loo_predicted']):.3f} |")
    return lines + [""]


def _against_presets(view: SweepView, steps: int, group: str | None) -> list[str]:
    """The optimiser's measured schedules (those of the sweep group `group`; without one, every schedule that is not
    a hand preset) against all-heavy and against the best other hand preset whose blocks-only saving is within
    SAME_BUDGET of theirs (lowest pooled gen PPL, same seeds and samples)."""
    rows = [r for r in view.rows if r["steps"] == steps and r["pairs"]]
    chosen = [r for r in rows if not r["all_heavy"]
              and (group in r["groups"] if group else not is_hand_preset(r["label"]))]
    if not chosen:
        return []
    lines = [f"The optimiser's schedules as measured (T = {steps}; a schedule that coincides with a preset keeps the "
             f"preset's label), against all-heavy and against the best other hand preset within {SAME_BUDGET:.0%} of "
             f"their FLOPs saving (paired on the same seeds and samples):", "",
             "| schedule | segments | FLOPs saved | gen PPL / all-heavy [95% CI] | verdict | best other hand preset at "
             "that budget | gen PPL / preset's [95% CI] | verdict |", "|---|---|---:|---|---|---|---|---|"]
    for r in sorted(chosen, key=lambda r: r["saving_blocks_only"]):
        near = [h for h in rows if is_hand_preset(h["label"]) and h["num_samples"] == r["num_samples"]
                and h["segments"] != r["segments"]
                and abs(h["saving_blocks_only"] - r["saving_blocks_only"]) <= SAME_BUDGET]
        text = "none measured | | "
        if near:
            best = min(near, key=lambda h: h["gen_ppl"])
            vs = paired(row_points(view.points, r), row_points(view.points, best), r["token_rule"])
            if vs["pairs"]:
                text = (f"{best['label']} ({best['saving_blocks_only']:.1%}) | {ratio_text(vs)} "
                        f"({vs['pairs']} pairs) | {change_verdict(vs['ppl_ratio_low'] - 1, vs['ppl_ratio_high'] - 1)}")
        lines.append(f"| {r['label']} | {r['segments']} | {r['saving_blocks_only']:.1%} | {ratio_text(r)} | "
                     f"{verdict(r)} | {text} |")
    within = [r for r in rows if r["ppl_ratio_high"] <= 1 + GOAL_TOLERANCE]
    lines.append("")
    if within:
        top = max(within, key=lambda r: r["saving_blocks_only"])
        lines.append(f"The largest measured FLOPs saving (blocks only) whose gen PPL ratio has a paired 95% upper "
                     f"bound of at most {1 + GOAL_TOLERANCE:.2f}: {top['saving_blocks_only']:.1%}, by "
                     f"`{top['label']}` ({ratio_text(top)}).")
    else:
        lines.append(f"No measured schedule has a paired 95% upper bound of at most {1 + GOAL_TOLERANCE:.2f}.")
    return lines + [""]


def solution_lines(record: Mapping[str, Any]) -> list[str]:
    """The table of the schedules the cost model picks, with what the picks can mean under its feature."""
    unit = "gen PPL / all-heavy's" if record["measured"] else record["cost_model"]["unit"]
    kappa = record["cost_model"]["kappa"]  # per light model; one number in records from before that
    if record["measured"] and all(v == 0 for v in (kappa.values() if isinstance(kappa, Mapping) else [kappa])):
        caveat = (": with κ = 0 it predicts no cost for any schedule and picks the cheapest, so these picks carry no "
                  "information.")
    elif record["cost_model"]["feature"] == "light_share":
        # Every step then costs kappa * dt_i wherever it lies: the solver breaks the tie by fewest switches.
        caveat = (": the feature is the light share alone, so the model predicts every schedule of the same light "
                  "share alike, wherever its light steps lie; each segment string is one of many equal picks (the "
                  "one with the fewest model switches), not a placement the measurements favour.")
    else:
        caveat = ":"
    lines = [f"Schedules the cost model picks (predictions as {unit}; interval from the per-step bands and κ's)"
             + caveat,
             "", f"| target | schedule at T = {record['steps']} | t-thresholds (any T) | FLOPs saved "
                 f"({record['flops']}) | predicted [interval] |", "|---|---|---|---:|---|"]
    for s in record["schedules"]:
        target = f"saving ≥ {s['value']:.1%}" if s["target"] == "saving" else f"gen PPL ≤ +{s['value']:.1%}"
        values = [s["predicted"], s["predicted_low"], s["predicted_high"]]
        shown = [f"{math.exp(v):.3f}" for v in values] if record["measured"] else [f"{v:+.4f}" for v in values]
        lines.append(f"| {target} | `{s['segments']}` | `{s['thresholds']}` | {s['saving']:.1%} | "
                     f"{shown[0]} [{shown[1]}, {shown[2]}] |")
    return lines + [""]


def optimise_section(folder: Path, out: ReportDir, view: SweepView | None, group: str | None = None) -> list[str]:
    """The optimiser's report lines and figure. view: the sweep the record was calibrated on, when the report has
    it; group: the sweep group of the optimiser's schedules (the pipeline's optimise.group), when known."""
    record = OptimiseDir(folder).read()
    title = "calibrated on the sweep" if record["measured"] else "before the sweep (the schedules swept)"
    lines = [f"## Schedule optimiser, {title}: `{folder}`", "", *_fit_lines(record, out, folder.name)]
    if record["measured"] and view is not None and view.rows:
        lines += _against_presets(view, record["steps"], group)
    return lines + solution_lines(record)
