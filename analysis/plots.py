"""Figures, drawn from results files only, in one style; each saved as PNG and PDF.

- per-step figure: masked-token CE per model, CE gap and KL in both directions against step index
  or t, with 95% bands, and a strip showing each schedule's light-model steps;
- sweep figure: gen PPL against FLOPs (error bars over seeds, Pareto frontier, real-text reference)
  beside an entropy panel; exhaustive-search schedules (labels such as LHHL) are small unlabelled
  markers unless they are on the frontier;
- fraction figure: gen PPL and entropy against the share of light steps of one placement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from mdlm_sched.artifacts import FIGURE_SUFFIXES  # noqa: E402

STYLE = {
    "font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5, "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5, "ytick.labelsize": 7.5, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100, "savefig.bbox": "tight",
    "lines.linewidth": 1.4, "pdf.fonttype": 42,
}
# PNG at 200 dpi; PDF without a creation date, so that a figure rebuilt from the same files is byte-identical.
SAVE_OPTIONS = {".png": {"dpi": 200}, ".pdf": {"metadata": {"CreationDate": None}}}
HEAVY, LIGHT, OTHER = "#1b4f72", "#c0392b", ("#7d3c98", "#148f77", "#b9770e", "#566573")
SOURCE_STYLE = {"masked": "-", "trajectory": "--"}
SOURCE_NAME = {"masked": "masked OWT", "trajectory": "all-heavy trajectories"}


def model_colors(light_to_heavy: Sequence[str]) -> dict[str, str]:
    """Heaviest model dark blue, lightest red, any others from a fixed palette."""
    colors = {name: OTHER[i % len(OTHER)] for i, name in enumerate(light_to_heavy[1:-1])}
    colors[light_to_heavy[0]], colors[light_to_heavy[-1]] = LIGHT, HEAVY
    return colors


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write stem.png (200 dpi) and stem.pdf; close the figure."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(suffix) for suffix in FIGURE_SUFFIXES]
    for path in paths:
        fig.savefig(path, **SAVE_OPTIONS[path.suffix])
    plt.close(fig)
    return paths


def _series(rows: Sequence[Mapping[str, Any]], source: str, metric: str, model: str, axis: str) -> tuple:
    sel = sorted((r for r in rows if (r["source"], r["metric"], r["model"]) == (source, metric, model)),
                 key=lambda r: r["step"])
    return ([r[axis] for r in sel], [r["mean"] for r in sel], [r["ci_low"] for r in sel],
            [r["ci_high"] for r in sel])


def _line(ax: plt.Axes, rows: Sequence[Mapping[str, Any]], source: str, metric: str, model: str, axis: str,
          color: str, label: str) -> None:
    x, y, lo, hi = _series(rows, source, metric, model, axis)
    if not x:
        return
    ax.plot(x, y, SOURCE_STYLE[source], color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)


def per_step_figure(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], stem: Path,
                    axis: str = "step") -> list[Path]:
    """The per-step figure against `axis` ("step" or "t") from per_step.csv rows and per_step.json."""
    names = meta["light_to_heavy"]
    heavy, colors = names[-1], model_colors(names)
    sources = [s for s in ("masked", "trajectory") if any(r["source"] == s for r in rows)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(4, 1, figsize=(6.4, 7.6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 3, 3, 0.3 + 0.25 * len(meta["shade"])]})
        ax_ce, ax_gap, ax_kl, ax_strip = axes
        for name in names:
            _line(ax_ce, rows, "masked", "ce", name, axis, colors[name], name)
        ax_ce.set_ylabel("nats / masked token")
        ax_ce.set_title("Masked-token cross-entropy on masked OWT validation blocks")
        for name in names[:-1]:
            for source in sources:
                _line(ax_gap, rows, source, "ce_gap", f"{name}-{heavy}", axis, colors[name],
                      f"{name} - {heavy}, {SOURCE_NAME[source]}")
                _line(ax_kl, rows, source, "kl", f"{heavy}||{name}", axis, colors[heavy],
                      f"KL({heavy} || {name}), {SOURCE_NAME[source]}")
                _line(ax_kl, rows, source, "kl", f"{name}||{heavy}", axis, colors[name],
                      f"KL({name} || {heavy}), {SOURCE_NAME[source]}")
        ax_gap.axhline(0, color="0.4", linewidth=0.8)
        ax_gap.set_ylabel("nats / masked token")
        ax_gap.set_title("Cross-entropy gap (on trajectories: CE of the token the sample chose)")
        ax_kl.set_ylabel("nats / masked token")
        ax_kl.set_title("KL between the models' p(x0 | xt)")
        for ax in (ax_ce, ax_gap, ax_kl):
            ax.legend(loc="best", frameon=False)
        n = len(meta["shade"])
        for i, shade in enumerate(meta["shade"]):  # row i from the top: the light model's spans
            spans = [(min(a, b), abs(b - a)) for a, b in shade["t" if axis == "t" else "steps"]]
            ax_strip.broken_barh(spans, (n - 1 - i + 0.15, 0.7), color=LIGHT, alpha=0.6, linewidth=0)
        ax_strip.set_yticks([n - 1 - i + 0.5 for i in range(n)], [s["spec"] for s in meta["shade"]])
        ax_strip.set_ylim(0, n)
        ax_strip.grid(False)
        ax_strip.set_title(f"Light-model ({names[0]}) steps of each schedule", loc="left")
        steps = meta["settings"]["steps"]
        if axis == "t":
            ax_strip.set_xlim(1.0, 0.0)  # sampling order: t = 1 (all masked) on the left
            ax_strip.set_xlabel("t (1 = fully masked; sampling runs left to right)")
        else:
            ax_strip.set_xlim(0, steps)
            ax_strip.set_xlabel(f"denoising step (of T = {steps})")
        fig.align_ylabels()
        return save(fig, stem)


def sweep_figure(rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None, pareto: Sequence[str],
                 stem: Path, baseline: str) -> list[Path]:
    """Gen PPL and entropy against FLOPs relative to all-`baseline`; rows are report.summarize rows."""
    with plt.rc_context(STYLE):
        fig, (ax_ppl, ax_ent) = plt.subplots(1, 2, figsize=(9.6, 3.9))
        for ax, metric, title in ((ax_ppl, "gen_ppl", "Generative perplexity (lower is better)"),
                                  (ax_ent, "entropy", "Unigram entropy per sample (nats)")):
            for r in rows:
                on_front = r["name"] in pareto
                searched = re.fullmatch("[LH]+", r["label"]) is not None  # an exhaustive-search pattern
                ax.errorbar(r["flops_ratio"], r[f"{metric}_mean"], yerr=r[f"{metric}_sd"] if r["seeds"] > 1 else None,
                            fmt="o" if on_front else "s", color=HEAVY if on_front else "0.45",
                            markersize=2.5 if searched and not on_front else 4, capsize=2, linewidth=0.9)
                if on_front or not searched:  # searched schedules off the frontier stay unlabelled
                    ax.annotate(r["label"], (r["flops_ratio"], r[f"{metric}_mean"]), fontsize=6.5,
                                xytext=(3, 3), textcoords="offset points")
            if reference is not None:
                ax.axhline(reference[metric], color="#117a65", linestyle=":", linewidth=1.1,
                           label=f"real text, {reference['name']} ({reference['num_samples']} blocks)")
            ax.set_xlabel(f"FLOPs relative to all-{baseline} (blocks only)")
            ax.set_title(title)
        front = sorted((r for r in rows if r["name"] in pareto), key=lambda r: r["flops_ratio"])
        ax_ppl.plot([r["flops_ratio"] for r in front], [r["gen_ppl_mean"] for r in front], color=HEAVY,
                    linewidth=1.0, alpha=0.7, label="Pareto frontier")
        ax_ppl.set_ylabel("gen PPL")
        ax_ent.set_ylabel("entropy (nats)")
        ax_ppl.legend(loc="best", frameon=False)
        ax_ent.legend(loc="best", frameon=False)
        fig.suptitle("Error bars: +-1 s.d. over seeds", fontsize=7.5, y=0.01)
        return save(fig, stem)


def fraction_figure(rows: Sequence[Mapping[str, Any]], placement: str, reference: Mapping[str, Any] | None,
                    stem: Path) -> list[Path]:
    """Gen PPL and entropy against the share of light steps, for one placement (rows sorted by share)."""
    with plt.rc_context(STYLE):
        fig, (ax_ppl, ax_ent) = plt.subplots(1, 2, figsize=(9.6, 3.4))
        x = [r["light_fraction"] for r in rows]
        for ax, metric, label in ((ax_ppl, "gen_ppl", "gen PPL"), (ax_ent, "entropy", "entropy (nats)")):
            ax.errorbar(x, [r[f"{metric}_mean"] for r in rows],
                        yerr=[r[f"{metric}_sd"] if r["seeds"] > 1 else 0.0 for r in rows],
                        fmt="o-", color=LIGHT, markersize=4, capsize=2)
            if reference is not None:
                ax.axhline(reference[metric], color="#117a65", linestyle=":", linewidth=1.1,
                           label=f"real text, {reference['name']}")
                ax.legend(loc="best", frameon=False)
            ax.set_xlabel("share of steps given to the light model")
            ax.set_ylabel(label)
        ax_ppl.set_title(f"{placement}: gen PPL against the light share")
        ax_ent.set_title(f"{placement}: entropy against the light share")
        return save(fig, stem)
