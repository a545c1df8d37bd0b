"""`mdlm-sched report`: figures, tables and a Markdown report from results folders alone.

A folder holding results.jsonl (a sweep) gives the FLOPs-vs-gen-PPL figure with its entropy
panel, the per-group tables, the fraction curve and the exhaustive-search ranking; a folder holding
per_step.csv (the per-step analysis) gives the per-step figures and the peaks table. Points of a
schedule are aggregated over seeds: mean and sample standard deviation (error bars are +-1 s.d.).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import plots
from analysis.per_step import read_rows
from analysis.results import mean_sd, pareto_front, read_jsonl
from analysis.sweep import FAILURES, RESULTS, SETTINGS
from mdlm_sched.checkpoint import atomic_write_text
from mdlm_sched.errors import ConfigError


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
        calls = Counter()
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
        base = _all_heavy(rows, r)
        r["wall_saving"] = 1.0 - r["wall_s_mean"] / base["wall_s_mean"] if base else math.nan
    return rows


def _all_heavy(rows: Sequence[Mapping[str, Any]], like: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The all-heavy row with the same T and sample count as `like` (the wall-clock baseline)."""
    for r in rows:
        if (r["steps"], r["num_samples"]) == (like["steps"], like["num_samples"]) and \
                set(r["steps_per_model"]) == {r["baseline_model"]}:
            return r
    return None


def _fmt(mean: float, sd: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _schedule_table(rows: Sequence[Mapping[str, Any]], front: set[str]) -> list[str]:
    lines = ["| schedule | segments | light share | FLOPs saved (blocks only) | FLOPs saved (full) | calls per model "
             "| wall-clock s | wall-clock saved | gen PPL | entropy | seeds x samples | Pareto |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        calls = ", ".join(f"{k} {v:.0f}" for k, v in r["calls"].items())
        wall_saving = "" if math.isnan(r["wall_saving"]) else f"{r['wall_saving']:.1%}"
        lines.append(f"| {r['label']} | {r['segments']} | {r['light_fraction']:.3f} | {r['saving_blocks_only']:.2%} | "
                     f"{r['saving_full']:.2%} | {calls} | {_fmt(r['wall_s_mean'], r['wall_s_sd'], 1)} | "
                     f"{wall_saving} | {_fmt(r['gen_ppl_mean'], r['gen_ppl_sd'])} | "
                     f"{_fmt(r['entropy_mean'], r['entropy_sd'], 3)} | {r['seeds']} x {r['num_samples']} | "
                     f"{'yes' if r['name'] in front else ''} |")
    return lines


def _placement_of(label: str) -> str | None:
    return label.partition("@")[0] if "@" in label else None


def fraction_rows(rows: Sequence[Mapping[str, Any]], placement: str) -> list[Mapping[str, Any]]:
    """Rows of `placement` at any fraction (its default-fraction row too) plus all-heavy and all-light, by share."""
    steps = Counter(r["steps"] for r in rows if _placement_of(r["label"]) == placement).most_common(1)[0][0]
    chosen = [r for r in rows if r["steps"] == steps and (
        _placement_of(r["label"]) == placement or r["label"] == placement
        or r["light_fraction"] in (0.0, 1.0))]
    by_share: dict[float, Mapping[str, Any]] = {}
    for r in sorted(chosen, key=lambda r: -r["seeds"] * r["num_samples"]):  # the best-measured row per share
        by_share.setdefault(r["light_fraction"], r)
    return [by_share[k] for k in sorted(by_share)]


def _sweep_section(folder: Path, out: Path) -> list[str]:
    records = read_jsonl(folder / RESULTS)
    points = [r for r in records if r["kind"] == "point"]
    refs = [r for r in records if r["kind"] == "reference"]
    if not points:
        return [f"## Sweep `{folder}`", "", "No finished points yet.", ""]
    rows = summarize(points)
    heavy = rows[0]["baseline_model"]
    main_steps = Counter(r["steps"] for r in rows).most_common(1)[0][0]
    main = [r for r in rows if r["steps"] == main_steps]
    front = set(pareto_front((r["flops_ratio"], r["gen_ppl_mean"], r["name"]) for r in main))
    reference = None
    if refs:
        ref = refs[-1]
        reference = {"gen_ppl": ref["gen_ppl"]["ppl"], "entropy": ref["entropy"]["mean"],
                     "num_samples": ref["num_samples"]}
    stem = out / f"sweep_{folder.name}"
    plots.sweep_figure(main, reference, sorted(front), stem, heavy)
    settings = json.loads((folder / SETTINGS).read_text())["shared"] if (folder / SETTINGS).is_file() else {}
    prov = points[0]["provenance"]
    per_forward = points[0]["flops"]["per_forward_one_sequence"]
    lines = [f"## Sweep `{folder}`", "",
             f"Models: {', '.join(f'`{k}` = {v}' for k, v in settings.get('models', {}).items())}; judge: "
             f"`{points[0]['gen_ppl']['judge']}`; sampler batch {settings.get('batch_size')}, top-p "
             f"{settings.get('top_p')}, cache {settings.get('cache')}. Measured on "
             f"{prov['hardware'].get('gpu', prov['hardware']['device'])}, git {prov['git']}.", "",
             "FLOPs of one forward over one sequence: " + ", ".join(
                 f"`{k}` {v['blocks_only']:.3e} (blocks only) / {v['full']:.3e} (full)" for k, v in per_forward.items())
             + ". Sampling FLOPs count the calls actually made (cached steps cost nothing); \"full\" adds the "
               "output head at the positions decoded and the time embedding.", "",
             f"![FLOPs against gen PPL]({stem.name}.png)", "",
             "Gen PPL: judge NLL summed in float64 over tokens up to and including each sample's first EOS, "
             "chunks of the judge's context; entropy: unigram entropy of each sample's tokens (nats), mean over "
             "samples. Mean ± s.d. over seeds.", ""]
    if refs:
        ref = refs[-1]
        lines += ["Reference (real text, wrapped and scored exactly as samples):", "",
                  "| source | blocks | gen PPL (first-EOS protocol) | judge PPL, every token | entropy |",
                  "|---|---:|---:|---:|---:|",
                  f"| {ref['source']} | {ref['num_samples']} | {ref['gen_ppl']['ppl']:.2f} | "
                  f"{ref['judge_ppl_every_token']['ppl']:.2f} | "
                  f"{_fmt(ref['entropy']['mean'], ref['entropy']['sd'], 3)} (s.d. over blocks) |", ""]
    groups = list(dict.fromkeys(g for r in rows for g in r["groups"]))
    for group in groups:
        in_group = [r for r in rows if group in r["groups"]]
        in_group.sort(key=lambda r: (r["steps"], -r["flops_ratio"], r["gen_ppl_mean"]))  # costliest first
        lines += [f"### Group `{group}`", "", *_schedule_table(in_group, front), ""]
    light_rows = [r for r in main if r["light_fraction"] == 1.0]
    base = _all_heavy(main, main[0])
    if light_rows and base:
        lr = light_rows[0]
        diff = lr["gen_ppl_mean"] - base["gen_ppl_mean"]
        spread = max(lr["gen_ppl_sd"], base["gen_ppl_sd"])
        if math.isnan(spread):
            verdict = "compared on one seed only: there is no seed-to-seed spread to judge the difference by"
        elif diff > spread:
            verdict = "measurably worse: the difference exceeds the seed-to-seed s.d."
        else:
            verdict = ("NOT measurably worse: the difference does not exceed the seed-to-seed s.d., so the "
                       "schedule comparisons here are within noise")
        lines += ["### All-light against all-heavy", "",
                  f"At T = {main_steps}: all-light gen PPL {_fmt(lr['gen_ppl_mean'], lr['gen_ppl_sd'])}, all-heavy "
                  f"{_fmt(base['gen_ppl_mean'], base['gen_ppl_sd'])}: difference {diff:+.2f}, largest seed s.d. "
                  f"{spread:.2f}. All-light is {verdict}.", ""]
    placements = Counter(_placement_of(r["label"]) for r in rows if _placement_of(r["label"]))
    if placements:
        placement = placements.most_common(1)[0][0]
        curve = fraction_rows(rows, placement)
        fstem = out / f"fraction_{folder.name}"
        plots.fraction_figure(curve, placement, reference, fstem)
        lines += [f"### Fraction curve: `{placement}`", "", f"![fraction curve]({fstem.name}.png)", "",
                  *_schedule_table(curve, front), ""]
    failures = [f for f in read_jsonl(folder / FAILURES) if f["key"] not in {p["key"] for p in points}]
    if failures:
        lines += ["### Points that failed (not rerun successfully)", ""]
        lines += [f"- `{f['label']}` ({f['key']}): {f['error']}" for f in failures] + [""]
    atomic_write_text(out / f"summary_{folder.name}.json", json.dumps(
        {"rows": rows, "pareto": sorted(front), "reference": refs[-1] if refs else None}, indent=1,
        default=lambda o: None) + "\n")
    return lines


def per_step_figures(folder: Path, out: Path) -> list[Path]:
    """The per-step figure against step index and against t (PNG + PDF) from an analysis folder."""
    rows = read_rows(folder / "per_step.csv")
    meta = json.loads((folder / "per_step.json").read_text())
    paths = []
    for axis in ("step", "t"):
        paths += plots.per_step_figure(rows, meta, out / f"per_step_{folder.name}_{axis}", axis)
    return paths


def _per_step_section(folder: Path, out: Path) -> list[str]:
    meta = json.loads((folder / "per_step.json").read_text())
    stems = [p.stem for p in per_step_figures(folder, out) if p.suffix == ".png"]
    s = meta["settings"]
    lines = [f"## Per-step analysis `{folder}`", "",
             f"T = {s['steps']}, {len(meta['grid_steps'])} grid steps, {meta['blocks']} masked OWT validation "
             f"blocks of {meta['seq_len']} tokens from `{s['data']}`, {s['trajectory_samples']} all-heavy "
             f"trajectories, seed {s['seed']}. {meta['conventions']}.", "",
             f"![per-step against step]({stems[0]}.png)", "", f"![per-step against t]({stems[1]}.png)", "",
             "Where each gap peaks (grid step with the largest mean; 95% band over batches):", "",
             "| states | metric | models | peak step | t | value | 95% band |", "|---|---|---|---:|---:|---:|---|"]
    for p in meta["peaks"]:
        models = f"KL({p['model'].replace('||', ' ‖ ')})" if p["metric"] == "kl" else p["model"]
        lines.append(f"| {p['source']} | {p['metric']} | {models} | {p['step']} | {p['t']:.3f} | "
                     f"{p['mean']:.4f} | [{p['ci_low']:.4f}, {p['ci_high']:.4f}] |")
    return lines + [""]


def build_report(folders: Sequence[Path], out: Path, title: str = "Model scheduling report") -> Path:
    """Write report.md, the figures (PNG + PDF) and summary JSON for the given results folders into out."""
    if not folders:
        raise ConfigError("no results folders given; pass sweep and/or analysis output folders")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    for folder in folders:
        has_sweep, has_steps = (folder / RESULTS).is_file(), (folder / "per_step.csv").is_file()
        if not (has_sweep or has_steps):
            raise ConfigError(f"{folder} holds neither {RESULTS} (a sweep) nor per_step.csv (an analysis); "
                              f"give the out folder of mdlm-sched sweep or analyze")
        if has_steps:
            lines += _per_step_section(folder, out)
        if has_sweep:
            lines += _sweep_section(folder, out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
