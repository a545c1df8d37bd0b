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

from analysis import plots
from mdlm_sched.artifacts import AnalysisDir, ReportDir, SweepDir, atomic_write_text
from mdlm_sched.errors import ConfigError
from mdlm_sched.schedule import PAPER_PLACEMENTS
from mdlm_sched.summary import (all_heavy, fraction_rows, gap_and_spread, light_against_heavy, main_steps,
                                pareto_front, placement_of, summarize)


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


def _sweep_section(folder: Path, out: ReportDir) -> tuple[list[str], list[dict[str, Any]]]:
    """The sweep's report lines and its rows (summarize)."""
    results = SweepDir(folder).read()
    points, refs, settings = results.points, results.references, results.settings
    if not points:
        return [f"## Sweep `{folder}`", "", "No finished points yet.", ""], []
    rows = summarize(points)
    heavy = rows[0]["baseline_model"]
    main_t = main_steps(rows)
    main = [r for r in rows if r["steps"] == main_t]
    front = set(pareto_front((r["flops_ratio"], r["gen_ppl_mean"], r["name"]) for r in main))
    reference = None
    if refs:  # the first source of the config is the headline row (a rerun cannot change the sources)
        ref = refs[0]
        reference = {"gen_ppl": ref["gen_ppl"]["ppl"], "entropy": ref["entropy"]["mean"],
                     "num_samples": ref["num_samples"], "name": ref["name"]}
    stem = out.figure("sweep", folder.name)
    plots.sweep_figure(main, reference, sorted(front), stem, heavy)
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
        lines += ["Reference rows (real validation text, wrapped and scored exactly as samples; entropy ± s.d. "
                  "over blocks):", "",
                  "| reference | source | blocks | gen PPL (first-EOS protocol) | judge PPL, every token | entropy |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {ref['name']} | `{ref['source']}` | {ref['num_samples']} | {ref['gen_ppl']['ppl']:.2f} | "
                  f"{ref['judge_ppl_every_token']['ppl']:.2f} | "
                  f"{_fmt(ref['entropy']['mean'], ref['entropy']['sd'], 3)} |"
                  for ref in refs]
        lines.append("")
    groups = list(dict.fromkeys(g for r in rows for g in r["groups"]))
    for group in groups:
        in_group = [r for r in rows if group in r["groups"]]
        in_group.sort(key=lambda r: (r["steps"], -r["flops_ratio"], r["gen_ppl_mean"]))  # costliest first
        lines += [f"### Group `{group}`", "", *_schedule_table(in_group, front), ""]
    pair = light_against_heavy(rows)
    if pair:
        lr, base = pair
        diff, spread = gap_and_spread(lr, base)
        if math.isnan(spread):
            verdict = "compared on one seed only: there is no seed-to-seed spread to judge the difference by"
        elif diff > spread:
            verdict = "measurably worse: the difference exceeds the seed-to-seed s.d."
        else:
            verdict = ("NOT measurably worse: the difference does not exceed the seed-to-seed s.d., so the "
                       "schedule comparisons here are within noise")
        lines += ["### All-light against all-heavy", "",
                  f"At T = {main_t}: all-light gen PPL {_fmt(lr['gen_ppl_mean'], lr['gen_ppl_sd'])}, all-heavy "
                  f"{_fmt(base['gen_ppl_mean'], base['gen_ppl_sd'])}: difference {diff:+.2f}, largest seed s.d. "
                  f"{spread:.2f}. All-light is {verdict}.", ""]
    placements = Counter(placement_of(r["label"]) for r in rows if placement_of(r["label"]))
    if placements:
        placement = placements.most_common(1)[0][0]
        curve = fraction_rows(rows, placement)
        fstem = out.figure("fraction", folder.name)
        plots.fraction_figure(curve, placement, reference, fstem)
        lines += [f"### Fraction curve: `{placement}`", "", f"![fraction curve]({fstem.name}.png)", "",
                  *_schedule_table(curve, front), ""]
    if results.failures:
        lines += ["### Points that failed (not rerun successfully)", ""]
        lines += [f"- `{f['label']}` ({f['key']}): {f['error']}" for f in results.failures] + [""]
    atomic_write_text(out.summary(folder.name), json.dumps(
        {"rows": rows, "pareto": sorted(front), "reference": refs}, indent=1,
        default=lambda o: None) + "\n")
    return lines, rows


def _draw_per_step(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], name: str,
                   out: ReportDir) -> list[Path]:
    paths = []
    for axis in ("step", "t"):
        paths += plots.per_step_figure(rows, meta, out.figure("per_step", name, axis), axis)
    return paths


def per_step_figures(folder: Path, out: Path) -> list[Path]:
    """The per-step figure against step index and against t (PNG + PDF) from an analysis folder."""
    return _draw_per_step(*AnalysisDir(folder).read(), folder.name, ReportDir(out))


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
             "Where each gap peaks (grid step with the largest mean; 95% band over batches):", "",
             "| states | metric | models | peak step | t | value | 95% band |", "|---|---|---|---:|---:|---:|---|"]
    for p in meta["peaks"]:
        models = f"KL({p['model'].replace('||', ' ‖ ')})" if p["metric"] == "kl" else p["model"]
        lines.append(f"| {p['source']} | {p['metric']} | {models} | {p['step']} | {p['t']:.3f} | "
                     f"{p['mean']:.4f} | [{p['ci_low']:.4f}, {p['ci_high']:.4f}] |")
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
        lines += ["", f"The fraction curve follows `{curve['placement']}`, the placement with the lowest mean gen PPL "
                      f"at T = {curve['steps']} (" + ", ".join(f"{k} {v:.2f}" for k, v in
                                                           curve["gen_ppl_of_candidates"].items()) + ")."]
    return lines + [""]


def _verdict(agrees: bool) -> str:
    return "**agrees**" if agrees else "**disagrees**"


def _paper_section(meta: Mapping[str, Any] | None, steps_rows: Sequence[Mapping[str, Any]],
                   rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each of the paper's claims (REFERENCE.md section 1) set against these results, in plain words."""
    lines = ["## Against the paper (arXiv 2604.02340)", ""]
    if meta is not None:
        T, (light, heavy) = meta["settings"]["steps"], (meta["light_to_heavy"][0], meta["light_to_heavy"][-1])
        for metric, model, what in (("kl", f"{heavy}||{light}", f"KL({heavy} ‖ {light})"),
                                    ("ce_gap", f"{light}-{heavy}", f"the CE gap {light} - {heavy}")):
            for source in ("masked", "trajectory"):
                peak = next((p for p in meta["peaks"] if (p["source"], p["metric"], p["model"]) ==
                             (source, metric, model)), None)
                series = sorted((r["step"], r["mean"]) for r in steps_rows
                                if (r["source"], r["metric"], r["model"]) == (source, metric, model))
                if peak is None or not series:
                    continue
                middle = T / 4 <= peak["step"] < 3 * T / 4
                lines.append(
                    f"- Per step, {what} on {plots.SOURCE_NAME[source]} states peaks at step {peak['step']} of {T} "
                    f"(t = {peak['t']:.3f}): {peak['mean']:.4f} [95% {peak['ci_low']:.4f}, {peak['ci_high']:.4f}], "
                    f"against {series[0][1]:.4f} at the first grid step and {series[-1][1]:.4f} at the last. "
                    f"The paper finds the middle steps most sensitive; a peak "
                    f"{'inside' if middle else 'outside'} the middle half of the steps {_verdict(middle)}.")
    if rows:
        steps = main_steps(rows)
        placed = {r["label"]: r for r in rows if r["steps"] == steps and r["label"] in PAPER_PLACEMENTS}
        pair = light_against_heavy(rows)
        if pair:
            gap, spread = gap_and_spread(*pair)
            light, base = pair
            if not gap > spread:  # (a nan spread, one seed, measures nothing either)
                lines.insert(2, f"**Caveat: all-light ({_fmt(light['gen_ppl_mean'], light['gen_ppl_sd'])}) is not "
                                f"measurably worse than all-heavy ({_fmt(base['gen_ppl_mean'], base['gen_ppl_sd'])}) "
                                f"here, so no schedule comparison below can confirm or refute the paper: the "
                                f"verdicts say only where these numbers fall.**\n")
        if len(placed) >= 2:
            ranked = sorted(placed.values(), key=lambda r: r["gen_ppl_mean"])
            worst, runner_up = ranked[-1], ranked[-2]
            gap, spread = gap_and_spread(worst, runner_up)
            measurable = "exceeds" if gap > spread else "does not exceed"
            lines.append(
                f"- Placements at T = {steps}, best to worst by gen PPL: " + ", ".join(
                    f"{r['label']} {_fmt(r['gen_ppl_mean'], r['gen_ppl_sd'])}" for r in ranked) +
                f". The paper puts the light model's steps at the ends and finds the middle worst; here the worst "
                f"is {worst['label']} ({_verdict(worst['label'] == 'small-in-the-middle')}), {gap:.2f} above the "
                f"next, which {measurable} the seed-to-seed s.d. ({spread:.2f}).")
            best = ranked[0]
            base = all_heavy(rows, best)
            if base is not None:
                cost = best["gen_ppl_mean"] / base["gen_ppl_mean"] - 1
                lines.append(
                    f"- The best placement, {best['label']}, saves {best['saving_blocks_only']:.1%} of the FLOPs "
                    f"(blocks only; {best['saving_full']:.1%} full; the paper: 16.7% for 250 of 1000 steps) and "
                    f"{best['wall_saving']:.1%} of the wall-clock, for gen PPL "
                    f"{_fmt(best['gen_ppl_mean'], best['gen_ppl_sd'])} against all-heavy "
                    f"{_fmt(base['gen_ppl_mean'], base['gen_ppl_sd'])} ({cost:+.1%}; the paper: "
                    f"a modest cost). Entropy {_fmt(best['entropy_mean'], best['entropy_sd'], 3)} against "
                    f"{_fmt(base['entropy_mean'], base['entropy_sd'], 3)}.")
    return lines + [""] if len(lines) > 2 else []


def build_report(folders: Sequence[Path], out: Path, title: str = "Model scheduling report",
                 experiment: Mapping[str, Any] | None = None) -> Path:
    """Write report.md, the figures (PNG + PDF) and summary JSON for the given results folders into out.

    experiment (the pipeline's record, pipeline.json) adds the command, device, stage wall-clock and training.
    """
    if not folders:
        raise ConfigError("no results folders given; pass sweep and/or analysis output folders")
    report = ReportDir(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if experiment is not None:
        lines += _experiment_section(experiment)
    meta, steps_rows, rows = None, [], []
    for folder in folders:
        sweep, analysis = SweepDir(folder), AnalysisDir(folder)
        if not (sweep.results.is_file() or analysis.exists()):
            raise ConfigError(f"{folder} holds neither {sweep.results.name} (a sweep) nor {analysis.csv.name} and "
                              f"{analysis.json.name} (an analysis); give the out folder of mdlm-sched sweep or analyze")
        if analysis.exists():
            section, steps_rows, meta = _per_step_section(folder, report)
            lines += section
        if sweep.results.is_file():
            section, rows = _sweep_section(folder, report)
            lines += section
    lines += _paper_section(meta, steps_rows, rows)
    atomic_write_text(report.report, "\n".join(lines) + "\n")
    return report.report
