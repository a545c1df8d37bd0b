"""Statistics of sweep results: schedules pooled over seeds, the baselines they are compared with,
the Pareto frontier, and the rules the pipeline decides with (which placement gets a fraction curve).

Everything here reads results records (artifacts.SweepDir.read) and returns plain rows; the
report (analysis.report) renders them. No torch: the analysis package imports this module.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mdlm_sched.errors import ConfigError
from mdlm_sched.schedule import PLACEMENTS


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def pareto_front(points: Iterable[tuple[float, float, Any]]) -> list[Any]:
    """Items of (cost, loss, item) not dominated by another (cheaper or equal cost and lower loss), by cost."""
    front, best = [], math.inf
    for cost, loss, item in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append(item)
            best = loss
    return front


def summarize(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (schedule, T, sample count): means and s.d. over seeds, FLOPs, calls, wall-clock."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        by_name.setdefault(f"{p['segments']}|T{p['steps']}|n{p['num_samples']}", []).append(p)
    rows = []
    for name, group in by_name.items():
        first = group[0]
        ppl = mean_sd([p["gen_ppl"]["ppl"] for p in group])
        ent = mean_sd([p["entropy"]["mean"] for p in group])
        wall = mean_sd([p["wall_s"] for p in group])
        calls: Counter = Counter()
        for p in group:
            calls.update(p["flops"]["calls"])

        def avg(section: str, key: str) -> float:
            return float(np.mean([p[section][key] for p in group]))

        rows.append({
            "name": name, "label": first["label"], "groups": sorted({g for p in group for g in p["groups"]}),
            "segments": first["segments"], "steps": first["steps"], "num_samples": first["num_samples"],
            "seeds": len(group), "seed_list": sorted(p["seed"] for p in group),
            "steps_per_model": first["steps_per_model"], "light_fraction": first["light_fraction"],
            "baseline_model": first["flops"]["baseline_model"],
            "saving_blocks_only": avg("flops", "saving_blocks_only"),
            "saving_full": avg("flops", "saving_full"),
            "flops_blocks_only": avg("flops", "blocks_only"),
            "flops_full": avg("flops", "full"),
            "calls": {k: v / len(group) for k, v in sorted(calls.items())},
            "skipped_share": avg("cache", "skipped_share"),
            "wall_s_mean": wall[0], "wall_s_sd": wall[1],
            "gen_ppl_mean": ppl[0], "gen_ppl_sd": ppl[1], "entropy_mean": ent[0], "entropy_sd": ent[1],
        })
    for r in rows:
        r["flops_ratio"] = 1.0 - r["saving_blocks_only"]
        base = all_heavy(rows, r)
        r["wall_saving"] = 1.0 - r["wall_s_mean"] / base["wall_s_mean"] if base else math.nan
    return rows


def all_heavy(rows: Sequence[Mapping[str, Any]], like: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The all-heavy row with the same T and sample count as `like` (the baseline it is compared with)."""
    for r in rows:
        if (r["steps"], r["num_samples"]) == (like["steps"], like["num_samples"]) and \
                set(r["steps_per_model"]) == {r["baseline_model"]}:
            return r
    return None


def main_steps(rows: Sequence[Mapping[str, Any]]) -> int:
    """The T most rows were sampled at (the one the comparisons use)."""
    return Counter(r["steps"] for r in rows).most_common(1)[0][0]


def light_against_heavy(rows: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """(all-light row, all-heavy row of the same T and sample count) at the main T, if both ran."""
    steps = main_steps(rows)
    light = next((r for r in rows if r["steps"] == steps and r["light_fraction"] == 1.0), None)
    base = all_heavy(rows, light) if light is not None else None
    return (light, base) if base is not None else None


def gap_and_spread(worse: Mapping[str, Any], better: Mapping[str, Any]) -> tuple[float, float]:
    """Gen-PPL difference worse - better, and the larger of their seed-to-seed s.d. (nan with one seed)."""
    return worse["gen_ppl_mean"] - better["gen_ppl_mean"], max(worse["gen_ppl_sd"], better["gen_ppl_sd"])


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


def best_placement(points: Sequence[Mapping[str, Any]], group: str) -> tuple[str, int, dict[str, float]]:
    """(placement, T, mean gen PPL of each candidate) of the group's placement presets at its most common T.

    The rule: the candidate with the lowest gen PPL pooled over seeds wins.
    """
    rows = [r for r in summarize(points) if group in r["groups"] and r["label"] in PLACEMENTS]
    if not rows:
        raise ConfigError(f"sweep group {group!r} has no finished placement points to choose the curve's from; "
                          f"rerun the command once they finish")
    steps = main_steps(rows)
    ppl = {r["label"]: r["gen_ppl_mean"] for r in rows if r["steps"] == steps}
    return min(ppl, key=ppl.get), steps, ppl
