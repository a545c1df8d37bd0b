"""Figures, drawn from results files only, in one style; each saved as PNG and PDF.

- per-step figure: masked-token CE per model, CE gap and KL in both directions against step index
  or t, with 95% bands, and a strip showing each schedule's light-model steps;
- sweep figure: gen PPL (a ratio to all-heavy) against FLOPs, with paired 95% intervals, the Pareto
  frontier and the real-text reference, beside an entropy panel (a difference to all-heavy);
  exhaustive-search schedules (labels such as LHHL) are small unlabelled markers unless they are on
  the frontier;
- fraction figure: the same two quantities against the share of light steps of one placement;
- optimiser figure: each measured schedule's gen PPL ratio against the cost model's prediction of it;
- quality-time figure: gen PPL (a ratio to exact all-heavy) against seconds per sample, for the schedules of
  a sweep and of the sweeps of other sampler settings compared with it (the latent cache's trade).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

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


# Offsets (points) tried in turn for a point's label: beside the point first, then further up or down on either
# side (with a leader line from the point), so that labels of points close together do not overlap.
_LABEL_OFFSETS = tuple((dx, dy, "left" if dx > 0 else "right", "bottom" if dy >= 0 else "top")
                       for dy in (3, -3, 11, -11, 19, -19, 27, -27) for dx in (5, -5))


def place_labels(ax: plt.Axes, points: Sequence[tuple[float, float, str]]) -> None:
    """Label each (x, y, text) at the first offset where the label overlaps no other label or point and stays inside
    the axes; a label with no such offset takes the one that overlaps least. Call it last: it fixes the axis limits."""
    fig = ax.figure
    fig.canvas.draw()  # the final limits and layout: the labels move with the points, so place them on those
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    # Obstacles: a small box around every point, then every label placed.
    placed: list[Any] = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4)
                         for px, py in ax.transData.transform([(x, y) for x, y, _ in points])] if points else []

    def cost(box: Any) -> float:
        overlap = sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
                      for o in placed)
        outside = box.width * box.height - max(0.0, min(box.x1, inside.x1) - max(box.x0, inside.x0)) * \
            max(0.0, min(box.y1, inside.y1) - max(box.y0, inside.y0))
        return overlap + 10 * outside  # a label cut off at the edge is worse than one touching another

    for x, y, text in sorted(points):
        best = None
        for offset in _LABEL_OFFSETS:  # measured without a leader line, whose extent would reach the point
            dx, dy, ha, va = offset
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=6.5)
            box = label.get_window_extent(renderer)
            label.remove()
            score = cost(box)
            if best is None or score < best[0]:
                best = (score, offset, box)
            if score == 0:
                break
        dx, dy, ha, va = best[1]
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=6.5,
                    arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "0.5"} if abs(dy) > 5 else None)
        placed.append(best[2])


def _paired(r: Mapping[str, Any], metric: str) -> tuple[float, float, float]:
    """(value, lower error, upper error) of a row against its baseline: gen PPL ratio or entropy difference."""
    if r["all_heavy"]:
        return (1.0, 0.0, 0.0) if metric == "ppl_ratio" else (0.0, 0.0, 0.0)
    value, low, high = r[metric], r[f"{metric}_low"], r[f"{metric}_high"]
    return value, value - low, high - value


# The two panels of the sweep and fraction figures: the paired quantity, its axis label, its reference value.
PANELS = (("ppl_ratio", "gen PPL / all-heavy's", lambda ref, base: ref["gen_ppl"] / base["gen_ppl"]),
          ("entropy_diff", "entropy − all-heavy's (nats)", lambda ref, base: ref["entropy"] - base["entropy"]))


def _dodged(xs: Sequence[float], step: float) -> list[float]:
    """xs with the points that lie within step / 4 of each other spread step apart around their mean, so that
    schedules of (nearly) equal FLOPs, e.g. the placements of one light share, do not hide each other's bars."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and xs[i] - xs[groups[-1][-1]] <= step / 4:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = list(xs)
    for members in groups:
        centre = sum(xs[i] for i in members) / len(members)
        for k, i in enumerate(members):
            out[i] = centre + (k - (len(members) - 1) / 2) * step
    return out


def sweep_figure(rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None, pareto: Sequence[str],
                 stem: Path, baseline: str) -> list[Path]:
    """Gen PPL (as a ratio) and entropy (as a difference) against all-`baseline`, with paired 95% intervals,
    against FLOPs relative to all-`baseline`; rows are summary.summarize rows of one T."""
    rows = [r for r in rows if r["all_heavy"] or r["pairs"]]  # rows without a baseline have no paired value
    base = next((r for r in rows if r["all_heavy"]), None)
    span = max((r["flops_ratio"] for r in rows), default=1.0) - min((r["flops_ratio"] for r in rows), default=0.0)
    x = dict(zip((r["name"] for r in rows), _dodged([r["flops_ratio"] for r in rows], 0.03 * (span or 1.0))))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9))
        for ax, (metric, label, ref_value) in zip(axes, PANELS):
            for r in rows:
                on_front = r["name"] in pareto
                searched = re.fullmatch("[LH]+", r["label"]) is not None  # an exhaustive-search pattern
                value, below, above = _paired(r, metric)
                ax.errorbar(x[r["name"]], value, yerr=[[below], [above]], fmt="o" if on_front else "s",
                            color=HEAVY if on_front else "0.45", markersize=2.5 if searched and not on_front else 4,
                            capsize=2, linewidth=0.9)
            ax.axhline(_paired(base, metric)[0] if base else 1.0, color="0.6", linewidth=0.8)
            ax.margins(x=0.12, y=0.12)  # room for the labels at the edges
            if reference is not None and base is not None:
                ax.axhline(ref_value(reference, base), color="#117a65", linestyle=":", linewidth=1.1,
                           label=f"real text, {reference['name']} ({reference['num_samples']} blocks)")
            ax.set_xlabel(f"FLOPs relative to all-{baseline} (blocks only)")
            ax.set_ylabel(label)
        front = sorted((r for r in rows if r["name"] in pareto), key=lambda r: r["flops_ratio"])
        axes[0].plot([x[r["name"]] for r in front], [_paired(r, "ppl_ratio")[0] for r in front], color=HEAVY,
                     linewidth=1.0, alpha=0.7, label="Pareto frontier")
        axes[0].set_title("Generative perplexity (lower is better)")
        axes[1].set_title("Unigram entropy per sample")
        axes[0].plot([], [], "o", color=HEAVY, markersize=4, label="schedule on the Pareto frontier")
        axes[0].plot([], [], "s", color="0.45", markersize=4, label="schedule off the frontier")
        for ax, (metric, _, _) in zip(axes, PANELS):  # searched schedules off the frontier stay unlabelled
            place_labels(ax, [(x[r["name"]], _paired(r, metric)[0], r["label"]) for r in rows
                              if r["name"] in pareto or re.fullmatch("[LH]+", r["label"]) is None])
        # One legend for both panels, under them, where it hides no point.
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False,
                   bbox_to_anchor=(0.5, -0.06))
        fig.suptitle(f"Error bars: paired bootstrap 95% CIs against all-{baseline} (same seeds). Schedules of "
                     "equal FLOPs are drawn side by side around their x.", fontsize=7.5, y=-0.1)
        return save(fig, stem)


def fraction_figure(rows: Sequence[Mapping[str, Any]], placement: str, reference: Mapping[str, Any] | None,
                    stem: Path) -> list[Path]:
    """Gen PPL (as a ratio) and entropy (as a difference) against all-heavy, with paired 95% intervals, against
    the share of light steps, for one placement (rows sorted by share). Rows with no all-heavy run of their seeds
    and sample count are drawn hollow, as a plain ratio (difference) of pooled values, without an interval."""
    base = next((r for r in rows if r["all_heavy"]), None)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
        paired_rows = [r for r in rows if r["all_heavy"] or r["pairs"]]
        unpaired = [r for r in rows if not (r["all_heavy"] or r["pairs"])] if base is not None else []
        for ax, (metric, label, ref_value) in zip(axes, PANELS):
            values = [_paired(r, metric) for r in paired_rows]
            ax.errorbar([r["light_fraction"] for r in paired_rows], [v[0] for v in values],
                        yerr=[[v[1] for v in values], [v[2] for v in values]], fmt="o-", color=LIGHT, markersize=4,
                        capsize=2, label="paired with all-heavy (95% CI)")
            if unpaired:
                plain = {"ppl_ratio": lambda r: r["gen_ppl"] / base["gen_ppl"],
                         "entropy_diff": lambda r: r["entropy"] - base["entropy"]}[metric]
                ax.plot([r["light_fraction"] for r in unpaired], [plain(r) for r in unpaired], "o", color=LIGHT,
                        markerfacecolor="white", markersize=4, label="other seeds or samples than all-heavy (no CI)")
            if reference is not None and base is not None:
                ax.axhline(ref_value(reference, base), color="#117a65", linestyle=":", linewidth=1.1,
                           label=f"real text, {reference['name']}")
            ax.set_xlabel("share of steps given to the light model")
            ax.set_ylabel(label)
        axes[0].set_title(f"{placement}: gen PPL against the light share")
        axes[1].set_title(f"{placement}: entropy against the light share")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, frameon=False,
                   bbox_to_anchor=(0.5, -0.07))
        fig.suptitle("Error bars: paired bootstrap 95% CIs against all-heavy (same seeds)", fontsize=7.5, y=-0.12)
        return save(fig, stem)


def optimise_figure(measured: Sequence[Mapping[str, Any]], stem: Path) -> list[Path]:
    """Each measured schedule's gen PPL ratio to all-heavy (paired 95% CI) against the cost model's leave-one-out
    prediction of it, with the identity line; entries are optimise.json's "measured" with a "hand" flag."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        for hand, color, marker, name in ((True, "0.45", "s", "hand preset"),
                                          (False, HEAVY, "o", "optimised or other schedule")):
            chosen = [m for m in measured if m["hand"] == hand]
            if not chosen:
                continue
            y = [math.exp(m["measured"]) for m in chosen]
            ax.errorbar([math.exp(m["loo_predicted"]) for m in chosen], y, fmt=marker, color=color, markersize=4,
                        capsize=2, linewidth=0.9, label=name,
                        yerr=[[v - math.exp(m["measured_low"]) for v, m in zip(y, chosen)],
                              [math.exp(m["measured_high"]) - v for v, m in zip(y, chosen)]])
        ends = [math.exp(v) for m in measured for v in (m["loo_predicted"], m["measured_low"], m["measured_high"])]
        lo, hi = min(ends + [1.0]), max(ends + [1.0])
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", linewidth=0.8, label="identity")
        ax.set_xlabel("predicted gen PPL / all-heavy's (leave-one-out)")
        ax.set_ylabel("measured gen PPL / all-heavy's")
        ax.set_title("Cost model against measurement")
        ax.legend(loc="upper left", frameon=False)
        place_labels(ax, [(math.exp(m["loo_predicted"]), math.exp(m["measured"]), m["label"]) for m in measured])
        fig.suptitle("Error bars: paired bootstrap 95% CIs against all-heavy (same seeds)", fontsize=7.5, y=-0.02)
        return save(fig, stem)


def quality_time_figure(points: Sequence[Mapping[str, Any]], stem: Path, baseline: str) -> list[Path]:
    """Gen PPL over the exact sampler's all-`baseline` (paired 95% CI) against sampling seconds per sample (log x).

    points: {"setting", "label", "seconds", "ppl_ratio", "ppl_ratio_low", "ppl_ratio_high"}; one marker and
    colour per setting (the first is the exact sampler), each point labelled with its schedule.
    """
    settings = list(dict.fromkeys(p["setting"] for p in points))
    colours = dict(zip(settings, (HEAVY, LIGHT, *OTHER)))
    markers = dict(zip(settings, "osD^v<>"))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name in settings:
            mine = [p for p in points if p["setting"] == name]
            ax.errorbar([p["seconds"] for p in mine], [p["ppl_ratio"] for p in mine],
                        yerr=[[p["ppl_ratio"] - p["ppl_ratio_low"] for p in mine],
                              [p["ppl_ratio_high"] - p["ppl_ratio"] for p in mine]],
                        fmt=markers.get(name, "o"), color=colours.get(name, "0.45"), markersize=4.5, capsize=2,
                        linewidth=0.9, label=name)
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        ax.axhline(1.05, color="0.6", linewidth=0.8, linestyle=":", label="+5% gen PPL")
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.15)
        place_labels(ax, [(p["seconds"], p["ppl_ratio"], p["label"]) for p in points])
        ax.set_xlabel("sampling wall-clock per sample (s, log scale)")
        ax.set_ylabel(f"gen PPL / exact all-{baseline}'s")
        ax.set_title("Quality against sampling time (lower left is better)")
        ax.legend(loc="upper right", frameon=False)
        fig.suptitle(f"Error bars: paired bootstrap 95% CIs against the exact sampler's all-{baseline} (same seeds "
                     "and samples). Times are of runs at different moments.", fontsize=7.5, y=-0.02)
        return save(fig, stem)
