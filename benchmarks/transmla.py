"""TransMLA for MDLMs, measured (reports/transmla-mdlm): train a DiT MDLM (MDLM-small shape, MHA), convert it to MLA at
several latent ranks, fine-tune each briefly, and compare with an MLA model trained from scratch for the same tokens;
also an MLA model with 128-wide heads (issue 19's attention-kernel lever) at the same tokens.

    python benchmarks/transmla.py run --data-root .carry --out /tmp/transmla      # on the GPU (resumable)
    python benchmarks/transmla.py report /tmp/transmla --out reports/transmla-mdlm  # tables and the figure

Every training run uses one recipe (the second reproduction's: batch 32 x 1024, cosine lr to 0.1 of its peak,
betas (0.9, 0.95), no dropout) on the default mixture, and validates on the same noise draws (train.seed 0), so
the OWT bounds are comparable. Fine-tuning starts from the converted model (train.init) and validates it at step 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROPE = 32
PEAK_BF16 = 776e12  # measured 8192^3 bf16 matmul rate of the lent H200 (REFERENCE.md section 6)


def recipe(root: str, out: Path, steps: int, lr: float, warmup: int, extra: list[str]) -> list[str]:
    return ["data=mixture", f"data.root={root}", "train=h200", "runtime=h200", "train.batch_size=32",
            "train.micro_batch_size=32", "train.lr_schedule=cosine", "train.lr_final=0.1", "train.betas=[0.9,0.95]",
            f"train.warmup_steps={warmup}", "train.log_every=50", f"train.val_every={min(500, steps)}",
            f"train.ckpt_every={steps}", "train.val_batches=4", "train.keep_checkpoints=1", f"train.steps={steps}",
            f"train.lr={lr}", f"train.out_dir={out}", *extra]


def scratch_rank(results: dict) -> int:
    """The latent rank of the from-scratch control (the `large` preset's, unless overridden)."""
    words = [w for w in results["scratch"]["config"] if w.startswith("model.kv_lora_rank=")]
    return int(words[-1].split("=")[1]) if words else 256


def run_log(folder: Path) -> dict:
    """OWT bounds by step, the median tokens/s after the first two intervals, and the mean of the other sources."""
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][2:]
    by_step: dict[int, dict[str, float]] = {}
    for r in vals:
        by_step.setdefault(r["step"], {})[r["source"]] = r["ppl"]
    train_records = [r for r in records if r["kind"] == "train"]
    return {"val": {str(k): v for k, v in sorted(by_step.items())},
            "tokens_per_s": statistics.median(rates) if rates else None,
            "tokens_seen": train_records[-1]["tokens_seen"] if train_records else 0,
            "parameters": next(r["parameters"] for r in records if r["kind"] == "start")}


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig

    from mdlm_sched.config import RuntimeConfig
    from mdlm_sched.config_load import load
    from mdlm_sched.convert import convert_command
    from mdlm_sched.flops import training_flops_per_token
    from mdlm_sched.generate import sample_command
    from mdlm_sched.noise import make_noise
    from mdlm_sched.sampling_config import SampleConfig
    from mdlm_sched.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device

    def save(key: str, value: dict) -> None:
        results[key] = value
        results_file.write_text(json.dumps(results, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(value)[:400]}", flush=True)

    def trained(key: str, words: list[str]) -> Path:
        folder = out / key
        start = time.perf_counter()
        cfg = load(words)
        train(cfg, progress=False)
        torch._dynamo.reset()
        record = run_log(folder)
        fraction = make_noise(cfg.noise.schedule, cfg.noise.eps).masked_fraction(cfg.noise.sampling_eps)
        model_config = AutoConfig.from_pretrained(folder / "model")
        per_token = training_flops_per_token(model_config, cfg.data.seq_len, fraction)
        mfu = per_token * (record["tokens_per_s"] or 0) / PEAK_BF16
        save(key, {**record, "mfu_executed": mfu, "wall_s": round(time.perf_counter() - start, 1), "config": words,
                   "shape": f"{model_config.num_hidden_layers} x {model_config.hidden_size}", "device": device_name})
        return folder

    steps, tune = args.source_steps, max(1, round(args.source_steps * args.tune_share))
    source = trained("source", recipe(args.data_root, out / "source", steps, 6e-4, 300,
                                      ["model=dit_small", "model.dropout=0.0", *args.override]))
    runtime = RuntimeConfig(device=args.device, precision="auto")
    for rank in args.ranks:
        folder = out / f"mla{rank}"
        if not folder.exists():
            start = time.perf_counter()
            done = convert_command(str(source / "model"), str(folder), rank, ROPE,
                                   f"{args.data_root}/owt_train.jsonl.xz", 64, ".cache/mdlm_sched", runtime, False)
            save(f"convert{rank}", {"kv_source": done.kv_source, "kv_converted": done.kv_converted,
                                    "calibration_bound_source": done.bound_source,
                                    "calibration_bound_converted": done.bound_converted,
                                    "wall_s": round(time.perf_counter() - start, 1)})
        trained(f"tuned{rank}", recipe(args.data_root, out / f"tuned{rank}", tune, 3e-4, max(1, tune // 10),
                                       [f"train.init={folder}", "runtime.compile=false", *args.override]))
    for name, path in (("source", source / "model"), ("converted", out / f"tuned{args.ranks[1]}" / "model")):
        record = sample_command(SampleConfig(models={"m": str(path)}, schedule="all-large", steps=1000,
                                             num_samples=args.sample_batch, batch_size=args.sample_batch, seed=0,
                                             out_dir=str(out / f"samples_{name}"),
                                             runtime=runtime), progress=False)
        save(f"sampling_{name}", {"wall_s": record["wall_s"], "batch": args.sample_batch, "steps": 1000,
                                  "flops_full": record["flops"]["full"], "model": str(path)})
    trained("scratch", recipe(args.data_root, out / "scratch", steps + tune, 6e-4, 300,
                              ["model=large", "model.dropout=0.0", *args.override]))
    trained("heads128", recipe(args.data_root, out / "heads128", steps + tune, 6e-4, 300,
                               ["model=large", "model.dropout=0.0", "model.num_attention_heads=6",
                                "model.qk_nope_head_dim=96", "model.v_head_dim=128", *args.override]))
    print("ALLDONE", flush=True)


def ablate(args: argparse.Namespace) -> None:
    """Where the conversion loses: the OWT bound right after conversion over rotary widths and latent ranks, on the
    trainer's validation draws (train.seed 0, source 'owt'), from a freshly trained source."""
    import math

    import torch

    from mdlm_sched.config_load import load
    from mdlm_sched.convert import attention_input_moments
    from mdlm_sched.data import load_sources, load_tokenizer
    from mdlm_sched.models.loading import load_denoiser
    from mdlm_sched.models.transmla import convert_to_mla
    from mdlm_sched.objectives import denoiser_objective, evaluate
    from mdlm_sched.runtime import STREAM_VAL, step_seed
    from mdlm_sched.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    cfg = load(recipe(args.data_root, out / "source", args.source_steps, 6e-4, 300,
                      ["model=dit_small", "model.dropout=0.0", *args.override]))
    result = train(cfg, progress=False)
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    source = load_denoiser(result.model_dir, device)
    tokenizer = load_tokenizer(str(result.model_dir))
    n = cfg.data.seq_len
    val = load_sources([cfg.data.val["owt"]], tokenizer, n, cfg.data.cache_dir)[:4 * 32]
    calibration = load_sources([f"{args.data_root}/owt_train.jsonl.xz"], tokenizer, n, cfg.data.cache_dir)[:64]
    moments = attention_input_moments(source, calibration, 8, device, amp, progress=False)

    def bound(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return math.exp(evaluate(model, denoiser_objective(model.config), val, 32, device, amp,
                                     seed=step_seed(0, 0, STREAM_VAL)).mean())

    rows.append({"model": "source", "bound": bound(source), "steps": args.source_steps})
    print(json.dumps(rows[-1]), flush=True)
    for rank, rope in args.settings:
        start = time.perf_counter()
        converted = convert_to_mla(source, rank, rope, moments).to(device)
        rows.append({"rank": rank, "rope": rope, "kv": rank + rope, "bound": bound(converted),
                     "convert_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
        (out / "ablation.json").write_text(json.dumps(rows, indent=1))
        del converted
    print("ALLDONE", flush=True)


def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((Path(args.folder) / "results.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def final(key: str, source: str = "owt") -> float | None:
        if key not in results:
            return None
        val = results[key]["val"]
        return val[max(val, key=int)][source]

    src = final("source")
    # Runs before 2026-12-07 recorded neither: all were the dit_small source (12 x 768) on one H200.
    shape, device = results["source"].get("shape", "12 x 768"), results["source"].get("device", "one H200")
    lines = ["| model | KV elements / token / block | OWT bound: as trained, or right after conversion | "
             "after fine-tune | tokens seen |", "| --- | ---: | ---: | ---: | ---: |"]
    ranks = sorted((int(k.removeprefix("convert")) for k in results if k.startswith("convert")), reverse=True)
    kv_source = results[f"convert{ranks[0]}"]["kv_source"] if ranks else None
    lines.append(f"| source DiT (MHA, {shape}) | {kv_source} | {src:.2f} | - | "
                 f"{results['source']['tokens_seen'] / 1e6:.1f}M |")
    points = []
    for rank in ranks:
        if f"tuned{rank}" not in results:
            continue
        val = results[f"tuned{rank}"]["val"]
        before, after = val["0"]["owt"], final(f"tuned{rank}")
        kv = results[f"convert{rank}"]["kv_converted"]
        points.append((kv, before, after))
        lines.append(f"| converted, latent {rank} + rotary {ROPE} | {kv} | {before:.2f} | {after:.2f} | "
                     f"+{results[f'tuned{rank}']['tokens_seen'] / 1e6:.1f}M |")
    scratch = final("scratch")
    if scratch is not None:
        rank = scratch_rank(results)
        lines.append(f"| MLA from scratch, latent {rank} + rotary {ROPE} | {rank + ROPE} | - | {scratch:.2f} | "
                     f"{results['scratch']['tokens_seen'] / 1e6:.1f}M |")
    lines += ["", "| sampling, T = 1000 | batch | wall-clock s | FLOPs (full) |", "| --- | ---: | ---: | ---: |"]
    for name, what in (("source", "source DiT (MHA)"), ("converted", "converted + fine-tuned")):
        if f"sampling_{name}" in results:
            r = results[f"sampling_{name}"]
            lines.append(f"| {what} ({Path(r['model']).parent.name}) | {r['batch']} | {r['wall_s']:.2f} | "
                         f"{r['flops_full']:.3e} |")
    lines += ["", "| training run | parameters | tokens/s (median) | MFU (executed FLOPs, 776 TFLOP/s) | OWT bound |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key in ("source", "scratch", "heads128"):
        if key in results:
            r = results[key]
            rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
            mfu = r["mfu_executed"] if "mfu_executed" in r else r["mfu_full"]  # runs before 2026-12-02: head everywhere
            lines.append(f"| {key} | {r['parameters'] / 1e6:.1f}M | {rate} | {mfu:.1%} | {final(key):.2f} |")
    ablation_file = Path(args.folder) / "ablation.json"
    ablation = json.loads(ablation_file.read_text()) if ablation_file.is_file() else []
    if ablation:
        source_bound = ablation[0]["bound"]
        lines += ["", f"| ablation (source: {ablation[0]['steps']} steps, bound {source_bound:.2f}) | latent | "
                  "rotary key | KV elements | OWT bound right after conversion | ratio to source |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in ablation[1:]:
            lines.append(f"| | {r['rank']} | {r['rope']} | {r['kv']} | {r['bound']:.2f} | "
                         f"{r['bound'] / source_bound:.4f} |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if ablation:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.axhline(ablation[0]["bound"], color="k", ls="--", lw=1, label="source DiT (MHA)")
        for rank, marker in ((512, "o-"), (1024, "s-"), (1536, "D")):
            rows = sorted((r["rope"], r["bound"]) for r in ablation[1:] if r["rank"] == rank)
            if rows:
                ax.plot(*zip(*rows), marker, label=f"latent {rank}")
        low = sorted((r["rank"], r["bound"]) for r in ablation[1:] if r["rope"] == 32)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rotary key width (of the source's 12 x 64 = 768 rotary dims)")
        ax.set_ylabel("OWT bound right after conversion")
        ax.set_title(f"Where the conversion loses (latent {', '.join(str(r) for r, _ in low)} at rotary 32: "
                     f"{', '.join(f'{b:.0f}' for _, b in low)})", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            fig.savefig(out / f"ablation_rope.{ext}", dpi=150)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(src, color="k", ls="--", lw=1, label=f"source DiT (MHA), {kv_source} KV elements")
    if points:
        kv, before, after = zip(*points)
        ax.plot(kv, before, "o-", label="converted, before training")
        tuned = next(results[k] for k in results if k.startswith("tuned"))
        share = tuned["tokens_seen"] / results["source"]["tokens_seen"]
        ax.plot(kv, after, "s-", label=f"converted + fine-tune ({share:.0%} of the source's tokens)")
    if scratch is not None:
        ax.plot([scratch_rank(results) + ROPE], [scratch], "D", color="C3", label="MLA from scratch, same total tokens")
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for p in points} | ({scratch_rank(results) + ROPE} if scratch is not None else set()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("key/value elements per token and block (latent + rotary key)")
    ax.set_ylabel("OWT validation perplexity bound")
    ax.set_title(f"TransMLA on a {shape} MDLM ({device})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"bound_vs_latent.{ext}", dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/transmla")
    p.add_argument("--source-steps", type=int, default=2000)
    p.add_argument("--tune-share", type=float, default=0.05, help="fine-tune tokens as a share of the source's")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--ranks", type=int, nargs=3, default=[512, 256, 128], help="latent ranks of the conversions; the "
                   "second one's model is timed in sampling")
    p.add_argument("--device", default="cuda")
    p.add_argument("--override", nargs="*", default=[], help="config words added to every run (a CPU smoke test)")
    p.set_defaults(func=run)
    p = sub.add_parser("ablate")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/transmla-ablation")
    p.add_argument("--source-steps", type=int, default=1200)
    p.add_argument("--settings", type=lambda s: tuple(map(int, s.split("/"))), nargs="+",
                   default=[(1536, 768), (1024, 512), (1024, 256), (512, 256), (512, 128), (512, 64), (512, 32),
                            (256, 32), (128, 32)], help="RANK/ROPE pairs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--override", nargs="*", default=[], help="config words added to the source's run (a CPU test)")
    p.set_defaults(func=ablate)
    p = sub.add_parser("report")
    p.add_argument("folder")
    p.add_argument("--out", default="reports/transmla-mdlm")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
