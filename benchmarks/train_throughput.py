"""Training throughput of the MLA-MDLM presets on one GPU (the H200 here).

Runs the trainer's own step (mdlm_sched.train.train_step: forward, NELBO, backward, clipping,
AdamW, EMA) on random tokens at the given micro-batch sizes, one optimizer step per micro-batch,
and prints tokens/s and model FLOPs utilisation. FLOPs are counted in full (blocks, attention
scores and the output head; mdlm_sched.flops), training = 3 x forward, against the measured bf16
matrix rate of 776 TFLOP/s (REFERENCE.md section 6).

    python benchmarks/train_throughput.py --models small large --batches 16 32 64 --out reports/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mdlm_sched.config import load
from mdlm_sched.flops import forward_flops
from mdlm_sched.models import build_model
from mdlm_sched.runtime import autocast_dtype, configure_backends, resolve_device
from mdlm_sched.train import EMA, make_objective, train_step

PEAK_BF16 = 776e12  # measured 8192^3 bf16 matmul rate of the lent H200
GPT2_VOCAB, EOS = 50257, 50256


def bench(preset: str, micro_batch: int, seq_len: int, steps: int, warmup: int, compile_: bool,
          data_root: str, profile: bool = False) -> dict:
    # The data section is only validated (tokenizer folder, files), not read: the tokens are random.
    cfg = load([f"model={preset}", "runtime=h200" if torch.cuda.is_available() else "runtime=cpu",
                f"runtime.compile={str(compile_).lower()}", f"data.root={data_root}", f"data.seq_len={seq_len}"])
    device = resolve_device(cfg.runtime)
    configure_backends(device)
    amp = autocast_dtype(cfg.runtime, device)
    model = build_model(cfg, GPT2_VOCAB, EOS, "benchmark").to(device).train()
    objective = make_objective(cfg, mask_id=GPT2_VOCAB)
    step_loss = torch.compile(objective.loss) if cfg.runtime.compile else objective.loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                  fused=device.type == "cuda")
    ema = EMA(model, 0.9999)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x0 = torch.randint(0, GPT2_VOCAB, (micro_batch, seq_len), device=device, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = objective.prepare(x0, gen)
        loss, _ = train_step(model, step_loss, optimizer, inputs, 1, device, amp, grad_clip=1.0)
        ema.update(model, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if profile:  # where the time goes: the top GPU kernels of three more steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                train_step(model, step_loss, optimizer, objective.prepare(x0, gen), 1, device, amp, grad_clip=1.0)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    step_s = statistics.median(times)
    tokens = micro_batch * seq_len
    fwd = forward_flops(model.config, seq_len, micro_batch)
    return {
        "model": preset,
        "layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "step_ms_median": round(step_s * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "tokens_per_s": round(tokens / step_s),
        "mfu_full": round(3 * fwd.full / step_s / PEAK_BF16, 4),
        "mfu_blocks_only": round(3 * fwd.blocks_only / step_s / PEAK_BF16, 4),
        "fwd_gflop_per_token_full": round(fwd.full / tokens / 1e9, 4),
        "fwd_gflop_per_token_blocks": round(fwd.blocks_only / tokens / 1e9, 4),
        "last_loss": round(loss, 4),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "large"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--data-root", default="../shared/data", help="folder with gpt2-tokenizer/ and the OWT files")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of each configuration")
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args()

    rows = []
    for preset in args.models:
        for batch in args.batches:
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
            rows.append(bench(preset, batch, args.seq_len, args.steps, args.warmup, not args.no_compile,
                              args.data_root, args.profile))
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
           platform.processor(), "compile": not args.no_compile, "peak_bf16_flops": PEAK_BF16,
           "steps_timed": args.steps, "warmup": args.warmup}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"\n{env}")
    print(f"{'model':>6} {'batch':>5} {'step ms':>8} {'tokens/s':>10} {'MFU full':>9} {'MFU blocks':>10} {'mem GiB':>8}")
    for r in rows:
        print(f"{r['model']:>6} {r['micro_batch']:>5} {r['step_ms_median']:>8} {r['tokens_per_s']:>10} "
              f"{r['mfu_full']:>9.1%} {r['mfu_blocks_only']:>10.1%} {r['peak_mem_GiB']!s:>8}")


if __name__ == "__main__":
    main()
