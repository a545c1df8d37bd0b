"""Training throughput of the MLA-MDLM presets on one GPU (the H200 here), through the real trainer.

Each configuration runs `mdlm_sched.train.train` (data from local files, forward, NELBO, backward,
clipping, fused AdamW, EMA, the finite-loss guard) for a few dozen steps with one micro-batch per
optimizer step, and reads tokens/s from the run's own log: the median over the logged intervals
after the first two (compilation and warm-up), validation and checkpoint time excluded. FLOPs are
counted in full (blocks, attention scores and the padded output head; mdlm_sched.flops), training
= 3 x forward, against the measured bf16 matrix rate of 776 TFLOP/s (REFERENCE.md section 6).

    python benchmarks/train_throughput.py --models small large --batches 32 64 --data-root .carry \
        --out reports/h200-train-throughput/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from mdlm_sched.config import load
from mdlm_sched.flops import forward_flops
from mdlm_sched.train import train

PEAK_BF16 = 776e12  # measured 8192^3 bf16 matmul rate of the lent H200


def bench(preset: str, batch: int, seq_len: int, steps: int, log_every: int, data_root: str, runtime: str,
          out_dir: Path) -> dict:
    cfg = load([f"model={preset}", "data=owt", f"runtime={runtime}", f"data.root={data_root}",
                f"data.seq_len={seq_len}", f"train.out_dir={out_dir}", f"train.steps={steps}",
                f"train.batch_size={batch}",
                f"train.micro_batch_size={batch}", f"train.log_every={log_every}", f"train.val_every={steps}",
                f"train.ckpt_every={steps}", "train.val_batches=1", "train.warmup_steps=10"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # after compile and warm-up
    tokens_per_s = statistics.median(rates)
    config = AutoConfig.from_pretrained(result.model_dir)
    fwd = forward_flops(config, cfg.data.seq_len)  # one sequence
    per_token = {"full": fwd.full / cfg.data.seq_len, "blocks": fwd.blocks_only / cfg.data.seq_len}
    return {
        "model": preset,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "micro_batch": batch,
        "seq_len": cfg.data.seq_len,
        "steps": steps,
        "tokens_per_s": round(tokens_per_s),
        "tokens_per_s_intervals": [round(r) for r in rates],
        "step_ms": round(batch * cfg.data.seq_len / tokens_per_s * 1e3, 2),
        "mfu_full": round(3 * per_token["full"] * tokens_per_s / PEAK_BF16, 4),
        "mfu_blocks_only": round(3 * per_token["blocks"] * tokens_per_s / PEAK_BF16, 4),
        "fwd_gflop_per_token_full": round(per_token["full"] / 1e9, 4),
        "fwd_gflop_per_token_blocks": round(per_token["blocks"] / 1e9, 4),
        "last_loss": round(result.last_loss, 4),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "large"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--data-root", default="../shared/data", help="folder with gpt2-tokenizer/ and owt_*.jsonl.xz")
    parser.add_argument("--runtime", default="h200", help="runtime preset (h200: bf16 + torch.compile)")
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            for batch in args.batches:
                rows.append(bench(preset, batch, args.seq_len, args.steps, args.log_every, args.data_root,
                                  args.runtime, Path(tmp) / f"{preset}-{batch}"))
                print(json.dumps(rows[-1]), flush=True)
                torch._dynamo.reset()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = {"torch": torch.__version__, "device": device,
           "runtime": args.runtime, "peak_bf16_flops": PEAK_BF16, "steps": args.steps, "log_every": args.log_every}
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"\n{env}")
    print(f"{'model':>6} {'batch':>5} {'step ms':>8} {'tokens/s':>10} {'MFU full':>9} {'MFU blocks':>10} "
          f"{'mem GiB':>8}")
    for r in rows:
        print(f"{r['model']:>6} {r['micro_batch']:>5} {r['step_ms']:>8} {r['tokens_per_s']:>10} "
              f"{r['mfu_full']:>9.1%} {r['mfu_blocks_only']:>10.1%} {r['peak_mem_GiB']!s:>8}")


if __name__ == "__main__":
    main()
