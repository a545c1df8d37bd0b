"""Where a training step of the real trainer spends its GPU time, by kernel family (one GPU).

Runs `mdlm_sched.train.train` (as benchmarks/train_throughput.py does) for 16 steps of one
micro-batch and profiles three of them (steps 11-13, after compilation and warm-up) with
torch.profiler. Prints the wall-clock per step (median of steps 5-16; the trainer reads the loss
every step, so the step boundaries are host-synchronised), the CUDA kernel time per step by
family, and the longest kernels. Wall-clock minus kernel time is the time the GPU sits idle.

    python benchmarks/train_profile.py --model large --batch 64 --data-root .carry

Families, by kernel name: attention (cuDNN / flash SDPA), matmul (cuBLAS nvjet / cutlass),
fused elementwise (inductor's Triton kernels: norms, dropout, GELU, rotary, cross-entropy),
optimizer (fused AdamW, EMA, clipping), other.

`--runtime cpu` without a GPU profiles the CPU ops instead (tests/test_benchmark_smoke.py): a check that the
script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import mdlm_sched.train as trainer
from mdlm_sched.config_load import load

STEPS, WAIT, WARMUP, ACTIVE = 16, 8, 2, 3
FAMILIES = [
    ("attention", ("cudnn", "fmha", "flash", "attn", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "splitk")),
    ("fused elementwise (Triton)", ("triton",)),
    ("optimizer / EMA / clipping", ("multi_tensor", "adam", "foreach", "lerp")),
]


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="large")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--runtime", default="h200", help="runtime preset; cpu (with a GPU absent) profiles the CPU "
                                                          "ops instead: a check that the script runs")
    parser.add_argument("--top", type=int, default=12, help="longest kernels to list")
    parser.add_argument("--capture-nonzero", action="store_true",
                        help="trace the masked positions' nonzero into the compiled graph (no graph break)")
    args = parser.parse_args()
    if args.capture_nonzero:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True

    out = tempfile.mkdtemp()
    cfg = load([f"model={args.model}", "data=owt", f"runtime={args.runtime}", f"data.root={args.data_root}",
                f"data.seq_len={args.seq_len}",
                f"train.out_dir={out}/run", f"train.steps={STEPS}", f"train.batch_size={args.batch}",
                f"train.micro_batch_size={args.batch}", "train.log_every=8", f"train.val_every={10 * STEPS}",
                f"train.ckpt_every={10 * STEPS}", "train.val_batches=1", "train.warmup_steps=10"])
    on_gpu = torch.cuda.is_available()
    activity, kind = (ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA) if on_gpu else \
        (ProfilerActivity.CPU, torch.autograd.DeviceType.CPU)
    prof = profile(activities=[activity], schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE))
    stamps: list[float] = []
    step = trainer.train_step

    def profiled_step(*a, **k):  # the trainer's own step, then the profiler's step boundary
        result = step(*a, **k)
        stamps.append(time.perf_counter())
        prof.step()
        return result

    trainer.train_step = profiled_step
    with prof:
        trainer.train(cfg, progress=False)

    per_family: collections.Counter[str] = collections.Counter()
    per_kernel: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages():
        if event.device_type != kind:
            continue
        ms = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / ACTIVE / 1e3  # per step
        per_family[family(event.key)] += ms
        per_kernel[event.key] += ms
    wall = statistics.median((b - a) * 1e3 for a, b in zip(stamps[3:], stamps[4:]))
    total = sum(per_family.values())
    device = torch.cuda.get_device_name() if on_gpu else "CPU (ops, not kernels)"
    print(f"\n{args.model}, micro-batch {args.batch} x {args.seq_len}, {device}, torch {torch.__version__}"
          f"{', nonzero captured' if args.capture_nonzero else ''}")
    print(f"{'wall-clock per step':<30} {wall:8.1f} ms")
    print(f"{'kernel time per step':<30} {total:8.1f} ms   (device idle {wall - total:.1f} ms, "
          f"{(wall - total) / wall:.1%})")
    for name, ms in per_family.most_common():
        print(f"  {name:<28} {ms:8.1f} ms {ms / total:6.1%}")
    print("longest kernels (ms per step):")
    for name, ms in per_kernel.most_common(args.top):
        print(f"  {ms:7.2f}  {family(name)[:10]:<10} {name[:100]}")


if __name__ == "__main__":
    main()
