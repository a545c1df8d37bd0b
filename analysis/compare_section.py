"""The Markdown table of two sweeps compared point by point (mdlm_sched.sweep_compare; `mdlm-sched compare`), the
report's section made from a saved comparison, and the figure of quality against sampling time over several."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis import plots
from analysis.sweep_section import ratio_text
from mdlm_sched.artifacts import CompareDir, ReportDir
from mdlm_sched.stats import change_verdict


def _mauve(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison_lines(rows: Sequence[Mapping[str, Any]], differing: Sequence[str], a: str, b: str) -> list[str]:
    """Report lines: what differs between the sweeps, then one row per schedule both ran (B against A)."""
    lines = [f"B = `{b}` against A = `{a}`; settings that differ: {', '.join(differing) or 'none'}. Sample i of seed s "
             f"is paired across the sweeps (same models, judge, batches and sampler randomness); intervals are paired "
             f"bootstrap 95% intervals over the seeds both ran. Wall-clock: B's sampling time over A's, two runs at "
             f"different times (no shared baseline timing).", "",
             "| schedule | T | pairs | gen PPL B / A [95% CI] | verdict | entropy B − A [95% CI] | wall-clock B / A | "
             "FLOPs B / A (full) | MAUVE A / B |", "|---|---:|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        if r["pairs"]:
            verdict = change_verdict(r["ppl_ratio_low"] - 1, r["ppl_ratio_high"] - 1)
            entropy = f"{r['entropy_diff']:+.3f} [{r['entropy_diff_low']:+.3f}, {r['entropy_diff_high']:+.3f}]"
        else:
            verdict, entropy = "no seeds in common", "-"
        lines.append(f"| {r['label']} | {r['steps']} | {r['pairs']} | {ratio_text(r) if r['pairs'] else '-'} | "
                     f"{verdict} | {entropy} | {r['wall_ratio']:.3f} | {r['flops_ratio_full']:.3f} | "
                     f"{_mauve(r['mauve']['a'])} / {_mauve(r['mauve']['b'])} |")
    if not rows:
        lines.append("| (no schedule ran in both sweeps with the same T and sample count) | | | | | | | | |")
    return lines


def compare_section(folder: Path) -> list[str]:
    """A report section from a CompareDir folder (`mdlm-sched compare --out`, or a pipeline variant's)."""
    record = CompareDir(folder).read()
    return [f"## Sampler settings compared: `{record['b']}` against `{record['a']}`", "",
            *comparison_lines(record["rows"], record["differing"], record["a"], record["b"]), ""]


def setting_name(folder: Path) -> str:
    """What a comparison's B is called on the figure: its folder's name (for .../<name>/compare, a pipeline
    variant's folder, the variant's name)."""
    return folder.parent.name if folder.name == "compare" else folder.name


def quality_time_section(folders: Sequence[Path], out: ReportDir) -> list[str]:
    """The figure of gen PPL against seconds per sample for A's schedules (the exact sampler, once) and each
    comparison's B, all against A's all-heavy; empty where the comparisons' records predate those numbers."""
    records = [(setting_name(f), CompareDir(f).read()) for f in folders]
    points: dict[tuple[str, str, int], dict[str, Any]] = {}
    for name, record in records:
        for r in record["rows"]:
            for side, setting in (("a", "exact"), ("b", name)):
                ratio = r.get("against_a_heavy", {}).get(side)
                if ratio and ratio["pairs"]:
                    points.setdefault((setting, r["label"], r["steps"]), {
                        "setting": setting, "label": f"{r['label']} T={r['steps']}",
                        "seconds": r["seconds_per_sample"][side], **ratio})
    if not points:
        return []
    stem = out.figure("quality_time", "compared")
    heavy = next(r["heavy_model"] for _, record in records for r in record["rows"] if "heavy_model" in r)
    plots.quality_time_figure(list(points.values()), stem, heavy)
    lines = ["## Quality against sampling time", "",
             f"Gen PPL over the exact sampler's all-{heavy} (paired 95% CI over the same seeds and samples) against "
             f"sampling wall-clock per sample, for the exact sampler's schedules and those of each setting compared "
             f"with it ({', '.join(name for name, _ in records)}).", "",
             f"![quality against sampling time]({stem.name}.png)", "",
             f"| setting | schedule | pairs | s per sample | gen PPL / exact all-{heavy} [95% CI] |",
             "|---|---|---:|---:|---|"]
    for p in sorted(points.values(), key=lambda p: p["seconds"]):
        lines.append(f"| {p['setting']} | {p['label']} | {p['pairs']} | {p['seconds']:.4f} | {p['ppl_ratio']:.3f} "
                     f"[{p['ppl_ratio_low']:.3f}, {p['ppl_ratio_high']:.3f}] |")
    return lines + [""]
