"""Speed of the latent cache against exact sampling, with random-weight models of the presets.

Which positions the cached sampler recomputes depends only on the unmask steps (drawn before any network
call), never on the weights, so random weights cost the same time and FLOPs as trained ones; the quality
side (gen PPL, MAUVE against exact sampling) needs trained models and belongs to reports/latent-cache.

For each batch size B, step count T and schedule, the exact sampler and each refresh setting sample one batch
per seed (the same seeds for every setting): wall-clock (median over seeds, after one untimed warm-up batch),
positions run through the network, executed FLOPs (mdlm_sched.flops, full convention), the speed-up against
exact, and the share of the exact sampler's tokens drawn the same (random weights: a sanity check, not quality).

    python benchmarks/latent_cache.py --batches 1 128 --steps 1000 256 --out reports/latent-cache/speed.json
    python benchmarks/latent_cache.py --batches 1 --steps 1000 --compiled   # exact as `sample` runs it (below)
    python benchmarks/latent_cache.py --smoke   # tiny shapes on the CPU (the test suite runs this)
    python benchmarks/latent_cache.py --plan-only   # no network: each setting's executed FLOPs against exact
                                                    # sampling at the presets' shapes, and the host planning time
    python benchmarks/latent_cache.py --op-count    # operators one eager call dispatches (CPU, below)
    python benchmarks/latent_cache.py --call-times --compiled --compile-latent --batches 1 --steps 1000 \
        --schedules all-large --settings exact R8 R16   # each call timed alone, then the batches (below)

Without --graphed or --compiled both samplers run eager. --graphed replays both from CUDA graphs for calls of up
to 16 sequences (the runtime's default): the exact sampler's forwards (cudagraph.GraphedHidden) and the cached
one's refresh and partial steps, the partial step's columns padded to the next power of two (at least 2) so that about
log2(L) widths cover every step (cudagraph.GraphedLatent). --compiled compiles the exact sampler's network too,
so that it runs as `mdlm-sched sample` does on a GPU (it implies --graphed; the cached sampler does not use that
network). --compile-latent compiles the cached sampler's two steps with dynamic shapes (PreparedDenoiser's
compile_latent), which takes minutes. Compilation and capture of every shape happen before the untimed warm-up
batch (PreparedDenoiser.prepare_graphs); a call of more than 16 sequences is not graphed, and a shape it first
shows in a timed batch recompiles inside its time.

--op-count runs the `large` preset (random weights) once per call kind at B = 1, L = 1024 on the CPU under bf16
autocast, as the GPU's eager path runs: the full forward, the cache's refresh and its partial step at several
widths, each with the weights cast per call, cast once (PreparedDenoiser's cast_weights), and cast once with the
adaLN modulations folded (fold_modulation). It counts the aten operators dispatched, views excluded: a proxy for
the kernels an eager call launches on a GPU (at batch 1 the time of a step that is bound by launches, not
arithmetic), not a timing.

--fold builds both samplers' models with the Linear weights cast to bf16 once and the adaLN modulations folded
(PreparedDenoiser's cast_weights and fold_modulation, as benchmarks/sampling.py's fastest latency variant): without
time conditioning the modulations are constants, so a call skips their matmuls.

--call-times times each kind of network call alone at B = 1 on the path the flags choose (median of 10 x --seeds
calls after 3 untimed ones; CUDA events, so a call's host time counts where the GPU waits for it): each model's
full forward, the cache's refresh and its partial step at every padded width that seed 0's plans use. From those
it predicts each setting's network time for one sample, the sum of its calls' times over the plan, and the same
for exact sampling (a full forward at each step that decodes): the speed-up that the network alone allows, to set
against the measured one (the difference is the sampler's own time between calls). Partial steps are timed at
padded widths, as the graphed path runs them. The timed batches follow as without the flag, on the same models,
so that one compilation serves both; the JSON holds the call times ("calls"), the predictions ("predictions")
and the timed rows.

--plan-only counts FLOPs from the plan alone (flops.forward_flops / latent_cached_flops, the full convention, the
head at the decoded positions), so it runs in seconds on a CPU; FLOPs are not wall-clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mdlm_sched.config import RuntimeConfig
from mdlm_sched.config_load import load
from mdlm_sched.cudagraph import padded_width
from mdlm_sched.diffusion import unmask_probability
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import atomic_write_json, check_writable
from mdlm_sched.flops import forward_flops, latent_cached_flops, trace_flops
from mdlm_sched.latent_cache import plan_latent_steps
from mdlm_sched.modelset import PreparedDenoiser
from mdlm_sched.models import denoiser_config
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import configure_backends
from mdlm_sched.sampler import unmask_steps
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import DEFAULT_T_MIN, parse_schedule, time_grid
from presets import GPT2, SMOKE, random_denoiser, random_denoiser_of, time_ms, timed


def settings_of(spec: str, share: float) -> SamplerSettings:
    """"exact", or "R<n>": the latent cache refreshing every n steps (R0: only on takeover and the share)."""
    if spec == "exact":
        return SamplerSettings()
    return SamplerSettings(latent_cache=True, latent_refresh_every=int(spec.removeprefix("R")),
                           latent_refresh_share=share)


class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators dispatched inside it, views (no kernel) excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def op_counts(smoke: bool) -> list[dict]:
    """Operators of one eager call of each kind, B = 1, bf16 autocast on the CPU (see --op-count)."""
    rows = []
    words = ["model=large", *((*SMOKE, "model.num_hidden_layers=2") if smoke else ())]
    for cast, fold in ((False, False), (True, False), (True, True)):  # a model each: both change it in place
        model = random_denoiser_of(words, torch.device("cpu")).model
        prepared = PreparedDenoiser(model, torch.bfloat16, cast_weights=cast, fold_modulation=fold)
        length = model.config.max_position_embeddings
        x = torch.randint(0, GPT2 - 1, (1, length))
        cache, row_ids = prepared.new_latent_cache(1, length), torch.arange(1)
        calls = {"forward": lambda: prepared.hidden(x),
                 "refresh": lambda: prepared.latent_hidden(x, None, cache, row_ids, None)}
        for width in (1, 4, 16, 64):
            cols = torch.arange(width)[None]
            calls[f"partial A={width}"] = lambda cols=cols: prepared.latent_hidden(x, None, cache, row_ids, cols)
        for call, fn in calls.items():
            counter = _OpCount()
            with counter:
                fn()
            rows.append({"call": call, "cast_weights": cast, "fold_modulation": fold,
                         "layers": model.config.num_hidden_layers,
                         "operators": counter.ops})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def seed0_unmask(steps: int, spec: str, batch: int, seq_len: int) -> tuple[list[str], np.ndarray]:
    """The model of every step (the last entry: the noise removal's) and each position's unmask step [B, L] from
    seed 0's draws: what the cached sampler plans from, without a network."""
    schedule = parse_schedule(spec, steps, ["small", "large"])
    times = time_grid(steps, DEFAULT_T_MIN).tolist()
    p_unmask = [unmask_probability(LogLinearNoise(1e-3), t, s) for t, s in zip(times, times[1:])]
    u = torch.rand((batch, seq_len), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return [*schedule.names, schedule.names[-1]], unmask_steps(u, p_unmask).numpy()


def call_times(models: dict[str, PreparedDenoiser], args: argparse.Namespace, seq_len: int) -> dict:
    """Each kind of network call timed alone at B = 1, and each setting's network time predicted (--call-times)."""
    plans = {}  # (T, schedule, setting) -> (the model of each step, the plan of seed 0's draws at B = 1)
    for steps, spec in itertools.product(args.steps, args.schedules):
        names, unmask = seed0_unmask(steps, spec, 1, seq_len)
        for name in (s for s in args.settings if s != "exact"):
            every = settings_of(name, args.share).latent_refresh_every
            plans[(steps, spec, name)] = names, plan_latent_steps(unmask, names, every, args.share, torch.device("cpu"))
    widths = sorted({padded_width(step.positions.shape[1], seq_len) for _, plan in plans.values() for step in plan
                     if len(step.partial)})
    calls = []
    for name, model in models.items():
        model.prepare_graphs(1, seq_len, latent=True)
        x = torch.randint(0, GPT2 - 1, (1, seq_len), device=model.device)
        cache, rows = model.new_latent_cache(1, seq_len), torch.zeros(1, dtype=torch.long, device=model.device)
        kinds = {"forward": lambda: model.hidden(x), "refresh": lambda: model.latent_hidden(x, None, cache, rows, None)}
        for a in widths:
            cols = torch.arange(a, device=model.device)[None]
            kinds[f"partial A={a}"] = lambda cols=cols: model.latent_hidden(x, None, cache, rows, cols)
        for kind, fn in kinds.items():
            calls.append({"model": name, "call": kind, "ms_median": time_ms(fn, model.device, args.seeds * 10)})
            print(json.dumps(calls[-1]), flush=True)
    ms = {(c["model"], c["call"]): c["ms_median"] for c in calls}
    predictions = []
    for (steps, spec, name), (names, plan) in plans.items():
        ran = [(model, step) for model, step in zip(names, plan) if step.sequences]  # steps that run the network
        exact_ms = sum(ms[(model, "forward")] for model, _ in ran)
        cached_ms = sum(ms[(model, "refresh" if len(step.refresh) else
                            f"partial A={padded_width(step.positions.shape[1], seq_len)}")] for model, step in ran)
        predictions.append({"steps": steps, "schedule": spec, "setting": name, "network_calls": len(ran),
                            "refreshes": sum(bool(len(step.refresh)) for _, step in ran),
                            "exact_network_s": exact_ms / 1e3, "cached_network_s": cached_ms / 1e3,
                            "predicted_speedup": exact_ms / cached_ms})
        print(json.dumps(predictions[-1]), flush=True)
    return {"calls": calls, "predictions": predictions}


def plan_only(args: argparse.Namespace) -> list[dict]:
    """Each setting's executed FLOPs / exact sampling's, from the plan of one seed's unmask steps (no network)."""
    configs = {n: denoiser_config(load([f"model={n}"]), GPT2, GPT2 - 1, "") for n in ("small", "large")}
    seq_len, rows = configs["large"].max_position_embeddings, []
    for steps, spec, batch in itertools.product(args.steps, args.schedules, args.batches):
        names, unmask = seed0_unmask(steps, spec, batch, seq_len)
        for name in (s for s in args.settings if s != "exact"):
            settings = settings_of(name, args.share)
            start = time.perf_counter()
            plan = plan_latent_steps(unmask, names, settings.latent_refresh_every, args.share, torch.device("cpu"))
            host_s = time.perf_counter() - start
            exact = cached = 0
            for model, step in zip(names, plan):
                if step.sequences:
                    nf, config = len(step.refresh), configs[model]
                    exact += forward_flops(config, seq_len, step.sequences, head_tokens=len(step.take)).full
                    cached += latent_cached_flops(config, seq_len, nf, step.sequences - nf,
                                                  step.positions_run - nf * seq_len, head_tokens=len(step.take)).full
            rows.append({"steps": steps, "schedule": spec, "batch": batch, "setting": name, "flops_exact": exact,
                         "flops_cached": cached, "flops_ratio": cached / exact, "plan_host_s": host_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 256])
    p.add_argument("--schedules", nargs="+", default=["all-large", "sandwich"])
    p.add_argument("--settings", nargs="+", default=["exact", "R1", "R4", "R8", "R16", "R0"])
    p.add_argument("--share", type=float, default=0.5, help="latent_refresh_share of the cached settings")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, B = 2, T = 16, one seed (CPU)")
    p.add_argument("--plan-only", action="store_true", help="FLOPs from the plan at the presets' shapes, no network")
    p.add_argument("--op-count", action="store_true", help="operators per eager call, B = 1, on the CPU")
    p.add_argument("--call-times", action="store_true", help="each network call timed alone at B = 1, and each "
                   "setting's network time predicted from them")
    p.add_argument("--graphed", action="store_true", help="both samplers replay CUDA graphs for <= 16 sequences")
    p.add_argument("--compiled", action="store_true", help="the exact sampler compiled (and both graphed)")
    p.add_argument("--compile-latent", action="store_true", help="the cached sampler's steps compiled")
    p.add_argument("--fold", action="store_true", help="both samplers' models with the Linear weights cast once and "
                   "the adaLN modulations folded (PreparedDenoiser's cast_weights and fold_modulation)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.out is not None:  # before any work: a run must not end unable to write what it measured
        try:
            check_writable(args.out.parent, "--out's folder")
        except ConfigError as e:
            print(f"latent_cache: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.plan_only:
        rows = plan_only(args)
        if args.out is not None:
            atomic_write_json(args.out, {"rows": rows, "share": args.share})
        return
    if args.op_count:
        rows = op_counts(args.smoke)
        if args.out is not None:
            atomic_write_json(args.out, {"rows": rows, "provenance": provenance(torch.device("cpu"), 1)})
        return
    if args.smoke:
        args.batches, args.steps, args.seeds = [2], [16], 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    configure_backends(device)
    graphed = args.graphed or args.compiled
    graph_rows = RuntimeConfig().cuda_graph_rows if graphed else 0  # as `mdlm-sched sample` runs
    models = {name: random_denoiser(name, device, args.smoke, args.compiled, graph_rows, args.compile_latent, graphed,
                                    args.fold) for name in ("small", "large")}
    latent = any(name != "exact" for name in args.settings)
    configs = {name: m.config for name, m in models.items()}
    seq_len = configs["large"].max_position_embeddings
    rows: list[dict] = []
    run_info = {"share": args.share, "device": str(device), "compiled": args.compiled, "graphed": graphed,
                "compile_latent": args.compile_latent, "fold": args.fold,
                "provenance": provenance(device, 1)}
    if args.call_times:  # before the timed batches, on the same compiled models (one compilation for both)
        run_info.update(call_times(models, args, seq_len))
        if args.out is not None:
            atomic_write_json(args.out, {"rows": rows, **run_info})
    for steps in args.steps:
        for spec in args.schedules:
            schedule = parse_schedule(spec, steps, ["small", "large"])
            for batch in args.batches:
                exact_tokens, exact_s = {}, None
                for model in models.values():  # every graph a step of this batch can replay, untimed
                    model.prepare_graphs(batch, seq_len, latent)
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
                    if args.out is not None:  # rewritten after every row: a run cut short keeps what it measured
                        atomic_write_json(args.out, {"rows": rows, **run_info})


if __name__ == "__main__":
    main()
