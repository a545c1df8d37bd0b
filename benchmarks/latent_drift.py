"""How far the latent cache's predictions drift from exact ones, by the age of the cache, along exact trajectories.

Teacher-forced, so that each step's error is the cache's alone: the exact sampler draws trajectories of one model
(all-MODEL, no noise removal); at every step that decodes, the same states x_t also run through the latent cache,
refreshed as each setting says (R<n>: every n steps; the first step always refreshes), and the two float64
distributions at the decoded positions are compared: KL(exact || cached) in nats and whether their most likely
tokens agree. In a sampled comparison (mdlm-sched compare) one early difference changes the rest of the sample,
which is why its intervals are wide; here every step starts from the exact state. The result is grouped by age:
the steps since the sequence's cache was last refreshed (age 0: a refresh, exact up to rounding), each with a 95%
bootstrap interval over sequences (mdlm_sched.stats.ratio_curve).

    python benchmarks/latent_drift.py --models small=DIR large=DIR --model large --steps 256 --samples 32 \\
        --settings R4 R8 R16 --out drift.json     # trained models (a pipeline's train/<name> folders)
    python benchmarks/latent_drift.py --smoke     # a tiny random-weight model on the CPU (the test suite runs it)

Random weights say nothing about the drift of trained models; --smoke only checks the script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mdlm_sched.config import RuntimeConfig
from mdlm_sched.errors import ConfigError, UserError
from mdlm_sched.fileio import atomic_write_json, check_writable
from mdlm_sched.latent_cache import plan_latent_steps
from mdlm_sched.modelset import PreparedDenoiser, open_models
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.per_step import kl_divergence, log_probs
from mdlm_sched.provenance import provenance
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule
from mdlm_sched.stats import RESAMPLES, ratio_curve
from presets import random_denoiser


@torch.no_grad()
def drift_batch(model: PreparedDenoiser, noise: LogLinearNoise, steps: int, batch: int, seq_len: int, seed: int,
                refresh_every: list[int]) -> dict[int, list[tuple[int, int, float, bool]]]:
    """One batch of exact trajectories; for each refresh period, (sequence, age, KL, top-1 agrees) of every
    position decoded."""
    schedule = parse_schedule("all-large", steps, ["large"])
    states: list[torch.Tensor] = []  # x_t at the start of each step, [B, L] each
    final = sample({"large": model}, schedule, noise, SamplerSettings(noise_removal=False),
                   torch.Generator(model.device).manual_seed(seed), batch, seq_len,
                   on_state=lambda i, x: states.append(x.clone())).tokens
    unmasked = torch.stack([*states[1:], final]) != model.config.mask_token_id  # [T, B, L]: after each step
    # each position's unmask step: the first step after which it is not [MASK] (T: never, without noise removal)
    unmask = torch.where(unmasked.any(0), unmasked.int().argmax(0), steps).cpu().numpy()  # [B, L]
    plans = {n: plan_latent_steps(unmask, list(schedule.names), n, 1.0, model.device) for n in refresh_every}
    caches = {n: model.new_latent_cache(batch, seq_len) for n in refresh_every}
    refreshed = {n: np.full(batch, -1) for n in refresh_every}  # the step of each sequence's last refresh
    records: dict[int, list[tuple[int, int, float, bool]]] = {n: [] for n in refresh_every}
    for i, x in enumerate(states):
        rows, cols = np.nonzero(unmask == i)  # the positions step i decodes, row-major: the plans' order
        if not len(rows):
            continue
        at = torch.from_numpy(rows).to(x.device), torch.from_numpy(cols).to(x.device)
        exact = log_probs(model, model.hidden(x)[at])  # [K, V]
        for n, plan in plans.items():
            step = plan[i]
            hidden = [model.latent_hidden(x.index_select(0, seqs), None, caches[n], seqs, positions).flatten(0, 1)
                      for seqs, positions in ((step.refresh, None), (step.partial, step.positions)) if len(seqs)]
            cached = log_probs(model, torch.cat(hidden).index_select(0, step.take))
            refreshed[n][step.refresh.cpu().numpy()] = i
            kl = kl_divergence(exact, cached).cpu().numpy()
            agree = (exact.argmax(-1) == cached.argmax(-1)).cpu().numpy()
            records[n].extend((int(r), i - int(refreshed[n][r]), float(k), bool(a)) for r, k, a in zip(rows, kl, agree))
    return records


def summarise(records: list[tuple[int, int, float, bool]], sequences: int, max_age: int) -> list[dict]:
    """Mean KL and top-1 agreement by age (0 .. max_age), with 95% bootstrap intervals over sequences."""
    kl_sum, agree_sum, count = (np.zeros((sequences, max_age + 1)) for _ in range(3))
    for seq, age, kl, agree in records:
        kl_sum[seq, age] += kl
        agree_sum[seq, age] += agree
        count[seq, age] += 1
    kl_curve, agree_curve = (ratio_curve(totals, count, RESAMPLES) for totals in (kl_sum, agree_sum))
    return [{"age": age, "positions": int(count[:, age].sum()),
             "kl": float(kl_curve["estimate"][age]), "kl_low": float(kl_curve["low"][age]),
             "kl_high": float(kl_curve["high"][age]), "top1_agreement": float(agree_curve["estimate"][age]),
             "top1_low": float(agree_curve["low"][age]), "top1_high": float(agree_curve["high"][age])}
            for age in range(max_age + 1) if count[:, age].any()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[], help="NAME=PATH of saved denoisers (a set that can share a "
                   "schedule); without it, --smoke")
    p.add_argument("--model", default=None, help="the one whose cache is measured (default: the heaviest)")
    p.add_argument("--steps", type=int, default=256, help="T of the trajectories")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--settings", nargs="+", default=["R4", "R8", "R16"], help="R<n>: refresh every n steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny random-weight model, T = 16, 4 samples (CPU)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    try:
        if args.out is not None:
            check_writable(args.out.parent, "--out's folder")
        periods = [int(s.removeprefix("R")) for s in args.settings if s.startswith("R") and s[1:].isdigit()]
        if len(periods) != len(args.settings) or min(periods) < 1:
            raise ConfigError(f"--settings {' '.join(args.settings)}: give R<n> with n >= 1 (a refresh every n steps)")
        if min(args.steps, args.samples, args.batch) < 1:
            raise ConfigError(f"--steps, --samples and --batch must be >= 1 (got {args.steps}, {args.samples}, "
                              f"{args.batch})")
        if not args.models and not args.smoke:
            raise ConfigError("give --models NAME=PATH ... (saved denoisers) or --smoke")
        if args.smoke:
            args.steps, args.samples, args.batch = 16, 4, 2
            name, noise = "large", LogLinearNoise(1e-3)
            model = random_denoiser(name, torch.device("cpu"), smoke=True)
            seq_len = model.config.max_position_embeddings
        else:
            bad = [word for word in args.models if "=" not in word]
            if bad:
                raise ConfigError(f"--models takes NAME=PATH words; {bad[0]!r} has no '='")
            paths = dict(word.split("=", 1) for word in args.models)
            if args.model is not None and args.model not in paths:
                raise ConfigError(f"--model {args.model!r} is not among --models ({', '.join(paths)})")
            model_set = open_models(paths, RuntimeConfig())
            name = args.model or model_set.light_to_heavy[-1]
            model = model_set.models[name]
            noise, seq_len = model_set.noise, model_set.seq_len
        if model.config.attention != "mla" or model.config.time_conditioning:
            raise ConfigError(f"model {name!r} must be an MLA model without time conditioning (the latent cache "
                              f"keeps MLA's latents; these trajectories feed no noise level); measure another")
    except UserError as e:
        print(f"latent_drift: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    records: dict[int, list[tuple[int, int, float, bool]]] = {n: [] for n in periods}
    for b in range(-(-args.samples // args.batch)):
        size = min(args.batch, args.samples - b * args.batch)
        for every, rows in drift_batch(model, noise, args.steps, size, seq_len, args.seed + b, periods).items():
            records[every].extend((seq + b * args.batch, age, kl, agree) for seq, age, kl, agree in rows)
        print(f"batch {b + 1}: {size} sequences", flush=True)
    result = {"steps": args.steps, "samples": args.samples, "seed": args.seed, "model": name,
              "settings": {f"R{n}": summarise(records[n], args.samples, n) for n in periods},
              "provenance": provenance(model.device, 1)}
    for setting, rows in result["settings"].items():
        for r in rows:
            print(f"{setting} age {r['age']:>3}: KL {r['kl']:.3g} [{r['kl_low']:.3g}, {r['kl_high']:.3g}] nats, "
                  f"top-1 agreement {r['top1_agreement']:.3f} over {r['positions']} positions", flush=True)
    if args.out is not None:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
