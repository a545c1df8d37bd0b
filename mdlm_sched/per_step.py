"""Per-step analysis: how much worse the light model is than the heavy one at each denoising step.

On the sampler's own time grid (T steps; a grid of G of them, evenly spaced), step i is evaluated at
t_i, the time its model sees. Two kinds of states x_t:

- "masked": validation blocks x_0 masked by the forward process at t_i (the same mask for every
  model, so their differences are paired). Metrics per masked token: each model's cross-entropy
  -log p(x_0 | x_t) ("ce"), CE(model) - CE(heaviest) ("ce_gap"), KL(heaviest || model) and
  KL(model || heaviest) ("kl", written "large||small" for KL(large || small)); and each model's
  ELBO-weighted loss per token, w(t_i) * sum of masked CE / tokens ("elbo_loss"), the integrand of
  the NELBO at t_i.
- "trajectory": the states of all-heavy sampling runs at the start of step i. Metrics: the KLs,
  and each model's CE of the token the run finally put there ("ce_final"), as the sample has no
  other ground truth (this CE favours the heavy model, whose draws made the sample).

Log-softmax and the KL sums are float64 (from a float32 head). Every value is a ratio of sums over
units (validation blocks for masked states, trajectories for trajectory states): nats summed over
their masked tokens, divided by their masked tokens. Its 95% band is a percentile bootstrap over the
units (stats.ratio_curve: 10,000 resamples, whole curves resampled together), and each row carries
its count of units with masked tokens and of masked tokens (fewer than two such units: no band).
For each gap and KL curve the peak (the grid step with the largest estimate) comes with the 95%
interval of the step where the resampled curves peak. Results
go to per_step.csv (long format) and per_step.json (settings, the schedules to shade, the peaks,
provenance); the figures and the report (the analysis package) are drawn from those files alone.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mdlm_sched.artifacts import AnalysisDir
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.config_checks import validate_runtime
from mdlm_sched.data import load_sources
from mdlm_sched.diffusion import corrupt, forbid_mask
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import check_writable
from mdlm_sched.flops import forward_flops
from mdlm_sched.modelset import ModelSet, PreparedDenoiser, open_models
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import STREAM_ANALYSIS_MASK, STREAM_ANALYSIS_TRAJECTORY, step_generator
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import AnalysisConfig, SamplerSettings, validate_analysis
from mdlm_sched.schedule import grid_steps, time_grid
from mdlm_sched.stats import RESAMPLES, ratio_curve

log = logging.getLogger(__name__)
# Elements of one float64 [rows, V] tensor of the KL computation: a few such tensors live at once, and
# on a CPU smaller chunks avoid page-faulting through GBs of fresh memory.
_CHUNK_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}


class _UnitSums:
    """Per unit (validation block or trajectory) sums and counts of every (source, step, metric, model) key.

    Units are added batch by batch in the same order at every grid step, so unit u is the same block (or
    trajectory) at every step of a source: the bootstrap resamples units, and with them whole curves.
    """

    def __init__(self) -> None:
        self.values: dict[tuple[str, int, str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)

    def add(self, key: tuple[str, int, str, str], totals: torch.Tensor, counts: torch.Tensor) -> None:
        """One batch's per-unit totals [B] and counts [B] (device tensors; copied here)."""
        self.values[key].append((totals.double().cpu().numpy(), counts.double().cpu().numpy()))

    def curves(self) -> dict[tuple[str, str, str], tuple[list[int], np.ndarray, np.ndarray]]:
        """(source, metric, model) -> (grid steps, totals [units, steps], counts [units, steps])."""
        by_curve: dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        for (source, step, metric, model), parts in self.values.items():
            by_curve[source, metric, model][step] = (np.concatenate([p[0] for p in parts]),
                                                     np.concatenate([p[1] for p in parts]))
        out = {}
        for key, by_step in by_curve.items():
            steps = sorted(by_step)
            out[key] = (steps, np.stack([by_step[s][0] for s in steps], axis=1),
                        np.stack([by_step[s][1] for s in steps], axis=1))
        return out


def _rows_and_peaks(sums: _UnitSums, times: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of per_step.csv (estimate, bootstrap band, units, tokens) and, for each gap and KL curve, its peak
    with a bootstrap interval of the step where it peaks."""
    rows, peaks = [], []
    for (source, metric, model), (steps, totals, counts) in sorted(sums.curves().items()):
        curve = ratio_curve(totals, counts, RESAMPLES)
        for j, step in enumerate(steps):
            rows.append({"source": source, "step": step, "t": times[step], "metric": metric, "model": model,
                         "mean": curve["estimate"][j], "ci_low": curve["low"][j], "ci_high": curve["high"][j],
                         "units": int((counts[:, j] > 0).sum()), "tokens": int(counts[:, j].sum())})
        if metric in ("kl", "ce_gap"):
            j = int(np.nanargmax(curve["estimate"]))
            low, high = curve["peak"]
            peaks.append({"source": source, "metric": metric, "model": model, "step": steps[j], "t": times[steps[j]],
                          "mean": curve["estimate"][j], "ci_low": curve["low"][j], "ci_high": curve["high"][j],
                          "step_low": steps[low], "step_high": steps[high], "units": int((counts[:, j] > 0).sum())})
    rows.sort(key=lambda r: (r["source"], r["step"], r["metric"], r["model"]))
    return rows, peaks


def log_probs(model: PreparedDenoiser, hidden: torch.Tensor) -> torch.Tensor:
    """float64 log p(x_0 | x_t) [K, V] from a denoiser's hidden states [K, d] ([MASK] excluded, as the sampler
    draws)."""
    logits = forbid_mask(model.logits_from_hidden(hidden), model.config.mask_token_id)  # float32
    return logits.double().log_softmax(dim=-1)


def kl_divergence(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) [K] of each row of log-probabilities [K, V] (0 * log 0 = 0 for the [MASK] column)."""
    p_a = logp_a.exp()
    return torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a)).sum(dim=1)


def _evaluate_states(model_set: ModelSet, x_t: torch.Tensor, targets: torch.Tensor, t: float, source: str,
                     step: int, sums: _UnitSums) -> None:
    """Add one batch of states x_t [B, L] at time t to sums: per sequence, CE of targets [B, L] and KLs summed
    over its masked positions."""
    names = model_set.light_to_heavy
    heavy = names[-1]
    b = x_t.shape[0]
    mask_id = model_set.config.mask_token_id
    r, c = (x_t == mask_id).nonzero(as_tuple=True)  # [K] masked positions
    hidden = {}
    for name in names:
        model = model_set.models[name]
        sigma = model_set.noise.sigma(torch.full((b,), t, device=x_t.device)) \
            if model.config.time_conditioning else None
        hidden[name] = model.hidden(x_t, sigma)  # [B, L, d]
    # Per-sequence sums stay on the device (float64) through the chunks: one host copy per batch.
    zeros = torch.zeros(b, dtype=torch.float64, device=x_t.device)
    ce = {name: zeros.clone() for name in names}
    pairs = [(a, b_) for name in names[:-1] for a, b_ in ((heavy, name), (name, heavy))]
    kl = {pair: zeros.clone() for pair in pairs}
    rows = max(1, _CHUNK_ELEMENTS.get(x_t.device.type, 2**22) // model_set.config.vocab_size)
    for start in range(0, r.numel(), rows):
        rr, cc = r[start:start + rows], c[start:start + rows]
        logp = {name: log_probs(model_set.models[name], hidden[name][rr, cc]) for name in names}
        y = targets[rr, cc][:, None]
        for name in names:
            ce[name].index_add_(0, rr, -logp[name].gather(1, y).squeeze(1))
        for a, b_ in pairs:
            kl[a, b_].index_add_(0, rr, kl_divergence(logp[a], logp[b_]))
    masked = (x_t == mask_id).sum(dim=1)  # [B] masked tokens per sequence
    ce_metric = "ce" if source == "masked" else "ce_final"
    weight = float(model_set.noise.loss_weight(torch.tensor(t, dtype=torch.float64)))
    for name in names:
        sums.add((source, step, ce_metric, name), ce[name], masked)
        if name != heavy:
            sums.add((source, step, "ce_gap", f"{name}-{heavy}"), ce[name] - ce[heavy], masked)
        if source == "masked":  # w(t) * sum of masked CE / tokens: the NELBO integrand at t
            sums.add((source, step, "elbo_loss", name), weight * ce[name], torch.full_like(masked, x_t.shape[1]))
    for (a, b_), total in kl.items():
        sums.add((source, step, "kl", f"{a}||{b_}"), total, masked)


def _masked_states(model_set: ModelSet, settings: AnalysisConfig, steps: list[int], times: list[float],
                   sums: _UnitSums, progress: bool) -> int:
    blocks = load_sources([settings.data], model_set.tokenizer, model_set.seq_len, settings.cache_dir,
                          short_fix="give --data more text or a smaller --seq-len")
    if len(blocks) < settings.num_blocks:
        raise ConfigError(f"num_blocks={settings.num_blocks} (--num-blocks) asks for more blocks than {settings.data} "
                          f"holds ({len(blocks)} of {model_set.seq_len} tokens); lower it to {len(blocks)} or give "
                          f"more data")
    blocks = blocks[: settings.num_blocks]
    device = model_set.device
    n_batches = -(-len(blocks) // settings.batch_size)
    bar = tqdm(total=n_batches * len(steps), desc="per-step (masked data)", unit="state", disable=not progress,
               leave=False)
    for b in range(n_batches):
        x0 = torch.from_numpy(np.asarray(blocks[b * settings.batch_size:(b + 1) * settings.batch_size],
                                         dtype=np.int64)).to(device)
        generator = step_generator(settings.seed, b, STREAM_ANALYSIS_MASK, device)
        for step in steps:
            t = torch.full((x0.shape[0],), times[step], device=device)
            x_t = corrupt(x0, t, model_set.noise, model_set.config.mask_token_id, generator)
            _evaluate_states(model_set, x_t, x0, times[step], "masked", step, sums)
            bar.update(1)
    bar.close()
    return len(blocks)


def _trajectory_states(model_set: ModelSet, settings: AnalysisConfig, steps: list[int], times: list[float],
                       sums: _UnitSums, progress: bool) -> None:
    schedule = model_set.schedule("all-large", settings.steps, settings.t_min)  # the heaviest model throughout
    wanted = set(steps)
    device = model_set.device
    n_batches = -(-settings.trajectory_samples // settings.batch_size)
    bar = tqdm(total=n_batches, desc="per-step (all-heavy trajectories)", unit="batch", disable=not progress,
               leave=False)
    for b in range(n_batches):
        size = min(settings.batch_size, settings.trajectory_samples - b * settings.batch_size)
        states: dict[int, torch.Tensor] = {}

        def keep(i: int, x: torch.Tensor) -> None:
            if i in wanted:
                states[i] = x.clone()

        final = sample(model_set.models, schedule, model_set.noise, SamplerSettings(t_min=settings.t_min),
                       step_generator(settings.seed, b, STREAM_ANALYSIS_TRAJECTORY, device), size, model_set.seq_len,
                       on_state=keep).tokens
        for step in steps:
            _evaluate_states(model_set, states[step], final, times[step], "trajectory", step, sums)
        bar.update(1)
    bar.close()


def shade_ranges(model_set: ModelSet, specs: Sequence[str], steps: int, t_min: float) -> list[dict[str, Any]]:
    """For each schedule, the step ranges [start, end) and t ranges [t_start, t_end] of its light steps."""
    light = model_set.light_to_heavy[0]
    times = time_grid(steps, t_min).tolist()
    out = []
    for spec in specs:
        schedule = model_set.schedule(spec, steps, t_min)
        ranges, start = [], 0
        for name, count in schedule.segments():
            if name == light:
                ranges.append([start, start + count])
            start += count
        out.append({"spec": spec, "segments": schedule.segments_str(), "steps": ranges,
                    "t": [[times[a], times[b]] for a, b in ranges]})
    return out


def analyze(model_set: ModelSet, settings: AnalysisConfig, out: AnalysisDir, provenance: dict[str, Any],
            progress: bool = True) -> dict[str, Any]:
    """Run the per-step analysis; write per_step.csv and per_step.json to out; return the JSON record.

    settings must have passed validate_analysis (analyze_models does that before loading the models).
    """
    if len(model_set.models) < 2:
        raise ConfigError("the per-step analysis compares models: give at least two (e.g. small and large)")
    steps = grid_steps(settings.steps, settings.grid)
    shade = shade_ranges(model_set, settings.shade, settings.steps, settings.t_min)  # bad specs fail before work
    times = time_grid(settings.steps, settings.t_min).tolist()
    sums = _UnitSums()
    wall = {}
    with torch.no_grad():
        start = time.perf_counter()
        blocks = _masked_states(model_set, settings, steps, times, sums, progress)
        wall["masked_s"] = time.perf_counter() - start
        if settings.trajectory_samples:
            start = time.perf_counter()
            _trajectory_states(model_set, settings, steps, times, sums, progress)
            wall["trajectory_s"] = time.perf_counter() - start
    rows, peaks = _rows_and_peaks(sums, times)
    record = {
        "settings": asdict(settings),
        "grid_steps": steps,
        "blocks": blocks,
        "seq_len": model_set.seq_len,
        "light_to_heavy": model_set.light_to_heavy,
        "models": {name: {"layers": m.config.num_hidden_layers, "hidden_size": m.config.hidden_size}
                   for name, m in model_set.models.items()},
        "flops_per_forward": {name: {"blocks_only": f.blocks_only, "full": f.full} for name, f in
                              ((n, forward_flops(c, model_set.seq_len)) for n, c in model_set.configs.items())},
        "noise": {"schedule": model_set.noise.name, "eps": model_set.noise.eps},
        "shade": shade,
        "peaks": peaks,
        "wall": wall,  # seconds, compilation included
        "conventions": "t_i = start of step i on linspace(1, t_min, T + 1); per masked token, nats; float64 "
                       f"log-softmax of a float32 head; band = 95% percentile bootstrap over units (validation "
                       f"blocks for masked states, trajectories for trajectory states), {RESAMPLES} resamples; "
                       f"the peak's step interval from the same resamples",
        "provenance": provenance,
    }
    out.write(rows, record)
    log.info("per-step analysis: %d grid steps x %d blocks (+%d trajectories) in %s -> %s", len(steps), blocks,
             settings.trajectory_samples, ", ".join(f"{k} {v:.1f}" for k, v in wall.items()), out.root)
    return record


def analyze_models(models: Mapping[str, str], settings: AnalysisConfig, runtime: RuntimeConfig, out: AnalysisDir,
                   seq_len: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Check the settings, load the named models (folders or training run folders) and run `analyze`."""
    if len(models) < 2:
        raise ConfigError("the per-step analysis compares models: give at least two, e.g. --model small=... "
                          "--model large=...")
    validate_analysis(settings)
    validate_runtime(runtime)
    check_writable(out.root, "the analysis output folder")
    model_set = open_models(models, runtime, seq_len)
    return analyze(model_set, settings, out, provenance(model_set.device), progress)
