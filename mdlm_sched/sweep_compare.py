"""Two sweeps of the same schedules compared point by point: what a sampler setting costs (`mdlm-sched compare`).

A sweep's sampler settings hold for all of its points (sweep.json's "shared"), so a setting such as the
latent cache is compared across two sweep folders: A (e.g. exact sampling) and B (cached). Sample i of
seed s in B is paired with sample i of seed s in A, which is sound only where both drew the same
randomness from the same models and were judged alike; the settings that make it so must agree
(PAIRING_SETTINGS), and the others are what the comparison is about. For every schedule both ran (same
segments, T and sample count): B's gen PPL over A's and B's entropy minus A's, with paired bootstrap 95%
intervals over the seeds both ran (summary.paired), B's sampling wall-clock and FLOPs over A's, each
side's MAUVE where measured, seconds per sample, and each side's gen PPL against A's all-heavy (paired).
No torch: the command and the report read these rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mdlm_sched.artifacts import SweepDir
from mdlm_sched.errors import ConfigError
from mdlm_sched.summary import paired
from mdlm_sched.sweep_records import SweepPoint

# What must agree for sample i of seed s to be the same draw, judged the same way, in both sweeps.
PAIRING_SETTINGS = ("models", "seq_len", "batch_size", "t_min", "judge", "judge_context", "token_rule",
                    "sampler_randomness")


def check_pairable(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Refuse two sweeps (their sweep.json "shared" settings) whose samples do not pair; return the settings that
    differ otherwise (what the comparison measures)."""
    for name in PAIRING_SETTINGS:
        if a.get(name) != b.get(name):
            raise ConfigError(f"the sweeps differ in {name} ({a.get(name)!r} against {b.get(name)!r}), so their "
                              f"samples do not pair; compare sweeps of the same models, judge and batches")
    return sorted(name for name in set(a) | set(b) if name not in PAIRING_SETTINGS and a.get(name) != b.get(name))


def compare_points(a: Sequence[SweepPoint], b: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """One row per schedule (segments, T, samples) both sweeps ran, B against A (see the module docstring)."""
    keyed_a: dict[tuple[str, int, int], list[SweepPoint]] = {}
    for p in a:
        keyed_a.setdefault(p.schedule_key, []).append(p)
    rows = []
    for key in dict.fromkeys(p.schedule_key for p in b):
        ours = [p for p in b if p.schedule_key == key]
        theirs = keyed_a.get(key)
        if not theirs:
            continue
        rule = ours[0].token_rule
        seeds = sorted({p.seed for p in ours} & {p.seed for p in theirs})
        row: dict[str, Any] = {"label": ours[0].label, "segments": key[0], "steps": key[1], "num_samples": key[2],
                               "token_rule": rule, **paired(ours, theirs, rule)}
        mine = [p for p in ours if p.seed in seeds]
        base = [p for p in theirs if p.seed in seeds]
        row["wall_ratio"] = float(np.mean([p.wall_s for p in mine]) / np.mean([p.wall_s for p in base])) \
            if seeds else float("nan")
        row["flops_ratio_full"] = float(np.mean([p.flops.full for p in mine]) / np.mean([p.flops.full for p in base])) \
            if seeds else float("nan")
        row["mauve"] = {side: float(np.mean([p.mauve.mean for p in pts])) if pts and all(p.mauve for p in pts)
                        else None for side, pts in (("a", base), ("b", mine))}
        row["seconds_per_sample"] = {side: float(np.mean([p.wall_s for p in pts]) / key[2]) if pts else float("nan")
                                     for side, pts in (("a", base), ("b", mine))}
        # Both sides against A's all-heavy of this T and sample count: where each stands in quality (the figure of
        # quality against sampling time puts exact, cached, scheduled and cached + scheduled on one axis).
        heavy = [p for p in a if p.all_heavy and p.schedule_key[1:] == key[1:]]
        row["against_a_heavy"] = {side: _ratio(paired(pts, heavy, rule)) for side, pts in (("a", theirs), ("b", ours))}
        row["heavy_model"] = ours[0].flops.baseline_model
        rows.append(row)
    return rows


def _ratio(result: Mapping[str, Any]) -> dict[str, Any]:
    """The gen PPL ratio of summary.paired's result with its interval and pair count (None without pairs)."""
    return {k: result.get(k) for k in ("pairs", "ppl_ratio", "ppl_ratio_low", "ppl_ratio_high")}


def compare_sweeps(a: SweepDir, b: SweepDir) -> dict[str, Any]:
    """B against A, as CompareDir's compare.json holds it: the folders, the settings that differ, the rows."""
    results = []
    for folder in (a, b):
        if not folder.results.is_file():
            raise ConfigError(f"{folder.root} holds no sweep results ({folder.results.name}); give two out folders of "
                              f"mdlm-sched sweep")
        results.append(folder.read())
    differing = check_pairable(results[0].settings, results[1].settings)
    return {"a": str(a.root), "b": str(b.root), "differing": differing,
            "rows": compare_points(results[0].points, results[1].points)}
