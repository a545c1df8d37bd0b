"""Sampling speed of the scheduled sampler on one GPU (the H200 here), with random-weight models.

Models: the `large` (12 x 768) and `small` (4 x 768) presets of configs/model (the gated MLA block; random
weights, benchmarks/presets.py), GPT-2 vocabulary, length 1024, bf16 autocast, float32 head, the blocks compiled
with torch.compile (dynamic batch). Before 2026-12-06 this script built plain (ungated) blocks.

Parts (--parts):
  network   the compiled blocks alone, [B, 1024] per call, B = 1 .. 128: tokens/s and fraction of
            776 TFLOP/s (FLOPs: mdlm_sched.flops, blocks only; the head is not run here).
  steps     the real sampler with the cache off (every sequence through the network at every step),
            T = --short-steps: time per step, the share of it spent outside the network's calls (blocks
            and head: the draws, gathers and bookkeeping), and FLOPs/s of the whole step.
  profile   kernel time of the large model's blocks at B = --profile-batch by kind (attention,
            matrix products, the rest), GPU operations per call and the idle share between them, to show
            what limits the rate; at B <= --cuda-graph-rows the CUDA graph replay's profile too.
  full      --samples sequences at T = 1000 with the cache on, all-large then the sandwich
            (250 small steps) with the same seed, then a cache-off run on --cache-samples sequences:
            wall-clock against FLOPs for the schedule, the share of sequence-steps that skip the
            network, and what the cache saves.
  latency   one batch of --latency-batches sequences (1 and 8) at T = 1000, all-large and the
            sandwich: without CUDA graphs, with them (--cuda-graph-rows), with them and the
            Linear weights cast to bf16 once (PreparedDenoiser's cast_weights), and with all that and
            the adaLN modulations folded (PreparedDenoiser's fold_modulation): wall-clock per batch
            (median of --latency-reps seeds, after a warm-up that compiles and captures every batch
            size), the share of it outside the network's calls, and whether the tokens equal those of the
            plain path, seed by seed.

    python benchmarks/sampling.py --parts network steps full latency --out reports/h200-sampling/bench_sampling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mdlm_sched.flops import forward_flops, names_light_to_heavy
from mdlm_sched.generate import cache_summary, flops_summary, run_schedule
from mdlm_sched.modelset import ModelSet, PreparedDenoiser
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import configure_backends
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import DEFAULT_T_MIN
from presets import SMOKE_LEN, random_denoiser, time_ms

PEAK_BF16 = 776e12  # measured 8192^3 bf16 matmul rate of the lent H200 (REFERENCE.md section 6)
SEQ_LEN = 1024  # the paper's length; --smoke runs 64


class Timed:
    """A PreparedDenoiser whose network calls (blocks and head) are timed: CUDA events on a GPU."""

    def __init__(self, inner: PreparedDenoiser) -> None:
        self.inner, self.config, self.device = inner, inner.config, inner.device
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_seconds = 0.0  # --smoke on a CPU: calls are synchronous, a clock suffices

    def _timed(self, fn, *args):
        if self.device.type != "cuda":
            start = time.perf_counter()
            out = fn(*args)
            self.cpu_seconds += time.perf_counter() - start
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.events.append((start, end))
        return out

    def hidden(self, input_ids, sigma=None):
        return self._timed(self.inner.hidden, input_ids, sigma)

    def logits_from_hidden(self, hidden):
        return self._timed(self.inner.logits_from_hidden, hidden)

    def network_seconds(self) -> float:
        """Seconds spent in network calls since the last call of this method."""
        if self.device.type != "cuda":
            total, self.cpu_seconds = self.cpu_seconds, 0.0
            return total
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        self.events.clear()
        return total


def bench_network(models: dict[str, PreparedDenoiser], batches: list[int], reps: int) -> list[dict]:
    rows = []
    for name, model in models.items():
        for b in batches:
            x = torch.randint(0, 50257, (b, SEQ_LEN), device=model.device)
            x[:, ::2] = model.config.mask_token_id
            for _ in range(3):
                model.hidden(x)
            times = []
            timer = Timed(model)
            for _ in range(reps):
                timer.hidden(x)
                times.append(timer.network_seconds())
            t = statistics.median(times)
            flops = forward_flops(model.config, SEQ_LEN, b, head_tokens=0).blocks_only
            rows.append({"model": name, "batch": b, "ms": round(t * 1e3, 3), "tokens_per_s": round(b * SEQ_LEN / t),
                         "tflops": round(flops / t / 1e12, 1), "mfu": round(flops / t / PEAK_BF16, 4)})
            print(f"network {name:>5} B={b:<4} {t * 1e3:8.2f} ms  {b * SEQ_LEN / t / 1e6:6.3f}M tok/s  "
                  f"{flops / t / PEAK_BF16:6.1%} of 776 TFLOP/s", flush=True)
    return rows


def kernel_kind(name: str) -> str:
    name = name.lower()
    if name.startswith("triton_"):  # inductor's fused element-wise kernels (their names list the ops fused)
        return "other"
    if any(k in name for k in ("attn", "attention", "fmha", "flash", "cudnn", "sdpa")):
        return "attention"
    if any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas")):
        return "matmul"
    return "other"


def bench_profile(model: PreparedDenoiser, batch: int, graph_rows: int, compile: bool) -> dict:
    """The kernel profile of the large model's forward at B = batch; when batch <= graph_rows, that of its CUDA graph
    replay too (the path `sample` takes for such calls), whose idle share says whether launches still cost time."""
    result = _profile_calls(model, batch, "plain")
    if batch <= graph_rows:
        graphed = PreparedDenoiser(model.model, model.dtype, compile, graph_rows)
        result["graphed"] = _profile_calls(graphed, batch, f"graphs<={graph_rows}")
    return result


def _profile_calls(model: PreparedDenoiser, batch: int, label: str, calls: int = 5) -> dict:
    """GPU time of `calls` forwards [batch, L] by kernel kind, the GPU operations (kernels and copies) per call, and
    the wall time per call (CUDA events around the calls: GPU time plus the GPU's idle gaps between operations).
    The profiler slows the host's launches, so without graphs the idle share is an upper bound. On a CPU (--smoke)
    the same table of the aten operators' own CPU time: a check of the script, not a profile."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    x = torch.randint(0, 50257, (batch, SEQ_LEN), device=model.device)
    for _ in range(3):  # compilation, graph capture, cuDNN's plans
        model.hidden(x)
    if cuda:
        torch.cuda.synchronize()  # the warm-up's kernels end before the profile starts
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        wall_ms = time_ms(lambda: [model.hidden(x) for _ in range(calls)], model.device, reps=1, warm_up=0) / calls
    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    operations = 0
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0:
            continue
        by_kind[kernel_kind(event.key)] = by_kind.get(kernel_kind(event.key), 0.0) + us
        top[event.key[:90]] = us
        operations += event.count
    total = sum(by_kind.values())
    shares = {k: round(v / total, 4) for k, v in sorted(by_kind.items())}
    flops = forward_flops(model.config, SEQ_LEN, batch, head_tokens=0)
    cfg = model.config
    attn_flops = 2 * cfg.num_hidden_layers * SEQ_LEN * SEQ_LEN * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * batch
    result = {"batch": batch, "path": label, "kernel_ms_per_call": round(total / calls / 1e3, 3),
              "wall_ms_per_call": round(wall_ms, 3), "idle_share": round(1 - total / calls / 1e3 / wall_ms, 4),
              "gpu_ops_per_call": operations / calls, "shares": shares,
              "attention_flop_share": round(attn_flops / flops.blocks_only, 4),
              "attention_tflops": round(attn_flops * calls / (by_kind.get("attention", 0) / 1e6) / 1e12, 1)
              if by_kind.get("attention") else None,
              "matmul_tflops": round((flops.blocks_only - attn_flops) * calls / (by_kind.get("matmul", 0) / 1e6)
                                     / 1e12, 1) if by_kind.get("matmul") else None,
              "top_kernels_us": dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])}
    print(f"profile large B={batch} {label}: {result['kernel_ms_per_call']} ms of GPU time in "
          f"{result['wall_ms_per_call']} ms a call (idle {result['idle_share']:.1%}, "
          f"{result['gpu_ops_per_call']:.0f} GPU operations), {shares}, attention {result['attention_tflops']} "
          f"TFLOP/s, matmul {result['matmul_tflops']} TFLOP/s, attention = {result['attention_flop_share']:.0%} "
          f"of the FLOPs", flush=True)
    return result


def model_set(models: dict[str, PreparedDenoiser]) -> ModelSet:
    timed = {name: Timed(m) for name, m in models.items()}
    order = names_light_to_heavy({n: m.config for n, m in models.items()}, SEQ_LEN)
    return ModelSet(models=timed, light_to_heavy=order,
                    noise=LogLinearNoise(1e-3), tokenizer=None, seq_len=SEQ_LEN,
                    device=next(iter(models.values())).device)


def timed_run(ms: ModelSet, spec: str, steps: int, samples: int, batch: int, cache: bool, seed: int = 0) -> dict:
    schedule = ms.schedule(spec, steps)
    output = run_schedule(ms, schedule, SamplerSettings(cache=cache), samples, batch, seed, progress=False)
    network = sum(m.network_seconds() for m in ms.models.values())
    flops = flops_summary(ms, output)
    return {"schedule": spec, "segments": schedule.segments_str(), "steps": steps, "samples": samples, "batch": batch,
            "cache": cache, "wall_s": round(output.wall_s, 3), "network_s": round(network, 3),
            "outside_network_share": round(1 - network / output.wall_s, 4),
            "tokens_per_s": round(samples * SEQ_LEN / output.wall_s),
            "mfu_blocks_only_wall": round(flops["blocks_only"] / output.wall_s / PEAK_BF16, 4),
            "mfu_full_wall": round(flops["full"] / output.wall_s / PEAK_BF16, 4),
            "mfu_blocks_only_network": round(flops["blocks_only"] / network / PEAK_BF16, 4),
            "flops_blocks_only": flops["blocks_only"], "flops_full": flops["full"],
            "saving_blocks_only": round(flops["saving_blocks_only"], 4), "saving_full": round(flops["saving_full"], 4),
            "sequences_run": flops["sequences_run"], "calls": flops["calls"],
            "cache_stats": cache_summary(output, steps)}


def bench_steps(ms: ModelSet, batches: list[int], steps: int) -> list[dict]:
    rows = []
    for b in batches:
        timed_run(ms, "all-large", 4, b, b, cache=False)  # warm-up (compilation for this batch size)
        row = timed_run(ms, "all-large", steps, b, b, cache=False)
        row["step_ms"] = round(row["wall_s"] / steps * 1e3, 3)
        rows.append(row)
        print(f"steps   large B={b:<4} {row['step_ms']:8.2f} ms/step  "
              f"{row['tokens_per_s'] * steps / 1e6:6.3f}M tok/s  "
              f"{row['mfu_full_wall']:6.1%} of 776 TFLOP/s (full, wall)  "
              f"outside network {row['outside_network_share']:5.1%}", flush=True)
    return rows


def bench_full(ms: ModelSet, samples: int, batch: int, cache_samples: int, steps: int) -> list[dict]:
    timed_run(ms, "sandwich", 8, batch, batch, cache=True)  # warm-up: compiles both models
    rows = []
    for spec, n, cache in (("all-large", samples, True), ("sandwich", samples, True),
                           ("all-large", cache_samples, False), ("all-large", cache_samples, True)):
        row = timed_run(ms, spec, steps, n, min(batch, n), cache)
        rows.append(row)
        print(f"full    {spec:>9} N={n:<4} cache={'on ' if cache else 'off'} {row['wall_s']:8.2f} s  "
              f"skipped {row['cache_stats']['skipped_share']:5.1%}  "
              f"outside network {row['outside_network_share']:5.1%}  "
              f"{row['mfu_blocks_only_wall']:6.1%} blocks-only MFU (wall)", flush=True)
    return rows


def bench_latency(models: dict[str, PreparedDenoiser], batches: list[int], steps: int, reps: int,
                  graph_rows: int, compile: bool) -> list[dict]:
    """Wall-clock of one batch at T = steps without and with CUDA graphs, then with graphs and the Linear weights
    cast once (PreparedDenoiser's cast_weights), then also with the adaLN modulations folded (fold_modulation), and
    whether the tokens equal those of the plain path."""
    tokens_without: dict[tuple[int, str, int], torch.Tensor] = {}
    rows_out = []
    # The cast and the fold change the shared models in place, so their variants come last, in this order, and each
    # is made when it runs.
    for rows, cast, fold in ((0, False, False), (graph_rows, False, False), (graph_rows, True, False),
                             (graph_rows, True, True)):
        prepared = {name: PreparedDenoiser(m.model, m.dtype, compile, rows, cast_weights=cast, fold_modulation=fold)
                    for name, m in models.items()}
        baseline = rows == 0 and not cast
        ms = model_set(prepared)
        for b in batches:
            for model in prepared.values():  # compile and capture every batch size a step can run
                for n in range(1, b + 1):
                    model.hidden(torch.full((n, SEQ_LEN), model.config.mask_token_id, device=model.device))
            for spec in ("all-large", "sandwich"):
                schedule = ms.schedule(spec, steps)
                walls, networks, equal = [], [], []
                for seed in range(reps):
                    output = run_schedule(ms, schedule, SamplerSettings(), b, b, seed, progress=False)
                    walls.append(output.wall_s)
                    networks.append(sum(m.network_seconds() for m in ms.models.values()))
                    key = (b, spec, seed)
                    if baseline:
                        tokens_without[key] = output.tokens
                    else:
                        equal.append(bool(torch.equal(output.tokens, tokens_without[key])))
                row = {"cuda_graph_rows": rows, "cast_weights": cast, "fold_modulation": fold, "batch": b,
                       "schedule": spec, "steps": steps, "reps": reps,
                       "wall_s_median": round(statistics.median(walls), 4), "wall_s_min": round(min(walls), 4),
                       "wall_s_max": round(max(walls), 4), "network_s_median": round(statistics.median(networks), 4),
                       "outside_network_share": round(statistics.median(1 - n / w for n, w in zip(networks, walls)), 4),
                       "tokens_equal_to_no_graphs": None if baseline else f"{sum(equal)}/{len(equal)}"}
                rows_out.append(row)
                equal_note = "" if baseline else f"  tokens equal to the plain path: {row['tokens_equal_to_no_graphs']}"
                print(f"latency graphs<={rows:<3} cast={'yes' if cast else 'no '} fold={'yes' if fold else 'no '} "
                      f"B={b:<3} {spec:>9} {row['wall_s_median']:7.3f} s (min {row['wall_s_min']:.3f}, "
                      f"max {row['wall_s_max']:.3f}, {reps} seeds; outside the network "
                      f"{row['outside_network_share']:.1%}){equal_note}", flush=True)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["network", "steps", "full"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--short-steps", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128, help="sampler batch for the full runs")
    parser.add_argument("--cache-samples", type=int, default=64)
    parser.add_argument("--profile-batch", type=int, default=64)
    parser.add_argument("--full-steps", type=int, default=1000, help="T of the full runs")
    parser.add_argument("--latency-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--latency-reps", type=int, default=5)
    parser.add_argument("--cuda-graph-rows", type=int, default=16,
                        help="graphs for the latency part's graph runs and the profile's graphed call")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, not speed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    global SEQ_LEN
    if args.smoke:
        SEQ_LEN = SMOKE_LEN
    device = torch.device("cpu" if args.smoke else "cuda")
    configure_backends(device)
    t0 = time.perf_counter()
    compile = not (args.no_compile or args.smoke)
    # The network, steps and full parts run without CUDA graphs, as measured before them; latency compares.
    models = {name: random_denoiser(name, device, args.smoke, compile) for name in ("small", "large")}
    result: dict = {"seq_len": SEQ_LEN, "t_min": DEFAULT_T_MIN, "compile": compile,
                    "provenance": provenance(device)}
    if "network" in args.parts:
        result["network"] = bench_network(models, args.batches, args.reps)
    if "profile" in args.parts:
        result["profile"] = bench_profile(models["large"], args.profile_batch, args.cuda_graph_rows, compile)
    ms = model_set(models)
    if "steps" in args.parts:
        result["steps"] = bench_steps(ms, args.batches, args.short_steps)
    if "full" in args.parts:
        result["full"] = bench_full(ms, args.samples, args.batch, args.cache_samples, args.full_steps)
    if "latency" in args.parts:
        result["latency"] = bench_latency(models, args.latency_batches, args.full_steps, args.latency_reps,
                                          args.cuda_graph_rows, compile)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['total_s']} s")


if __name__ == "__main__":
    main()
