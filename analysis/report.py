"""`mdlm-sched report`: figures, tables and a Markdown report from results folders alone.

A folder holding results.jsonl (a sweep) gives its section (analysis.sweep_section); a folder holding
per_step.csv and per_step.json (the per-step analysis) gives the per-step figures and the peaks table; a
folder holding optimise.json gives the optimiser's section (analysis.optimise_section); a folder holding
compare.json (`mdlm-sched compare --out`, a pipeline variant's) gives its table (analysis.compare_section), and
all of them together the figure of quality against sampling time;
a pipeline record adds the experiment (command, device, stages, training). The last section sets each
of the seed paper's claims against these numbers, with their intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis import plots
from analysis.compare_section import compare_section, quality_time_section
from analysis.optimise_section import optimise_section
from analysis.sweep_section import SweepView, ratio_text, sweep_section, verdict, wall_text
from mdlm_sched.artifacts import AnalysisDir, CompareDir, OptimiseDir, ReportDir, SweepDir
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import atomic_write_text, check_writable
from mdlm_sched.schedule import PAPER_PLACEMENTS
from mdlm_sched.stats import change_verdict
from mdlm_sched.summary import all_heavy, band_text, light_against_heavy, main_steps, paired, row_points


def _draw_per_step(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], name: str,
                   out: ReportDir) -> list[Path]:
    paths = []
    for axis in ("step", "t"):
        paths += plots.per_step_figure(rows, meta, out.figure("per_step", name, axis), axis)
    return paths


def per_step_figures(folder: Path, out: Path) -> list[Path]:
    """The per-step figure against step index and against t (PNG + PDF) from an analysis folder."""
    return _draw_per_step(*AnalysisDir(folder).read(), folder.name, ReportDir(out))


def _peak_steps(p: Mapping[str, Any]) -> str:
    """A peak's step with the interval of where the resampled curves peak (absent in older analyses)."""
    if "step_low" not in p:
        return f"{p['step']}"
    return f"{p['step']} [{p['step_low']}, {p['step_high']}]"


def _per_step_section(folder: Path, out: ReportDir) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """The analysis's report lines, its rows and its record (per_step.csv and .json)."""
    rows, meta = AnalysisDir(folder).read()
    stems = [p.stem for p in _draw_per_step(rows, meta, folder.name, out) if p.suffix == ".png"]
    s = meta["settings"]
    lines = [f"## Per-step analysis `{folder}`", "",
             f"T = {s['steps']}, {len(meta['grid_steps'])} grid steps, {meta['blocks']} masked OWT validation "
             f"blocks of {meta['seq_len']} tokens from `{s['data']}`, {s['trajectory_samples']} all-heavy "
             f"trajectories, seed {s['seed']}. {meta['conventions']}.", "",
             f"![per-step against step]({stems[0]}.png)", "", f"![per-step against t]({stems[1]}.png)", "",
             "Where each gap peaks: the grid step with the largest estimate (with the 95% interval of the step "
             "where resampled curves peak, where the analysis kept its units), its value and its 95% band:", "",
             "| states | metric | models | peak step | t | value | 95% band |", "|---|---|---|---:|---:|---:|---|"]
    for p in meta["peaks"]:
        models = f"KL({p['model'].replace('||', ' ‖ ')})" if p["metric"] == "kl" else p["model"]
        lines.append(f"| {p['source']} | {p['metric']} | {models} | {_peak_steps(p)} | {p['t']:.3f} | "
                     f"{p['mean']:.4f} | {band_text(p['ci_low'], p['ci_high'])} |")
    return lines + [""], rows, meta


MDLM_RECIPE_TOKENS = 1_000_000 * 512 * 1024  # REFERENCE.md section 2: 1M steps of 512 x 1024 tokens
MDLM_OWT_BOUND = 23.21  # MDLM's reported OWT perplexity bound (12 x 768 DiT, the recipe above)


def _experiment_section(exp: Mapping[str, Any]) -> list[str]:
    """Command, device, wall-clock per stage and what each model was trained on (from pipeline.json)."""
    prov = exp["provenance"]
    hw = prov["hardware"]
    stages = exp["stages"]
    lines = ["## Experiment", "", "Command (from the repository root):", "", "```",
             " ".join(["mdlm-sched", *prov["argv"][1:]]), "```", "",
             f"Device: {hw.get('gpu', hw['device'])}, {hw['cpu_count']} CPU cores; torch "
             f"{prov['versions'].get('torch')}, transformers {prov['versions'].get('transformers')}; git "
             f"{prov['git']}; {prov['utc']}.", "",
             "| stage | wall-clock |", "|---|---:|"]
    lines += [f"| {name} | {rec['wall_s']:.0f} s |" for name, rec in stages.items() if "wall_s" in rec]
    lines += [f"| total | {sum(rec.get('wall_s', 0.0) for rec in stages.values()):.0f} s |", ""]
    training = exp.get("training", {})
    if not training:
        return lines
    sources = list(dict.fromkeys(src for run in training.values() for src in run["val"]))
    lines += ["### Training", "",
              "Validation: perplexity bound (exp NELBO per token) for the denoisers, perplexity for the judge; "
              "the value at the last step, then the best value and its step.", "",
              "| run | arch | blocks x width | parameters | steps x batch x length | tokens seen | passes over the "
              "data | lr | tokens/s | " + " | ".join(f"val {src}: last (best @ step)" for src in sources) + " |",
              "|---|---|---|---:|---|---:|---:|---|---:|" + "---:|" * len(sources)]
    for name, run in training.items():
        vals = [f"{run['val'][src]['last']:.2f} ({run['val'][src]['best']:.2f} @ {run['val'][src]['best_step']})"
                if src in run["val"] else "" for src in sources]
        rate = "" if run["tokens_per_s"] is None else f"{run['tokens_per_s']:,.0f}"
        lines.append(f"| {name} | {run['arch']} | {run['layers']} x {run['hidden_size']} | "
                     f"{run['parameters'] / 1e6:.1f}M | {run['steps']} x {run['batch_size']} x {run['seq_len']} | "
                     f"{run['tokens_seen'] / 1e6:.1f}M | {run['passes']:.2f} | {run['lr']:g} {run['lr_schedule']}, "
                     f"warm-up {run['warmup_steps']} | {rate} | " + " | ".join(vals) + " |")
    lines.append("")
    biggest = max(run["tokens_seen"] for run in training.values())
    lines += [f"Against the MDLM recipe (REFERENCE.md section 2: 1M steps of 512 x 1024 tokens = "
              f"{MDLM_RECIPE_TOKENS:.3g} tokens per model, dropout 0.1, reaching an OWT bound of {MDLM_OWT_BOUND} "
              f"with a 12 x 768 model): the most any model here saw is {biggest:.3g} tokens, "
              f"{biggest / MDLM_RECIPE_TOKENS:.2e} of the recipe ({MDLM_RECIPE_TOKENS / max(biggest, 1):,.0f} times "
              f"fewer).", ""]
    for name, run in training.items():
        head = sources[0] if sources and sources[0] in run["val"] else None
        if head is None:
            continue
        v = run["val"][head]
        trend = (f"rose from its best {v['best']:.2f} (step {v['best_step']}) to {v['last']:.2f}: it overfits"
                 if v["last"] > v["best"] * 1.005 else f"was at its best at the end ({v['last']:.2f}): no sign "
                 f"of overfitting")
        lines.append(f"- `{name}`: {run['passes']:.2f} passes over {run['train_tokens'] / 1e6:.1f}M training tokens; "
                     f"the {head} validation {trend}.")
    curve = exp.get("fraction_curve")
    if curve:
        candidates = curve.get("gen_ppl", curve.get("gen_ppl_of_candidates", {}))
        lines += ["", f"The fraction curve follows `{curve['placement']}`, chosen by the rule: "
                      f"{curve.get('rule', 'the lowest mean gen PPL over seeds')} (T = {curve['steps']}; " +
                  ", ".join(f"{k} {v:.2f}" for k, v in candidates.items()) + ")." + _separation(curve)]
    return lines + [""]


def _separation(curve: Mapping[str, Any]) -> str:
    """Whether the chosen placement is separated from the runner-up (absent in records made before the rule)."""
    if curve.get("runner_up") is None:
        return ""
    gap = (f"{curve['placement']} / {curve['runner_up']} = {curve['ratio_to_runner_up']:.3f} "
           f"[{curve['ratio_low']:.3f}, {curve['ratio_high']:.3f}]")
    return (f" It is separated from the runner-up ({gap})." if curve["separated"] else
            f" It is **not** separated from the runner-up ({gap}): the curve could as well follow "
            f"{curve['runner_up']}.")


def _agreement(inside: bool | None) -> str:
    return {True: "**agrees**", False: "**disagrees**", None: "**is undecided**"}[inside]


def _peak_claims(meta: Mapping[str, Any], steps_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-step half of the paper's claim: does the light model's deficit peak in the middle steps?"""
    lines = []
    T, (light, heavy) = meta["settings"]["steps"], (meta["light_to_heavy"][0], meta["light_to_heavy"][-1])
    middle = (T / 4, 3 * T / 4)
    for metric, model, what in (("kl", f"{heavy}||{light}", f"KL({heavy} ‖ {light})"),
                                ("ce_gap", f"{light}-{heavy}", f"the CE gap {light} - {heavy}")):
        for source in ("masked", "trajectory"):
            peak = next((p for p in meta["peaks"] if (p["source"], p["metric"], p["model"]) ==
                         (source, metric, model)), None)
            series = sorted((r["step"], r["mean"]) for r in steps_rows
                            if (r["source"], r["metric"], r["model"]) == (source, metric, model))
            if peak is None or not series:
                continue
            low, high = peak.get("step_low", peak["step"]), peak.get("step_high", peak["step"])
            # Agreement needs the whole interval of the peak's step inside the middle half, disagreement outside.
            inside = True if middle[0] <= low and high < middle[1] else \
                False if high < middle[0] or low >= middle[1] else None
            lines.append(
                f"- Per step, {what} on {plots.SOURCE_NAME[source]} states peaks at step {_peak_steps(peak)} of {T} "
                f"(t = {peak['t']:.3f}): {peak['mean']:.4f} (95% band {band_text(peak['ci_low'], peak['ci_high'])}), "
                f"against {series[0][1]:.4f} at the first grid step and {series[-1][1]:.4f} at the last. The paper "
                f"finds the middle steps most sensitive; with the peak's step interval set against the middle half "
                f"of the steps [{middle[0]:.0f}, {middle[1]:.0f}), this {_agreement(inside)}.")
    return lines


def _placement_claims(view: SweepView) -> list[str]:
    """The sweep half: all-light worse, the middle placement worst, the lowest placement's cost and wall-clock."""
    rows, lines = view.rows, []
    steps = main_steps(rows)
    light = light_against_heavy(rows)
    if light is not None and not light["ppl_ratio_low"] > 1:
        lines.append(f"**Caveat: all-light is not measurably worse than all-heavy here ({verdict(light)}), so no "
                     f"schedule comparison below can confirm or refute the paper: the verdicts say only where these "
                     f"numbers fall.**\n")
    placed = {r["label"]: r for r in rows if r["steps"] == steps and r["label"] in PAPER_PLACEMENTS and r["pairs"]}
    if len(placed) < 2:
        return lines
    # By the ratio to all-heavy on the row's own seeds: a row swept on fewer seeds has another baseline.
    ranked = sorted(placed.values(), key=lambda r: r["ppl_ratio"])
    lines.append(f"- Placements of {round(ranked[0]['light_fraction'] * steps)} light steps at T = {steps}, lowest "
                 f"gen PPL / all-heavy [paired 95% CI] first (an order of estimates: whether one placement is "
                 f"separated from another is what their paired comparison says): " +
                 ", ".join(f"{r['label']} {ratio_text(r)}" for r in ranked) + ".")
    middle = placed.get("small-in-the-middle")
    if middle is not None:
        against = []
        for other in (r for r in ranked if r is not middle):
            vs = paired(row_points(view.points, middle), row_points(view.points, other), middle["token_rule"])
            low, high = vs["ppl_ratio_low"], vs["ppl_ratio_high"]
            against.append(f"{other['label']}: {vs['ppl_ratio']:.3f} [{low:.3f}, {high:.3f}], "
                           f"{change_verdict(low - 1, high - 1)}")
        lines.append("- The paper finds the middle steps the most sensitive, so small-in-the-middle the worst "
                     "placement. Its gen PPL against each other placement (same seeds, paired): " +
                     "; ".join(against) + ".")
    best = ranked[0]
    base = all_heavy(rows, best)
    lines.append(
        f"- The placement with the lowest ratio, {best['label']}, saves {best['saving_blocks_only']:.1%} of the "
        f"FLOPs (blocks only; "
        f"{best['saving_full']:.1%} with the head at decoded positions, {best['saving_head_everywhere']:.1%} with "
        f"the head everywhere; the paper: 16.7% for 250 of 1000 steps), for gen PPL {best['gen_ppl']:.2f} against "
        f"all-heavy's {base['gen_ppl']:.2f}: {ratio_text(best)}, {verdict(best)} (the paper: a modest cost). Entropy "
        f"{best['entropy']:.3f} against {base['entropy']:.3f}.")
    wall = best["wall_saving"] - best["saving_blocks_only"]
    if best["wall_spread"] != best["wall_spread"]:  # nan: the baseline was timed once
        claim = "the baseline was timed once, so there is no spread to judge the wall-clock saving by"
    elif abs(wall) > best["wall_spread"]:
        claim = (f"the wall-clock saves {'more' if wall > 0 else 'less'} than the FLOPs, by more than the baseline's "
                 f"timing spread (±{best['wall_spread']:.1%})")
    else:
        claim = (f"the difference from the FLOPs saving is within the baseline's timing spread "
                 f"(±{best['wall_spread']:.1%})")
    lines.append(f"- Its wall-clock saving against all-heavy is {wall_text(best)}; {claim}.")
    return lines


def _paper_section(meta: Mapping[str, Any] | None, steps_rows: Sequence[Mapping[str, Any]],
                   view: SweepView | None) -> list[str]:
    """Each of the paper's claims (REFERENCE.md section 1) set against these results, in plain words."""
    lines = ["## Against the paper (arXiv 2604.02340)", ""]
    claims = _placement_claims(view) if view is not None and view.rows else []
    caveat = [c for c in claims if c.startswith("**")]
    lines += caveat + (_peak_claims(meta, steps_rows) if meta is not None else []) + \
        [c for c in claims if not c.startswith("**")]
    return lines + [""] if len(lines) > 2 else []


def build_report(folders: Sequence[Path], out: Path, title: str = "Model scheduling report",
                 experiment: Mapping[str, Any] | None = None) -> Path:
    """Write report.md, the figures (PNG + PDF) and summary JSON for the given results folders into out.

    experiment (the pipeline's record, pipeline.json) adds the command, device, stage wall-clock and training.
    """
    if not folders:
        raise ConfigError("no results folders given; pass sweep and/or analysis output folders")
    check_writable(out, "--out")
    report = ReportDir(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if experiment is not None:
        lines += _experiment_section(experiment)
    meta, steps_rows, view, optimised, compared = None, [], None, [], []
    for folder in folders:
        sweep, analysis, optimise = SweepDir(folder), AnalysisDir(folder), OptimiseDir(folder)
        compare = CompareDir(folder)
        if not any((sweep.results.is_file(), analysis.exists(), optimise.record.is_file(), compare.record.is_file())):
            raise ConfigError(f"{folder} holds none of {sweep.results.name} (a sweep), {analysis.csv.name} and "
                              f"{analysis.json.name} (an analysis), {optimise.record.name} (the optimiser), "
                              f"{compare.record.name} (a comparison); give the out folder of mdlm-sched sweep, "
                              f"analyze, optimise or compare")
        if compare.record.is_file():
            compared.append(folder)
        if analysis.exists():
            section, steps_rows, meta = _per_step_section(folder, report)
            lines += section
        if sweep.results.is_file():
            section, view = sweep_section(folder, report)
            lines += section
        if optimise.record.is_file():
            optimised.append(folder)
    group = experiment["config"].get("optimise", {}).get("group") if experiment is not None else None
    for folder in optimised:  # after the sweeps: the section compares the sweep's schedules
        lines += optimise_section(folder, report, view, group)
    for folder in compared:
        lines += compare_section(folder)
    if compared:
        lines += quality_time_section(compared, report)
    lines += _paper_section(meta, steps_rows, view)
    atomic_write_text(report.report, "\n".join(lines) + "\n")
    return report.report
