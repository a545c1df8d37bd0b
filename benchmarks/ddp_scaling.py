"""Scaling over the GPUs of one host (torchrun + DDP): training throughput and sweep-point wall-clock per N.

Not yet run on GPUs: no multi-GPU machine was lent when this was written. Run it on nvidia-h200-x2
(NVLink multicast off, NCCL_NVLS_ENABLE=0, which the driver sets unless it is set already):

    NCCL_NVLS_ENABLE=0 python benchmarks/ddp_scaling.py --gpus 1 2 --data-root .carry \
        --out reports/h200-ddp-scaling/ddp_scaling.json

The driver runs one torchrun job of this script per N, each exactly as one would by hand, e.g. for N = 2:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node=2 benchmarks/ddp_scaling.py --gpus 1 2 \
        --data-root .carry --worker --json /tmp/ddp/n2.json --work /tmp/ddp/n2

then prints the table and writes --out. A check of the script itself on the CPU (gloo, tiny models, 8 steps;
its numbers mean nothing):

    python benchmarks/ddp_scaling.py --smoke --gpus 1 2 --out /tmp/ddp_smoke.json

What each job measures (strong scaling: the same work at every N):
  train  `mdlm_sched.train.train` of each --models preset (default: small and large, then the judge
         judge_small) for --steps steps at the global batch --batch in micro-batches of --micro, so each
         of the N ranks runs --batch / N sequences a step. tokens/s is the run's own log (global tokens):
         the median over the logged intervals after the first two (compilation and warm-up), validation
         and checkpoints excluded. Efficiency at N = tokens/s(N) / (N x tokens/s(1)).
  sweep  `mdlm_sched.sweep.run_sweep` of one point per --schedules entry with the denoisers and judge just
         trained (their quality is beside the point: a step's work does not depend on the weights):
         --samples samples at T = --sweep-steps in sampler batches of --sweep-batch, dealt out to the
         ranks, then judged. Sampling wall-clock (wall_s) and judging (judge_s) of each point from
         results.jsonl. Efficiency at N = wall_s(1) / (N x wall_s(N)).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mdlm_sched.artifacts import SweepDir
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.config_load import load
from mdlm_sched.distributed import distributed
from mdlm_sched.provenance import provenance
from mdlm_sched.ranks import DistContext
from mdlm_sched.sampling_config import ReferenceConfig, SweepConfig, SweepGroup
from mdlm_sched.sweep import run_sweep
from mdlm_sched.train import train


def settings(args: argparse.Namespace) -> dict:
    """Presets and sizes: the GPU runs' or, with --smoke, the tiny CPU ones."""
    if args.smoke:
        return {"models": ["tiny", "tiny_large", "judge_tiny"], "data": "owt_tiny", "runtime": "cpu", "seq_len": 64,
                "steps": 8, "batch": 8, "micro": 2, "log_every": 2, "samples": 8, "sweep_steps": 16,
                "sweep_batch": 2}
    return {"models": args.models, "data": "owt", "runtime": args.runtime, "seq_len": args.seq_len,
            "steps": args.steps, "batch": args.batch, "micro": args.micro, "log_every": args.log_every,
            "samples": args.samples, "sweep_steps": args.sweep_steps, "sweep_batch": args.sweep_batch}


def runtime_config(name: str, data_root: str) -> RuntimeConfig:
    """A runtime preset (load() checks a whole run config, data paths included: hence data_root)."""
    return load([f"runtime={name}", f"data.root={data_root}"]).runtime


def bench_train(preset: str, s: dict, data_root: str, out_dir: Path, ctx: DistContext) -> dict | None:
    """Train one preset under this job's ranks; its row on rank 0 (None elsewhere)."""
    cfg = load([f"model={preset}", f"data={s['data']}", f"runtime={s['runtime']}", f"data.root={data_root}",
                f"data.seq_len={s['seq_len']}", f"train.out_dir={out_dir}", f"train.steps={s['steps']}",
                f"train.batch_size={s['batch']}", f"train.micro_batch_size={s['micro']}",
                f"train.log_every={s['log_every']}", f"train.val_every={s['steps']}", f"train.ckpt_every={s['steps']}",
                "train.val_batches=1", "train.warmup_steps=10"])
    train(cfg, progress=False)
    if not ctx.is_main:
        return None
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # after compilation and warm-up
    row = {"model": preset, "world_size": ctx.world_size, "global_batch": s["batch"], "micro_batch": s["micro"],
           "seq_len": s["seq_len"], "steps": s["steps"], "tokens_per_s": round(statistics.median(rates)),
           "tokens_per_s_intervals": [round(r) for r in rates],
           "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    print(json.dumps(row), flush=True)
    return row


def bench_sweep(s: dict, schedules: list[str], work: Path, runtime: RuntimeConfig, ctx: DistContext) -> list[dict]:
    """One sweep point per schedule with the trained denoisers (the first two presets) and judge (the third)."""
    small, large, judge = s["models"][:3]
    cfg = SweepConfig(models={"small": str(work / small), "large": str(work / large)}, judge=str(work / judge),
                      groups={"scaling": SweepGroup(schedules=schedules)}, step_counts=[s["sweep_steps"]], seeds=[0],
                      num_samples=s["samples"], batch_size=s["sweep_batch"], seq_len=s["seq_len"],
                      reference=ReferenceConfig(sources={}), save_samples=False, out_dir=str(work / "sweep"),
                      runtime=runtime)
    run_sweep(cfg, progress=False, echo=lambda _: None)
    if not ctx.is_main:
        return []
    rows = [{"schedule": r.label, "world_size": ctx.world_size, "samples": r.num_samples, "steps": r.steps,
             "batch": s["sweep_batch"], "wall_s": round(r.wall_s, 3), "judge_s": round(r.judge_s, 3)}
            for r in SweepDir(work / "sweep").read().points]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def worker(args: argparse.Namespace) -> None:
    """One torchrun job: every part at this job's N, rows written by rank 0 to --json."""
    s = settings(args)
    work = Path(args.work)
    # One process group for all the parts: train and run_sweep use it and leave it in place.
    runtime = runtime_config(s["runtime"], args.data_root)
    with distributed(runtime) as (ctx, device):
        rows = [bench_train(preset, s, args.data_root, work / preset, ctx) for preset in s["models"]]
        sweep = bench_sweep(s, args.schedules, work, runtime, ctx)
        if ctx.is_main:
            Path(args.json).write_text(json.dumps({
                "world_size": ctx.world_size, "train": rows, "sweep": sweep,
                "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "settings": s,
                "provenance": provenance(device, ctx.world_size)}, indent=1) + "\n")


def efficiency(rate: float, n: int, base_rate: float, base_n: int) -> float:
    """Strong-scaling efficiency: the rate per GPU at n against that at base_n (for times, pass 1 / time)."""
    return (rate / n) / (base_rate / base_n)


def driver(args: argparse.Namespace) -> None:
    """Run a torchrun job per N, print the tables, write --out."""
    if not args.smoke and torch.cuda.device_count() < max(args.gpus):
        raise SystemExit(f"{max(args.gpus)} GPUs asked for, {torch.cuda.device_count()} visible; run this on a "
                         f"machine with that many (nvidia-h200-x2) or use --smoke on the CPU")
    if not args.smoke and len(args.models) < 3:  # the sweep needs two denoisers and the judge
        raise SystemExit(f"--models {' '.join(args.models)}: the sweep step needs two denoisers then a judge, "
                         f"e.g. --models small large judge_small")
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    if args.smoke:  # one thread per process at every N (torchrun sets it only for N > 1)
        env.setdefault("OMP_NUM_THREADS", "1")
    jobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.gpus:
            path = Path(tmp) / f"n{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
                   *sys.argv[1:], "--worker", "--json", str(path), "--work", str(Path(tmp) / f"n{n}")]
            print(f"== N = {n}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            jobs[n] = json.loads(path.read_text())
    base_n = min(args.gpus)
    base = jobs[base_n]
    print(f"\ntraining, strong scaling (global batch {base['settings']['batch']} x {base['settings']['seq_len']} "
          f"tokens per step), tokens/s")
    print(f"{'model':>12} " + " ".join(f"{f'N={n}':>10} {'eff.':>6}" for n in args.gpus))
    for i, row in enumerate(base["train"]):
        cells = [(jobs[n]["train"][i]["tokens_per_s"], n) for n in args.gpus]
        print(f"{row['model']:>12} " + " ".join(
            f"{v:>10} {efficiency(v, n, row['tokens_per_s'], base_n):>6.1%}" for v, n in cells))
    print(f"\nsweep point ({base['settings']['samples']} samples, T = {base['settings']['sweep_steps']}), "
          f"sampling wall-clock s (judging s)")
    print(f"{'schedule':>12} " + " ".join(f"{f'N={n}':>16} {'eff.':>6}" for n in args.gpus))
    for i, row in enumerate(base["sweep"]):
        cells = [(jobs[n]["sweep"][i], n) for n in args.gpus]
        print(f"{row['schedule']:>12} " + " ".join(
            f"{c['wall_s']:>8.2f} ({c['judge_s']:5.2f}) "
            f"{efficiency(1 / c['wall_s'], n, 1 / row['wall_s'], base_n):>6.1%}" for c, n in cells))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"jobs": [jobs[n] for n in args.gpus]}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="N of each job (processes = GPUs)")
    parser.add_argument("--models", nargs="+", default=["small", "large", "judge_small"],
                        help="presets to train; the first two are the sweep's denoisers, the third its judge")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256, help="global sequences per optimizer step")
    parser.add_argument("--micro", type=int, default=32, help="sequences per forward/backward")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--schedules", nargs="+", default=["all-large", "sandwich"])
    parser.add_argument("--samples", type=int, default=256, help="samples per sweep point")
    parser.add_argument("--sweep-steps", type=int, default=1000, help="T of the sweep points")
    parser.add_argument("--sweep-batch", type=int, default=64, help="sampler batch (batches are dealt to the ranks)")
    parser.add_argument("--data-root", default="../shared/data", help="folder with gpt2-tokenizer/ and owt_*.jsonl.xz")
    parser.add_argument("--runtime", default="h200", help="runtime preset (h200: bf16 + torch.compile)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, not speed")
    parser.add_argument("--out", default=None, help="write every job's rows and environment as JSON here")
    parser.add_argument("--worker", action="store_true", help="(set by the driver) run as one torchrun job")
    parser.add_argument("--json", help="(worker) where rank 0 writes the job's rows")
    parser.add_argument("--work", help="(worker) folder for the job's runs")
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
