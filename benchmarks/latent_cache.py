"""Speed of the latent cache against exact sampling, with random-weight models of the presets.

Which positions the cached sampler recomputes depends only on the unmask steps (drawn before any network
call), never on the weights, so random weights cost the same time and FLOPs as trained ones; the quality
side (gen PPL, MAUVE against exact sampling) needs trained models and belongs to reports/latent-cache.

For each batch size B, step count T and schedule, the exact sampler and each refresh setting sample one batch
per seed (the same seeds for every setting): wall-clock (median over seeds, after one untimed warm-up batch),
positions run through the network, executed FLOPs (mdlm_sched.flops, full convention), the speed-up against
exact, and the share of the exact sampler's tokens drawn the same (random weights: a sanity check, not quality).

    python benchmarks/latent_cache.py --batches 1 128 --steps 1000 256 --out reports/latent-cache/speed.json
    python benchmarks/latent_cache.py --smoke   # tiny shapes on the CPU (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mdlm_sched.config_load import load
from mdlm_sched.flops import trace_flops
from mdlm_sched.modelset import PreparedDenoiser
from mdlm_sched.models import denoiser_config
from mdlm_sched.models.denoiser import MDLMDenoiser
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import configure_backends
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule

GPT2 = 50257  # tokenizer length ([MASK] is appended)
SMOKE = ("model.hidden_size=64", "model.num_attention_heads=4", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.max_seq_len=64", "data.seq_len=64")


def build(preset: str, device: torch.device, smoke: bool) -> PreparedDenoiser:
    """A random-weight denoiser of configs/model/<preset>.yaml (tiny widths with smoke), bf16 autocast on a GPU."""
    config = denoiser_config(load([f"model={preset}", *(SMOKE if smoke else ())]), GPT2, GPT2 - 1, "")
    torch.manual_seed(config.num_hidden_layers)
    model = MDLMDenoiser(config).to(device)
    with torch.no_grad():  # adaLN-Zero starts every gate at zero: random gates, so that every block does work
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return PreparedDenoiser(model, torch.bfloat16 if device.type == "cuda" else None)


def settings_of(spec: str, share: float) -> SamplerSettings:
    """"exact", or "R<n>": the latent cache refreshing every n steps (R0: only on takeover and the share)."""
    if spec == "exact":
        return SamplerSettings()
    return SamplerSettings(latent_cache=True, latent_refresh_every=int(spec.removeprefix("R")),
                           latent_refresh_share=share)


def timed(models: dict, schedule, settings: SamplerSettings, batch: int, seq_len: int, seed: int) -> tuple:
    device = next(iter(models.values())).device
    generator = torch.Generator(device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = sample(models, schedule, LogLinearNoise(1e-3), settings, generator, batch, seq_len)
    result.tokens.cpu()  # waits for the GPU
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 256])
    p.add_argument("--schedules", nargs="+", default=["all-large", "sandwich"])
    p.add_argument("--settings", nargs="+", default=["exact", "R1", "R4", "R8", "R16", "R0"])
    p.add_argument("--share", type=float, default=0.5, help="latent_refresh_share of the cached settings")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, B = 2, T = 16, one seed (CPU)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.batches, args.steps, args.seeds = [2], [16], 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    configure_backends(device)
    models = {name: build(name, device, args.smoke) for name in ("small", "large")}
    configs = {name: m.config for name, m in models.items()}
    seq_len = configs["large"].max_position_embeddings
    rows = []
    for steps in args.steps:
        for spec in args.schedules:
            schedule = parse_schedule(spec, steps, ["small", "large"])
            for batch in args.batches:
                exact_tokens, exact_s = {}, None
                for name in args.settings:
                    settings = settings_of(name, args.share)
                    timed(models, schedule, settings, batch, seq_len, 10**6)  # warm-up, untimed
                    walls, positions, flops, same = [], 0, 0, []
                    for seed in range(args.seeds):
                        wall, result = timed(models, schedule, settings, batch, seq_len, seed)
                        walls.append(wall)
                        positions += sum(r.run * seq_len if r.positions_run is None else r.positions_run
                                         for r in result.trace)
                        flops += trace_flops(result.trace, configs, seq_len).full
                        if name == "exact":
                            exact_tokens[seed] = result.tokens.cpu()
                        elif exact_tokens:
                            same.append((result.tokens.cpu() == exact_tokens[seed]).float().mean().item())
                    wall = statistics.median(walls)
                    exact_s = wall if name == "exact" else exact_s
                    row = {"steps": steps, "schedule": spec, "batch": batch, "setting": name, "seeds": args.seeds,
                           "wall_s_median": wall, "wall_s": walls, "s_per_sample": wall / batch,
                           "positions_run_per_seed": positions / args.seeds, "flops_full_per_seed": flops / args.seeds,
                           "speedup_vs_exact": exact_s / wall if exact_s else None,
                           "same_tokens_as_exact": statistics.mean(same) if same else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "share": args.share, "device": str(device),
                                        "provenance": provenance(device, 1)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
