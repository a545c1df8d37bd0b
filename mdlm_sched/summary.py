"""Statistics of sweep results: schedules pooled over seeds and compared with their baseline by paired
bootstrap intervals, the Pareto frontier, the wall-clock spread, and the rules the pipeline decides with.

Everything here reads typed results records (sweep_records.py, through artifacts.SweepDir.read) and returns
plain rows; the report (analysis.report) renders them. No torch: the analysis package imports this module.

Conventions:
- a schedule's gen PPL is pooled over its seeds: exp(sum NLL / sum tokens) over every sample of every
  seed, under the sweep's token rule (metrics.TOKEN_RULES); entropy is the mean over every sample;
- its baseline is the all-heavy schedule of the same T and sample count; the comparison uses the seeds
  both ran, sample i of seed s paired, and gives the gen PPL ratio and the entropy difference, each with
  a paired bootstrap 95% interval (stats.py);
- a wall-clock saving is measured against the baseline timing nearest in time: each point's first batch
  against the all-heavy first batch (its points' and those timed again after the sweep's last point) whose
  UTC stamp is closest to the point's, so that a drift of the GPU over the run does not read as a saving;
  it is set against the spread of those baseline timings. A first-layout sweep without batch times
  compares whole points the same way.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mdlm_sched.errors import ConfigError
from mdlm_sched.schedule import PLACEMENTS
from mdlm_sched.stats import paired_log_ratio, paired_mean_difference
from mdlm_sched.sweep_records import UTC_FORMAT, Judged, SweepPoint, Timing


def pooled_ppl(points: Sequence[Judged], rule: str) -> float:
    """exp(sum NLL / sum tokens) over every sample of the points (seeds) under `rule`."""
    nll, tokens = zip(*(p.values(rule) for p in points))
    return math.exp(float(sum(x.sum() for x in nll)) / float(sum(x.sum() for x in tokens)))


def pareto_front(points: Iterable[tuple[float, float, Any]]) -> list[Any]:
    """Items of (cost, loss, item) not dominated by another (cheaper or equal cost and lower loss), by cost."""
    front, best = [], math.inf
    for cost, loss, item in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append(item)
            best = loss
    return front


def band_text(low: float, high: float, digits: int = 4) -> str:
    """A 95% band as "[low, high]", or "n = 1, no band" where there was too little to estimate one."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n = 1, no band"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def paired(points: Sequence[SweepPoint], base: Sequence[SweepPoint], rule: str) -> dict[str, Any]:
    """A schedule's points against its baseline's: gen PPL ratio and entropy difference with paired 95% intervals.

    Only the seeds both ran are compared; their samples must be as many on both sides.
    """
    ours, theirs = {p.seed: p for p in points}, {p.seed: p for p in base}
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return {"pairs": 0, "paired_seeds": []}
    a = [ours[s].values(rule) for s in seeds]
    b = [theirs[s].values(rule) for s in seeds]
    log_ratio, low, high = paired_log_ratio([x[0] for x in a], [x[1] for x in a], [x[0] for x in b],
                                            [x[1] for x in b])
    ent = paired_mean_difference([ours[s].per_sample.entropy for s in seeds],
                                 [theirs[s].per_sample.entropy for s in seeds])
    return {"pairs": sum(len(x[0]) for x in a), "paired_seeds": seeds,
            "ppl_ratio": math.exp(log_ratio), "ppl_ratio_low": math.exp(low), "ppl_ratio_high": math.exp(high),
            "entropy_diff": ent[0], "entropy_diff_low": ent[1], "entropy_diff_high": ent[2]}


def wall_spread(base_points: Sequence[SweepPoint], timings: Sequence[Timing]) -> dict[str, Any]:
    """The baseline's first-batch wall-clock as measured in its point and again in timing records (seconds).

    relative: (max - min) / mean of those measurements (nan with a single one): the spread a wall-clock
    saving is set against.
    """
    keys = {p.key for p in base_points}
    firsts = [p.batch_wall_s[0] for p in base_points if p.batch_wall_s]
    values = firsts + [t.wall_s for t in timings if t.key in keys]
    rel = (max(values) - min(values)) / float(np.mean(values)) if len(values) > 1 else math.nan
    return {"measurements": len(values), "first_batch_s": values, "relative": rel}


def _utc(stamp: str) -> float:
    return datetime.strptime(stamp, UTC_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def nearest_wall_saving(group: Sequence[SweepPoint], base_points: Sequence[SweepPoint],
                        timings: Sequence[Timing]) -> float:
    """1 - mean over the group's points of (its first batch / the baseline first batch nearest in UTC time); see
    the module docstring (whole points where the first layout kept no batch times). nan without a baseline time."""
    batched = all(p.batch_wall_s for p in [*group, *base_points])

    def timed(p: SweepPoint) -> tuple[float, float]:
        return _utc(p.provenance["utc"]), p.batch_wall_s[0] if batched else p.wall_s

    keys = {p.key for p in base_points}
    base = [timed(p) for p in base_points] + ([(_utc(t.utc), t.wall_s) for t in timings if t.key in keys]
                                             if batched else [])
    if not base:
        return math.nan
    ratios = [wall / min(base, key=lambda b: abs(b[0] - when))[1] for when, wall in map(timed, group)]
    return 1.0 - float(np.mean(ratios))


def summarize(points: Sequence[SweepPoint], timings: Sequence[Timing] = ()) -> list[dict[str, Any]]:
    """One row per (schedule, T, sample count): pooled over seeds, FLOPs, calls, wall-clock, and the paired
    comparison with the all-heavy baseline of the same T and sample count."""
    by_schedule: dict[tuple[str, int, int], list[SweepPoint]] = {}
    for p in points:
        by_schedule.setdefault(p.schedule_key, []).append(p)
    rows = []
    for (segments, steps, num_samples), group in by_schedule.items():
        first = group[0]
        rule = first.token_rule
        calls: Counter = Counter()
        for p in group:
            calls.update(p.flops.calls)
        mauve = [p.mauve.mean for p in group] if first.mauve is not None else []  # one per seed's point

        def mean(values: Iterable[float]) -> float:
            return float(np.mean(list(values)))

        rows.append({
            "name": f"{segments}|T{steps}|n{num_samples}", "label": first.label,
            "groups": sorted({g for p in group for g in p.groups}),
            "segments": segments, "steps": steps, "num_samples": num_samples,
            "seeds": len(group), "seed_list": sorted(p.seed for p in group), "token_rule": rule,
            "steps_per_model": first.steps_per_model, "light_fraction": first.light_fraction,
            "baseline_model": first.flops.baseline_model, "all_heavy": first.all_heavy,
            "saving_blocks_only": mean(p.flops.saving_blocks_only for p in group),
            "saving_full": mean(p.flops.saving_full for p in group),
            "saving_head_everywhere": mean(p.flops.head_everywhere_saving() for p in group),
            "flops_blocks_only": mean(p.flops.blocks_only for p in group),
            "flops_full": mean(p.flops.full for p in group),
            "calls": {k: v / len(group) for k, v in sorted(calls.items())},
            "skipped_share": mean(p.cache.skipped_share for p in group),
            "wall_s": mean(p.wall_s for p in group),
            "gen_ppl": pooled_ppl(group, rule),
            "gen_ppl_by_rule": {r: pooled_ppl(group, r) for r in first.rules},
            "entropy": mean(e for p in group for e in p.per_sample.entropy),
            "mauve": mean(mauve) if mauve else None,
            "mauve_per_seed": mauve,
            "_points": group,
        })
    for r in rows:
        r["flops_ratio"] = 1.0 - r["saving_blocks_only"]
        base = all_heavy(rows, r)
        r.update(paired(r["_points"], base["_points"], r["token_rule"]) if base else {"pairs": 0, "paired_seeds": []})
        r["wall_saving"] = nearest_wall_saving(r["_points"], base["_points"], timings) if base else math.nan
        r["wall_spread"] = wall_spread(base["_points"], timings)["relative"] if base else math.nan
    for r in rows:
        del r["_points"]
    return rows


def all_heavy(rows: Sequence[Mapping[str, Any]], like: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The all-heavy row with the same T and sample count as `like` (the baseline it is compared with)."""
    return next((r for r in rows if (r["steps"], r["num_samples"]) == (like["steps"], like["num_samples"])
                 and r["all_heavy"]), None)


def main_steps(rows: Sequence[Mapping[str, Any]]) -> int:
    """The T most rows were sampled at (the one the comparisons use)."""
    return Counter(r["steps"] for r in rows).most_common(1)[0][0]


def light_against_heavy(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The all-light row at the main T whose all-heavy baseline ran (its paired comparison is in the row)."""
    steps = main_steps(rows)
    light = next((r for r in rows if r["steps"] == steps and r["light_fraction"] == 1.0 and r["pairs"]), None)
    return light


def row_points(points: Sequence[SweepPoint], row: Mapping[str, Any]) -> list[SweepPoint]:
    """The points (one per seed) a summarize row pools."""
    return [p for p in points if p.schedule_key == (row["segments"], row["steps"], row["num_samples"])]


def placement_of(label: str) -> str | None:
    """The preset of a placement@fraction label (None for other labels)."""
    return label.partition("@")[0] if "@" in label else None


def fraction_rows(rows: Sequence[Mapping[str, Any]], placement: str) -> list[Mapping[str, Any]]:
    """Rows of `placement` at any fraction (its default-fraction row too) plus all-heavy and all-light, by share."""
    steps = Counter(r["steps"] for r in rows if placement_of(r["label"]) == placement).most_common(1)[0][0]
    chosen = [r for r in rows if r["steps"] == steps and (
        placement_of(r["label"]) == placement or r["label"] == placement
        or r["light_fraction"] in (0.0, 1.0))]
    by_share: dict[float, Mapping[str, Any]] = {}
    for r in sorted(chosen, key=lambda r: -r["seeds"] * r["num_samples"]):  # the best-measured row per share
        by_share.setdefault(r["light_fraction"], r)
    return [by_share[k] for k in sorted(by_share)]


BEST_PLACEMENT_RULE = ("the placement preset with the lowest pooled gen PPL at the group's most common T; it is "
                       "separated from the runner-up when the paired 95% interval of their gen PPL ratio excludes 1")


def best_placement(points: Sequence[SweepPoint], group: str) -> dict[str, Any]:
    """The group's best placement preset by BEST_PLACEMENT_RULE, with the runner-up and whether they separate."""
    rows = [r for r in summarize([p for p in points if group in p.groups]) if r["label"] in PLACEMENTS]
    if not rows:
        raise ConfigError(f"sweep group {group!r} has no finished placement points to choose the curve's from; "
                          f"rerun the command once they finish")
    steps = main_steps(rows)
    ranked = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["gen_ppl"])
    out = {"placement": ranked[0]["label"], "steps": steps, "rule": BEST_PLACEMENT_RULE,
           "gen_ppl": {r["label"]: r["gen_ppl"] for r in ranked}, "runner_up": None, "separated": None}
    if len(ranked) > 1:
        best, second = ranked[0], ranked[1]
        vs = paired(row_points(points, best), row_points(points, second), best["token_rule"])
        out.update(runner_up=second["label"], ratio_to_runner_up=vs.get("ppl_ratio"),
                   ratio_low=vs.get("ppl_ratio_low"), ratio_high=vs.get("ppl_ratio_high"),
                   separated=bool(vs["pairs"]) and vs["ppl_ratio_high"] < 1.0)
    return out
