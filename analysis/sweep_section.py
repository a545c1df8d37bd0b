"""The report's section on one sweep: conventions, reference rows, one table per group, all-light against
all-heavy, the fraction curve, failures; and the figures (FLOPs against gen PPL, the fraction curve).

Every comparison is the paired one of mdlm_sched.summary: a schedule's gen PPL as a ratio to all-heavy's
with its 95% interval, its entropy as a difference with its interval, and a verdict only where the
interval excludes no change.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis import plots
from mdlm_sched.artifacts import ReportDir, SweepDir
from mdlm_sched.fileio import atomic_write_text
from mdlm_sched.stats import RESAMPLES, change_verdict, pooled_ppl_interval
from mdlm_sched.summary import fraction_rows, light_against_heavy, main_steps, pareto_front, placement_of, summarize
from mdlm_sched.sweep_records import PPLSummary, ReferenceRow, SweepPoint

RULE_TEXT = {
    "mdlm": "MDLM's token rule: every judged token that is not EOS (the rule of MDLM's, Duo's and ReMDM's code, "
            "so comparable with their numbers)",
    "first-eos": "the first-EOS rule: the judged tokens up to and including each sample's first EOS (not "
                 "comparable with published MDLM numbers)",
    "every-token": "every judged token",
}


SECOND_RULE = "first-eos"  # the second gen PPL column of the schedule tables (this project's first rule)


def ratio_text(r: Mapping[str, Any]) -> str:
    """"1.042 [0.998, 1.089]": a row's gen PPL ratio to all-heavy with its paired 95% interval."""
    if not r.get("pairs"):
        return "no all-heavy run of these seeds and samples"
    return f"{r['ppl_ratio']:.3f} [{r['ppl_ratio_low']:.3f}, {r['ppl_ratio_high']:.3f}]"


def entropy_text(r: Mapping[str, Any]) -> str:
    if not r.get("pairs"):
        return ""
    return f"{r['entropy_diff']:+.3f} [{r['entropy_diff_low']:+.3f}, {r['entropy_diff_high']:+.3f}]"


def verdict(r: Mapping[str, Any]) -> str:
    """What the row's paired interval supports about its gen PPL against all-heavy."""
    return change_verdict(r["ppl_ratio_low"] - 1, r["ppl_ratio_high"] - 1) if r.get("pairs") else "not compared"


def mauve_text(r: Mapping[str, Any]) -> str:
    """MAUVE against the reference text, the mean over seeds with the lowest and highest seed's ("—" if none)."""
    if r.get("mauve") is None:
        return "—"
    per_seed = r["mauve_per_seed"]
    return f"{r['mauve']:.3f}" + (f" [{min(per_seed):.3f}, {max(per_seed):.3f}]" if len(per_seed) > 1 else "")


def wall_text(r: Mapping[str, Any]) -> str:
    """The wall-clock saving against all-heavy, with the baseline's timing spread."""
    if math.isnan(r["wall_saving"]):
        return ""
    spread = "" if math.isnan(r["wall_spread"]) else f" (±{r['wall_spread']:.1%})"
    return f"{r['wall_saving']:.1%}{spread}"


def _schedule_table(rows: Sequence[Mapping[str, Any]], front: set[str]) -> list[str]:
    """Rows of one token rule; a second gen PPL column under the first-EOS rule where the points kept it."""
    second = SECOND_RULE if rows and rows[0]["token_rule"] != SECOND_RULE else None
    with_mauve = any(r.get("mauve") is not None for r in rows)
    lines = ["| schedule | segments | light share | FLOPs saved: blocks only / head at decoded / head everywhere | "
             "calls per model | wall-clock s | wall-clock saved (± baseline spread) | "
             f"gen PPL ({rows[0]['token_rule']}) " + (f"| gen PPL ({second}) " if second else "")
             + "| gen PPL / all-heavy [95% CI] | entropy | entropy − all-heavy [95% CI] | "
             + ("MAUVE, mean [lowest, highest seed] | " if with_mauve else "") + "seeds × samples | Pareto |",
             "|---|---|---:|---|---|---:|---:|---:|" + ("---:|" if second else "") + "---|---:|---|"
             + ("---|" if with_mauve else "") + "---:|:-:|"]
    for r in rows:
        calls = ", ".join(f"{k} {v:.0f}" for k, v in r["calls"].items())
        other = r.get("gen_ppl_by_rule", {}).get(second)
        second_cell = (f"{other:.2f} | " if other is not None else "— | ") if second else ""
        lines.append(f"| {r['label']} | {r['segments']} | {r['light_fraction']:.3f} | {r['saving_blocks_only']:.2%} "
                     f"/ {r['saving_full']:.2%} / {r['saving_head_everywhere']:.2%} | {calls} | {r['wall_s']:.1f} | "
                     f"{wall_text(r)} | {r['gen_ppl']:.2f} | {second_cell}{'—' if r['all_heavy'] else ratio_text(r)} | "
                     f"{r['entropy']:.3f} | {'—' if r['all_heavy'] else entropy_text(r)} | "
                     + (f"{mauve_text(r)} | " if with_mauve else "")
                     + f"{r['seeds']} × {r['num_samples']} | {'yes' if r['name'] in front else ''} |")
    return lines


@dataclass
class SweepView:
    """What the paper section needs of a sweep: its rows, its points and its headline reference."""

    rows: list[dict[str, Any]]
    points: list[SweepPoint]
    reference: dict[str, Any] | None


def _reference_lines(refs: Sequence[ReferenceRow]) -> tuple[list[str], dict[str, Any] | None]:
    if not refs:
        return [], None
    rule = refs[0].token_rule
    lines = ["Reference rows (real validation text, wrapped and scored exactly as samples; 95% CI over blocks; "
             "entropy ± s.d. over blocks):", "",
             f"| reference | source | blocks | gen PPL ({rule}) [95% CI] | gen PPL (first-EOS) | judge PPL, every "
             f"token | entropy |", "|---|---|---:|---:|---:|---:|---:|"]
    for ref in refs:
        ppl, low, high = pooled_ppl_interval(*ref.values(rule))
        first_eos, every = (ref.gen_ppl_rules.get(r) for r in ("first-eos", "every-token"))
        lines.append(f"| {ref.name} | `{ref.source}` | {ref.num_samples} | {ppl:.2f} [{low:.2f}, {high:.2f}] "
                     f"| {_ppl_text(first_eos)} | {_ppl_text(every)} | {ref.entropy.mean:.3f} ± {ref.entropy.sd:.3f} |")
    head = refs[0]
    return lines + [""], {"gen_ppl": head.gen_ppl.ppl, "entropy": head.entropy.mean,
                          "num_samples": head.num_samples, "name": head.name}


def _ppl_text(gen: PPLSummary | None) -> str:
    return "not measured" if gen is None else f"{gen.ppl:.2f}"


def _mauve_sentence(points: Sequence[SweepPoint]) -> str:
    """How MAUVE was measured, from the first point that has it ("" where none has)."""
    m = next((p.mauve for p in points if p.mauve is not None), None)
    if m is None:
        return ""
    return (f" MAUVE (mauve-text): each point's {m.samples} samples against {m.reference_samples} reference texts "
            f"(the {m.features}), the mean over {len(m.values)} k-means seeds; a row gives the mean over its seeds' "
            f"points and the lowest and highest of them.")


def sweep_section(folder: Path, out: ReportDir) -> tuple[list[str], SweepView]:
    """The sweep's report lines, figures and summary JSON; and what the paper section needs of it."""
    results = SweepDir(folder).read()
    points, settings = results.points, results.settings
    if not points:  # the reference rows run first: a sweep cut short may hold them alone
        ref_lines, _ = _reference_lines(results.references)
        return [f"## Sweep `{folder}`", "", "No finished points yet.", "", *ref_lines], SweepView([], [], None)
    rows = summarize(points, results.timings)
    rule = rows[0]["token_rule"]
    heavy = rows[0]["baseline_model"]
    main_t = main_steps(rows)
    main = [r for r in rows if r["steps"] == main_t]
    front = set(pareto_front((r["flops_ratio"], r["gen_ppl"], r["name"]) for r in main))
    ref_lines, reference = _reference_lines(results.references)
    stem = out.figure("sweep", folder.name)
    plots.sweep_figure(main, reference, sorted(front), stem, heavy)
    prov = points[0].provenance
    per_forward = points[0].flops.per_forward_one_sequence
    n_points = Counter((r["seeds"], r["num_samples"]) for r in rows).most_common(1)[0][0]
    lines = [f"## Sweep `{folder}`", "",
             f"Models: {', '.join(f'`{k}` = {v}' for k, v in settings.get('models', {}).items())}; judge: "
             f"`{points[0].gen_ppl.judge}`; sampler batch {settings.get('batch_size')}, top-p "
             f"{settings.get('top_p')}, cache {settings.get('cache')}. Measured on "
             f"{prov['hardware'].get('gpu', prov['hardware']['device'])}, git {prov['git']}.", "",
             "FLOPs of one forward over one sequence: " + ", ".join(
                 f"`{k}` {v['blocks_only']:.3e} (blocks only) / {v['full']:.3e} (with the head at every position)"
                 for k, v in per_forward.items())
             + ". Sampling FLOPs count the calls actually made (cached steps cost nothing), in three conventions: "
               "blocks only (the seed paper's 16.7%), with the output head at the positions this sampler decodes, "
               "and with the head at every position of every sequence run (as MDLM's sampler runs it).", "",
             f"![FLOPs against gen PPL]({stem.name}.png)", "",
             f"Gen PPL: {RULE_TEXT[rule]}; samples re-tokenized for the judge, truncated to the model length, chunks "
             f"of the judge's context, NLL summed in float64 and pooled over seeds. Each schedule is compared with "
             f"all-`{heavy}` of the same T and seeds: sample i of seed s is paired, and the 95% intervals are paired "
             f"bootstrap intervals ({RESAMPLES:,} resamples of sample indices within each seed). Entropy: unigram "
             f"entropy of each sample's tokens (nats), mean over samples. Most rows: {n_points[0]} seed(s) × "
             f"{n_points[1]} samples. Wall-clock saving: each point's first batch against the all-heavy first batch "
             f"timed nearest to it (its points', and the one timed again at the end of the run), ± the spread "
             f"of those all-heavy timings (no spread where it was timed once).{_mauve_sentence(points)}", "",
             *ref_lines]
    groups = list(dict.fromkeys(g for r in rows for g in r["groups"]))
    for group in groups:
        in_group = [r for r in rows if group in r["groups"]]
        in_group.sort(key=lambda r: (r["steps"], -r["flops_ratio"], r["gen_ppl"]))  # costliest first
        lines += [f"### Group `{group}`", "", *_schedule_table(in_group, front), ""]
    light = light_against_heavy(rows)
    if light is not None:
        lines += ["### All-light against all-heavy", "",
                  f"At T = {main_t}, {light['pairs']} paired samples ({len(light['paired_seeds'])} seeds): all-light "
                  f"gen PPL {light['gen_ppl']:.2f}, {ratio_text(light)} times all-heavy's: {verdict(light)}.", ""]
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
        lines += [f"- `{f.label}` ({f.key}): {f.error}" for f in results.failures] + [""]
    atomic_write_text(out.summary(folder.name), json.dumps(
        {"rows": rows, "pareto": sorted(front), "reference": [r.to_record() for r in results.references]}, indent=1,
        default=lambda o: None) + "\n")
    return lines, SweepView(rows, points, reference)
