"""Training throughput of the MLA-MDLM presets on one GPU (the H200 here), through the real trainer.

Each configuration runs `mdlm_sched.train.train` (data from local files, forward, NELBO, backward,
clipping, fused AdamW, EMA, the finite-loss guard) for a few dozen steps of --accum micro-batches
each, and reads tokens/s from the run's own log: the median over the logged intervals after the
first two (compilation and warm-up), validation and checkpoint time excluded.

FLOPs are counted as executed (mdlm_sched.flops: blocks, attention scores, the time embedding where
there is one, and the padded output head at the masked positions only, where the NELBO runs it: the
expected masked fraction noise.masked_fraction, about half), training = 3 x forward, against the
measured bf16 matrix rate of 776 TFLOP/s (REFERENCE.md section 6). "Head everywhere" prices the
head at every position, as this trainer did up to commit 9788e9c and MDLM's trainer does; it is
for comparison with those runs only.

    python benchmarks/train_throughput.py --models small large --batches 32 64 --data-root .carry \
        --out reports/h200-train-throughput/bench_train.json

`--compile-modes default max-autotune-no-cudagraphs` runs each configuration in each torch.compile mode of the
training step (runtime.compile_mode). `--runtime cpu --models tiny` runs it on a CPU
(tests/test_benchmark_smoke.py): a check, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from mdlm_sched.config_load import load
from mdlm_sched.flops import forward_flops, training_flops_per_token
from mdlm_sched.noise import make_noise
from mdlm_sched.train import train

PEAK_BF16 = 776e12  # measured 8192^3 bf16 matmul rate of the lent H200
SPEC_BF16 = 989e12  # NVIDIA's dense bf16 figure for the H100/H200 SXM


def bench(preset: str, batch: int, accum: int, seq_len: int, steps: int, log_every: int, data_root: str,
          runtime: str, loss_kernel: str, compile_mode: str, out_dir: Path) -> dict:
    cfg = load([f"model={preset}", "data=owt", f"runtime={runtime}", f"data.root={data_root}",
                f"data.seq_len={seq_len}", f"train.out_dir={out_dir}", f"train.steps={steps}",
                f"train.batch_size={batch * accum}", f"train.micro_batch_size={batch}",
                f"train.log_every={log_every}", f"train.val_every={steps}",
                f"train.ckpt_every={steps}", "train.val_batches=1", "train.warmup_steps=10",
                f"train.loss_kernel={loss_kernel}", f"runtime.compile_mode={compile_mode}"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # after compile and warm-up
    tokens_per_s = statistics.median(rates)
    config = AutoConfig.from_pretrained(result.model_dir)
    fraction = make_noise(cfg.noise.schedule, cfg.noise.eps).masked_fraction(cfg.noise.sampling_eps)
    fwd = forward_flops(config, cfg.data.seq_len)  # one sequence, the head everywhere
    per_token = {"executed": training_flops_per_token(config, cfg.data.seq_len, fraction) / 3,
                 "everywhere": fwd.full / cfg.data.seq_len, "blocks": fwd.blocks_only / cfg.data.seq_len}
    return {
        "model": preset,
        "loss_kernel": loss_kernel,
        "compile_mode": compile_mode if cfg.runtime.compile else None,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "micro_batch": batch,
        "accum": accum,
        "seq_len": cfg.data.seq_len,
        "steps": steps,
        "tokens_per_s": round(tokens_per_s),
        "tokens_per_s_intervals": [round(r) for r in rates],
        "step_ms": round(batch * accum * cfg.data.seq_len / tokens_per_s * 1e3, 2),
        "masked_fraction": fraction,
        "mfu_executed": round(3 * per_token["executed"] * tokens_per_s / PEAK_BF16, 4),
        "mfu_executed_spec": round(3 * per_token["executed"] * tokens_per_s / SPEC_BF16, 4),
        "mfu_head_everywhere": round(3 * per_token["everywhere"] * tokens_per_s / PEAK_BF16, 4),
        "mfu_blocks_only": round(3 * per_token["blocks"] * tokens_per_s / PEAK_BF16, 4),
        "fwd_gflop_per_token_executed": round(per_token["executed"] / 1e9, 4),
        "fwd_gflop_per_token_blocks": round(per_token["blocks"] / 1e9, 4),
        "last_loss": round(result.last_loss, 4),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "large"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--data-root", default="../shared/data", help="folder with gpt2-tokenizer/ and owt_*.jsonl.xz")
    parser.add_argument("--runtime", default="h200", help="runtime preset (h200: bf16 + torch.compile)")
    parser.add_argument("--loss-kernels", nargs="+", default=["torch"],
                        help="train.loss_kernel values: torch, liger, cce (the last two need their library)")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        help="runtime.compile_mode values: default, max-autotune-no-cudagraphs (with compile)")
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args()

    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, batch, kernel, mode in itertools.product(args.models, args.batches, args.loss_kernels,
                                                             args.compile_modes):
            try:
                rows.append(bench(preset, batch, args.accum, args.seq_len, args.steps, args.log_every, args.data_root,
                                  args.runtime, kernel, mode, Path(tmp) / f"{preset}-{batch}-{kernel}-{mode}"))
                print(json.dumps(rows[-1]), flush=True)
            except Exception as e:  # one configuration failing (a kernel library, say) keeps the others
                failed.append({"model": preset, "micro_batch": batch, "loss_kernel": kernel, "compile_mode": mode,
                               "error": f"{type(e).__name__}: {e}"[:2000]})
                print(json.dumps(failed[-1]), flush=True)
            torch._dynamo.reset()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = {"torch": torch.__version__, "device": device,
           "runtime": args.runtime, "peak_bf16_flops": PEAK_BF16, "spec_bf16_flops": SPEC_BF16, "steps": args.steps,
           "log_every": args.log_every}
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows, "failed": failed}, indent=1))
    print(f"\n{env}")
    print(f"{'model':>6} {'kernel':>6} {'compile mode':>26} {'micro':>5} {'accum':>5} {'step ms':>8} {'tokens/s':>10} "
          f"{'MFU executed':>12} {'of 989T':>7} {'MFU head everywhere':>19} {'MFU blocks':>10} {'mem GiB':>8}")
    for r in rows:
        print(f"{r['model']:>6} {r['loss_kernel']:>6} {r['compile_mode']!s:>26} {r['micro_batch']:>5} {r['accum']:>5} "
              f"{r['step_ms']:>8} "
              f"{r['tokens_per_s']:>10} {r['mfu_executed']:>12.1%} {r['mfu_executed_spec']:>7.1%} "
              f"{r['mfu_head_everywhere']:>19.1%} {r['mfu_blocks_only']:>10.1%} {r['peak_mem_GiB']!s:>8}")


if __name__ == "__main__":
    main()
