"""The schedule optimiser: from per-step measurements to the schedule predicted best for a FLOPs budget.

The cost model. Cut the T steps into B bins. A token decided at step i by light model m instead of the
heaviest model H costs, in expectation, an amount that grows with how far m's prediction is from H's
there; so the model predicts the change in log gen PPL of a schedule as additive over steps:

    delta log PPL = sum_i kappa_{m_i} * dt_i * f_{m_i}(t_i),    f_H = 0,

where dt_i = t_i - t_{i+1} is the share of tokens step i decides, and f_m(t) a per-step quantity of the
analysis (interpolated between its grid steps): KL(H || m) on trajectories ("kl_trajectory", the
default) or on masked states, the CE gap m - H on either, or 1 ("light_share": the cost grows with the
light model's share alone, wherever its steps lie). Without measured schedules kappa = 1 and the
prediction is in nats per token of that quantity; with a sweep's measured schedules (log of each one's
paired gen PPL ratio to all-heavy) each light model's slope kappa_m is fitted by weighted least squares
through the origin, sign included (a negative slope says the measurements fall where the feature rises:
a finding, and the optimiser then follows it), each feature is judged by its leave-one-out error, and the
best is used, so that calibration may reorder the schedules. The prediction's interval combines the
per-step bands (the features integrated over the band's ends) with the slopes' bootstrap intervals over
the measured schedules.

The optimisation is exact: a dynamic programme over bins (a multiple-choice knapsack that keeps, bin by
bin, the Pareto frontier of FLOPs and predicted cost, in floating point without rounding) finds the
assignment of a model to every bin with the lowest predicted cost among those within a FLOPs budget, for
any number of models; with a gen-PPL tolerance it finds the cheapest assignment whose predicted cost is
within it. FLOPs are
counted "blocks-only" (the seed paper's: every step one forward, blocks only) or "executed" (this
sampler's cache: step i runs a sequence with probability 1 - (1 - dt_i)^L, unprompted).

The result is a segment string for the analysis's T and a t-threshold string that means the same at any T.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mdlm_sched.artifacts import AnalysisDir, OptimiseDir, SweepDir
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import atomic_write_json, check_writable
from mdlm_sched.schedule import check_steps, parse_schedule, time_grid
from mdlm_sched.summary import summarize
from mdlm_sched.sweep_records import SweepPoint

FEATURES = {  # name -> (per_step source, metric, model column given (heavy, light))
    "kl_trajectory": ("trajectory", "kl", "{heavy}||{light}"),
    "kl_masked": ("masked", "kl", "{heavy}||{light}"),
    "ce_gap_masked": ("masked", "ce_gap", "{light}-{heavy}"),
    "ce_gap_trajectory": ("trajectory", "ce_gap", "{light}-{heavy}"),
}
DEFAULT_FEATURE = "kl_trajectory"
FLOPS_CONVENTIONS = ("blocks-only", "executed")
DEFAULT_BINS = 20  # step bins a schedule is made of (CLI and pipeline default)
KAPPA_RESAMPLES = 2000


@dataclass
class StepCosts:
    """Per step of T, per model: the features (and their band ends) and the FLOPs share of a step."""

    names: list[str]  # light to heavy
    steps: int
    times: np.ndarray  # [T + 1] the time grid: step i goes from times[i] to times[i + 1]
    dt: np.ndarray  # [T] share of tokens decided at each step
    features: dict[str, dict[str, np.ndarray]]  # feature -> model -> [3, T]: estimate, band low, band high
    flops: dict[str, np.ndarray]  # model -> [T] its FLOPs at each step as a share of an all-heavy run


def step_costs(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], flops: str = "blocks-only",
               steps: int | None = None, models: Sequence[str] | None = None) -> StepCosts:
    """Per-step features and FLOPs shares from a per-step analysis (per_step.csv rows and per_step.json)."""
    _check_flops(flops)
    names = list(meta["light_to_heavy"])
    if models:
        unknown = sorted(set(models) - set(names))
        if unknown:
            raise ConfigError(f"model {unknown[0]!r} is not in the per-step analysis, which compares "
                              f"{', '.join(names)}; name its models or analyse these")
        names = [n for n in names if n in models]
    if len(names) < 2:
        raise ConfigError("the optimiser chooses between models: name at least two")
    if "flops_per_forward" not in meta:
        raise ConfigError("this per-step analysis predates the optimiser (no flops_per_forward); run the analysis "
                          "again")
    T = steps or meta["settings"]["steps"]
    times = time_grid(T, meta["settings"]["t_min"])
    t, dt = times[:-1], times[:-1] - times[1:]
    per_forward = {n: meta["flops_per_forward"][n]["blocks_only"] for n in names}
    heavy = names[-1]
    runs = np.ones(T) if flops == "blocks-only" else 1 - (1 - dt) ** meta["seq_len"]  # sequences run per step
    share = {n: runs * per_forward[n] / (runs.sum() * per_forward[heavy]) for n in names}
    features: dict[str, dict[str, np.ndarray]] = {}
    for feature, (source, metric, column) in FEATURES.items():
        per_model = {heavy: np.zeros((3, T))}
        for light in names[:-1]:
            key = column.format(heavy=heavy, light=light)
            grid = sorted((r["t"], r["mean"], r["ci_low"], r["ci_high"]) for r in rows
                          if (r["source"], r["metric"], r["model"]) == (source, metric, key))
            if not grid:
                break  # this analysis has no such rows (e.g. no trajectories): the feature is left out
            g = np.array(grid, dtype=np.float64)  # [G, 4] by increasing t
            est = np.interp(t, g[:, 0], g[:, 1])
            low = np.interp(t, g[:, 0], np.where(np.isnan(g[:, 2]), g[:, 1], g[:, 2]))
            high = np.interp(t, g[:, 0], np.where(np.isnan(g[:, 3]), g[:, 1], g[:, 3]))
            per_model[light] = np.stack([est, low, high])
        else:
            features[feature] = per_model
    if not features:
        raise ConfigError("the per-step analysis holds no KL or CE-gap rows for these models")
    features["light_share"] = {m: np.ones((3, T)) if m != heavy else np.zeros((3, T)) for m in names}
    return StepCosts(names, T, times, dt, features, share)


def schedule_feature(costs: StepCosts, feature: str, per_step_models: Sequence[str]) -> np.ndarray:
    """[3] estimate, low, high of sum_i dt_i f_{m_i}(t_i) for a schedule given as the model of each step."""
    f = costs.features[feature]
    return sum(costs.dt[i] * f[m][:, i] for i, m in enumerate(per_step_models))


def schedule_flops(costs: StepCosts, per_step_models: Sequence[str]) -> float:
    """A schedule's FLOPs as a share of all-heavy's."""
    return float(sum(costs.flops[m][i] for i, m in enumerate(per_step_models)))


@dataclass
class Calibration:
    """Each light model's slope kappa_m for the chosen feature, fitted on measured schedules, with intervals."""

    feature: str
    kappa: dict[str, float]  # light model -> kappa (signed: a negative one is a finding, not clamped)
    kappa_low: dict[str, float]
    kappa_high: dict[str, float]
    measured: list[dict[str, Any]]  # per schedule: segments, measured and predicted log ratio, LOO prediction
    per_feature: dict[str, dict[str, Any]]  # feature -> kappa per model, LOO mean absolute error


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares of y = x @ kappa through the origin: x [n, K] each schedule's feature integrated over
    the steps of each of K light models, y [n], w [n] weights; kappa [K] keeps its sign (NaN where x does not
    determine it, e.g. a model no schedule used)."""
    root = np.sqrt(w)[:, None]
    kappa, _, rank, _ = np.linalg.lstsq(x * root, y * root[:, 0], rcond=None)
    return kappa if rank == x.shape[1] else np.full(x.shape[1], np.nan)


def _design(costs: StepCosts, feature: str, per_step: Sequence[Sequence[str]], lights: Sequence[str]) -> np.ndarray:
    """[n, K] the feature's estimate integrated over each light model's steps, per schedule."""
    f = costs.features[feature]
    return np.array([[sum(costs.dt[i] * f[m][0, i] for i, name in enumerate(s) if name == m) for m in lights]
                     for s in per_step])


def measured_rows(costs: StepCosts, points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The summary rows (summary.summarize) of a sweep's points that can calibrate the costs: same T, compared
    with all-heavy, not all-heavy themselves, only the costs' models."""
    return [r for r in summarize(points) if r["steps"] == costs.steps and r.get("pairs") and not r["all_heavy"]
            and set(r["steps_per_model"]) <= set(costs.names)]


def calibrate(costs: StepCosts, rows: Sequence[Mapping[str, Any]]) -> Calibration:
    """Fit each light model's kappa for each feature on measured schedules (measured_rows: label, segments, groups,
    saving_blocks_only and the paired ppl_ratio with its interval); keep the feature whose leave-one-out predictions
    miss least."""
    if not rows:
        return uncalibrated(costs)
    per_step = [parse_schedule(r["segments"], costs.steps, costs.names).names for r in rows]
    lights = [m for m in costs.names[:-1] if any(m in s for s in per_step)]  # the light models the sweep used
    y = np.log([r["ppl_ratio"] for r in rows])
    se = (np.log([r["ppl_ratio_high"] for r in rows]) - np.log([r["ppl_ratio_low"] for r in rows])) / 3.92
    w = 1.0 / np.maximum(se, 1e-6) ** 2
    per_feature, loo = {}, {}
    n = len(rows)
    for feature in costs.features:
        x = _design(costs, feature, per_step, lights)
        kappa = _fit(x, y, w)
        keep = [np.arange(n) != k for k in range(n)]
        loo[feature] = np.array([float(x[k] @ _fit(x[m], y[m], w[m])) if n > len(lights) else math.nan
                                 for k, m in enumerate(keep)])
        error = float(np.nanmean(np.abs(loo[feature] - y))) if np.isfinite(loo[feature]).any() else math.nan
        per_feature[feature] = {"kappa": dict(zip(lights, map(float, kappa))), "loo_mean_abs_error": error}
    # With a leave-one-out prediction for two or more schedules, the feature that predicts them best; else the default.
    judged = [f for f in per_feature if np.isfinite(per_feature[f]["loo_mean_abs_error"])]
    feature = min(judged, key=lambda f: per_feature[f]["loo_mean_abs_error"]) if len(judged) and n >= len(lights) + 2 \
        else DEFAULT_FEATURE if DEFAULT_FEATURE in costs.features else next(iter(costs.features))
    x = _design(costs, feature, per_step, lights)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n, (KAPPA_RESAMPLES, n))  # schedules resampled with replacement
    kappas = np.array([_fit(x[p], y[p], w[p]) for p in picks])
    kappas = kappas[np.isfinite(kappas).all(axis=1)]  # resamples that do not determine every slope are left out
    low, high = np.percentile(kappas, [2.5, 97.5], axis=0) if len(kappas) else (np.full(len(lights), np.nan),) * 2
    kappa = per_feature[feature]["kappa"]
    predicted = x @ np.array([kappa[m] for m in lights])
    measured = [{"label": r["label"], "segments": r["segments"], "groups": r["groups"],
                 "saving": r["saving_blocks_only"], "measured": float(y[k]), "measured_low":
                 float(np.log(r["ppl_ratio_low"])), "measured_high": float(np.log(r["ppl_ratio_high"])),
                 "predicted": float(predicted[k]), "loo_predicted": float(loo[feature][k])}
                for k, r in enumerate(rows)]
    return Calibration(feature, kappa, dict(zip(lights, map(float, low))), dict(zip(lights, map(float, high))),
                       measured, per_feature)


def uncalibrated(costs: StepCosts, feature: str = DEFAULT_FEATURE) -> Calibration:
    """kappa = 1 for every light model: predictions in nats per token of the feature, not in log gen PPL."""
    ones = {m: 1.0 for m in costs.names[:-1]}
    return Calibration(feature, ones, dict(ones), dict(ones), [], {})


def predicted_change(costs: StepCosts, calibration: Calibration, per_step: Sequence[str]) -> tuple[float, float, float]:
    """A schedule's predicted delta log gen PPL: estimate, low, high. The interval takes, per light model, the
    extremes of kappa's interval times the feature's band integrated over that model's steps."""
    f = costs.features[calibration.feature]
    est = low = high = 0.0
    for m in set(per_step) - {costs.names[-1]}:
        band = sum(costs.dt[i] * f[m][:, i] for i, name in enumerate(per_step) if name == m)  # [3]
        k = calibration.kappa.get(m, math.nan)
        ends = [a * b for a in (calibration.kappa_low.get(m, k), calibration.kappa_high.get(m, k))
                for b in (band[1], band[2])]
        est, low, high = est + k * band[0], low + min(ends), high + max(ends)
    return est, low, high


@dataclass
class Solution:
    """The schedule predicted best, with its prediction and FLOPs."""

    per_step: list[str]  # the model of each of the T steps
    segments: str
    thresholds: str  # t-threshold string: the same schedule at any T
    flops_share: float  # FLOPs against all-heavy's
    predicted: tuple[float, float, float]  # delta log PPL: estimate, low, high


def check_targets(savings: Sequence[float], tolerances: Sequence[float], bins: int, flops: str,
                  lightest_saving: float | None = None) -> None:
    """Refuse targets no schedule can meet, before any work (lightest_saving: all-lightest's, when known)."""
    bad = [s for s in savings if not 0 <= s < 1]
    if bad:
        raise ConfigError(f"saving {bad[0]} must be in [0, 1): a share of all-heavy's FLOPs")
    out_of_reach = [s for s in savings if lightest_saving is not None and s > lightest_saving + 1e-12]
    if out_of_reach:
        raise ConfigError(f"no schedule of these models saves {out_of_reach[0]:.1%} of the FLOPs: the lightest alone "
                          f"saves {lightest_saving:.1%}; lower the saving or add a lighter model")
    negative = [x for x in tolerances if x < 0]
    if negative:
        raise ConfigError(f"tolerance={negative[0]} must be >= 0 (a relative gen PPL increase, e.g. 0.05)")
    if bins < 1:
        raise ConfigError(f"bins={bins} must be at least 1")
    _check_flops(flops)


def _check_flops(flops: str) -> None:
    if flops not in FLOPS_CONVENTIONS:
        raise ConfigError(f"flops={flops!r}; use one of {', '.join(FLOPS_CONVENTIONS)}")


def _bins(steps: int, bins: int) -> list[range]:
    if not 1 <= bins <= steps:
        raise ConfigError(f"bins={bins} must be in [1, steps={steps}]")
    edges = [round(k * steps / bins) for k in range(bins + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def _pareto_knapsack(cost: np.ndarray, flops: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray, Callable]:
    """Multiple-choice knapsack over bins, exactly: cost [M, B] and FLOPs share [M, B] of giving bin b to model m.

    Bin by bin it keeps, for each model of the last bin, the Pareto frontier of partial assignments (none other
    has FLOPs as few and a cost as low) of FLOPs at most `budget`; among assignments equal in both (to 1e-10: a
    light-share cost is flat across placements) the one with the fewest model switches, so that ties resolve to
    contiguous runs rather than to whichever came first. Returns the final frontier's FLOPs [K] (increasing) and
    costs [K] (decreasing), and a function giving the model of each bin of frontier entry k.
    """
    n_models, n_bins = cost.shape
    models = np.arange(n_models)
    total_f, total_c, total_s, last = np.zeros(1), np.zeros(1), np.zeros(1, dtype=int), np.full(1, -1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []  # per bin: (parent entry, model) of each frontier entry
    for b in range(n_bins):
        f = (total_f[:, None] + flops[None, :, b]).ravel()  # [K * M], entry-major
        c = (total_c[:, None] + cost[None, :, b]).ravel()
        s = (total_s[:, None] + ((last[:, None] != models[None, :]) & (last[:, None] >= 0))).ravel()  # switches
        model = np.tile(models, len(last))
        within = f <= budget + 1e-12  # FLOPs only grow: a partial assignment over budget stays over
        order = np.concatenate([_frontier(np.nonzero(within & (model == m))[0], f, c, s) for m in models])
        steps.append((order // n_models, model[order]))
        total_f, total_c, total_s, last = f[order], c[order], s[order], model[order]
    final = _frontier(np.arange(len(total_f)), total_f, total_c, total_s)  # across the models of the last bin

    def assignment(k: int) -> list[int]:
        k = int(final[k])
        chosen = []
        for parent, model in reversed(steps):
            chosen.append(int(model[k]))
            k = int(parent[k])
        return chosen[::-1]

    return total_f[final], total_c[final], assignment


def _frontier(idx: np.ndarray, f: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The entries of `idx` on the (FLOPs, cost) Pareto frontier, by FLOPs; ties to 1e-10 go to fewer switches."""
    c_key = np.round(c[idx], 10)
    perm = np.lexsort((s[idx], c_key, np.round(f[idx], 10)))  # by FLOPs, then cost, then switches
    c_sorted = c_key[perm]
    below = np.concatenate([[np.inf], np.minimum.accumulate(c_sorted)[:-1]])
    return idx[perm][c_sorted < below]  # strictly cheaper than everything with fewer FLOPs (or equal, earlier)


def optimise(costs: StepCosts, calibration: Calibration, bins: int, saving: float | None = None,
             tolerance: float | None = None) -> Solution:
    """The assignment of models to bins with the lowest predicted cost whose FLOPs saving is at least `saving`,
    or the largest saving whose predicted gen PPL ratio is at most 1 + `tolerance`."""
    if (saving is None) == (tolerance is None):
        raise ConfigError("give a FLOPs saving or a gen-PPL tolerance")
    check_targets([saving] if saving is not None else [], [tolerance] if tolerance is not None else [], bins,
                  "blocks-only", 1 - schedule_flops(costs, [costs.names[0]] * costs.steps))
    groups = _bins(costs.steps, bins)
    f = costs.features[calibration.feature]
    kappa = {**calibration.kappa, costs.names[-1]: 0.0}  # the heaviest model's feature is 0: any slope
    cost = np.array([[kappa.get(m, math.nan) * sum(costs.dt[i] * f[m][0, i] for i in g) for g in groups]
                     for m in costs.names])  # [M, B]; a light model without a fitted slope is never chosen
    cost = np.where(np.isnan(cost), np.inf, cost)
    share = np.array([[sum(costs.flops[m][i] for i in g) for g in groups] for m in costs.names])  # [M, B]
    _, totals, trace = _pareto_knapsack(cost, share, 1 - saving if saving is not None else np.inf)
    if saving is not None:
        k = len(totals) - 1  # the frontier's costs fall as its FLOPs rise: the cheapest within budget is the last
    else:
        k = int(np.nonzero(totals <= math.log1p(tolerance) + 1e-12)[0][0])  # all-heavy (cost 0) is always in
    assignment = trace(k)
    per_step = [costs.names[m] for b, m in enumerate(assignment) for _ in groups[b]]
    predicted = predicted_change(costs, calibration, per_step)
    return Solution(per_step, _segments(per_step), _thresholds(per_step, costs), schedule_flops(costs, per_step),
                    predicted)


def _segments(per_step: Sequence[str]) -> str:
    out, start = [], 0
    for k in range(1, len(per_step) + 1):
        if k == len(per_step) or per_step[k] != per_step[start]:
            out.append(f"{per_step[start]}:{k - start}")
            start = k
    return ",".join(out)


def _thresholds(per_step: Sequence[str], costs: StepCosts) -> str:
    """t:m1>t_a,m2>t_b,m3: a run ends at the time of the step after it (a step belongs to the run holding its
    midpoint, so the string gives back the same schedule at this T)."""
    times = costs.times
    parts, start = [], 0
    for k in range(1, len(per_step) + 1):
        if k == len(per_step) or per_step[k] != per_step[start]:
            parts.append(per_step[start] if k == len(per_step) else f"{per_step[start]}>{times[k]:.8g}")
            start = k
    return "t:" + ",".join(parts)


def kappa_text(kappa: float | Mapping[str, float]) -> str:
    """Slopes per light model, "small 1.2, medium 0.4" (a record from before per-model slopes holds one number)."""
    return f"{kappa:.3g}" if isinstance(kappa, (int, float)) else ", ".join(f"{m} {k:.3g}" for m, k in kappa.items())


def run_optimise(analysis: AnalysisDir, out: OptimiseDir, savings: Sequence[float] = (),
                 tolerances: Sequence[float] = (), bins: int = DEFAULT_BINS, flops: str = FLOPS_CONVENTIONS[0],
                 sweep: SweepDir | None = None, models: Sequence[str] = (), steps: int | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`mdlm-sched optimise`: read the analysis (and the sweep's measured schedules), solve for every saving and
    tolerance, write optimise.json; return its record."""
    if not (savings or tolerances):
        raise ConfigError("give at least one FLOPs saving (--saving 0.25) or gen-PPL tolerance (--tolerance 0.05)")
    check_targets(savings, tolerances, bins, flops)
    if steps is not None:  # None: the analysis's T
        check_steps(steps, "--steps")
    if sweep is not None and not sweep.results.is_file():
        raise ConfigError(f"--sweep {sweep.root} holds no sweep results ({sweep.results.name}); give the out folder "
                          f"of a mdlm-sched sweep, or leave --sweep out for the uncalibrated cost model")
    if not analysis.exists():
        raise ConfigError(f"{analysis.root} holds no per-step analysis ({analysis.csv.name} and {analysis.json.name})")
    check_writable(out.root, "--out")
    rows, meta = analysis.read()
    costs = step_costs(rows, meta, flops, steps, models)
    calibration = uncalibrated(costs)
    if sweep is not None:
        results = sweep.read()
        named = set(results.settings.get("models", {}))
        if named and not named >= set(costs.names):
            raise ConfigError(f"the sweep {sweep.root} sampled {', '.join(sorted(named))}, the analysis compares "
                              f"{', '.join(costs.names)}: use results of the same models")
        calibration = calibrate(costs, measured_rows(costs, results.points))
    solutions = [("saving", s, optimise(costs, calibration, bins, saving=s)) for s in savings]
    solutions += [("tolerance", x, optimise(costs, calibration, bins, tolerance=x)) for x in tolerances]
    record = {
        "models": costs.names, "steps": costs.steps, "bins": bins, "flops": flops,
        "cost_model": {"feature": calibration.feature, "kappa": calibration.kappa,
                       "kappa_low": calibration.kappa_low, "kappa_high": calibration.kappa_high,
                       "calibrated_on": len(calibration.measured), "per_feature": calibration.per_feature,
                       "unit": "delta log gen PPL" if calibration.measured else
                       f"nats per token of {calibration.feature} (uncalibrated)"},
        "measured": calibration.measured,
        "schedules": [{"target": kind, "value": value, "segments": s.segments, "thresholds": s.thresholds,
                       "flops_share": s.flops_share, "saving": 1 - s.flops_share,
                       "predicted": s.predicted[0], "predicted_low": s.predicted[1], "predicted_high": s.predicted[2]}
                      for kind, value, s in solutions],
        "analysis": str(analysis.root), "sweep": str(sweep.root) if sweep is not None else None,
    }
    atomic_write_json(out.record, record)
    echo(f"optimised over {', '.join(costs.names)} at T={costs.steps}, {bins} bins, FLOPs {flops}; cost model "
         f"{calibration.feature} x kappa {kappa_text(calibration.kappa)} ({record['cost_model']['unit']})")
    for item in record["schedules"]:
        echo(f"  {item['target']} {item['value']:g}: {item['segments']} saves {item['saving']:.1%}, predicted "
             f"{item['predicted']:+.4f} [{item['predicted_low']:+.4f}, {item['predicted_high']:+.4f}]; "
             f"{item['thresholds']}")
    return record
