"""MDLM's gated block around MLA, measured against MDLM's DiT at the same recipe (reports/mla-recipe).

Every run trains a 12 x 768 (or 4 x 768) MDLM through the real trainer on the default mixture with one
recipe: batch 32 x 1024, lr 6e-4 with 300 warm-up steps then a cosine to 0.1 of it, betas (0.9, 0.95),
no dropout, EMA 0.9999, bf16, torch.compile. Every run validates on the same blocks with the same noise
draws (train.seed 0, micro-batch 32), so two runs are compared block by block: the difference of their
OWT bounds gets a paired 95% bootstrap interval over the validation blocks. The training seed is the same
for every run and there is one run per shape: the intervals cover the choice of validation blocks and
masks, not the spread between training seeds.

    # the attention ablation of issue 31 (MHA, GQA, MQA, MLA at equal caches), one budget:
    python benchmarks/mla_recipe.py run --data-root .carry --out /tmp/ablation --parallel 4 --runs dit12:1000 \
        gqa4:1000 gqa2:1000 mqa:1000 mla512:1000 mla256:1000 mla128:1000 --collect $OUT/data
    # the same, detached over several device calls (benchmarks/lease.sh; poll until FINISHED):
    bash benchmarks/lease.sh start abl bash -c 'python3 benchmarks/mla_recipe.py run --data-root .carry \
        --out /tmp/ablation --parallel 4 --runs dit12:1000 gqa4:1000 gqa2:1000 mqa:1000 mla512:1000 mla256:1000 \
        mla128:1000 --collect $JOB_OUT/data && python3 benchmarks/mla_recipe.py speed --runs dit12 gqa4 gqa2 mqa \
        mla512 mla256 mla128 --out $JOB_OUT/data/speed.json'
    bash benchmarks/lease.sh poll abl 560
    # on the GPU: train the named runs (NAME:STEPS), --parallel at a time; rerunning resumes unfinished runs
    python benchmarks/mla_recipe.py run --data-root .carry --out /tmp/recipe --runs dit12:1000 gated12:1000 \
        --collect $OUT/data
    # on the GPU: sampling time per denoising step of each run's shape (random weights), into the data folder
    python benchmarks/mla_recipe.py speed --runs dit12 gqa4 gqa2 mqa mla512 mla256 mla128 --out $OUT/data/speed.json
    # tables and the figures from the collected logs (and speed.json where there is one)
    python benchmarks/mla_recipe.py report reports/mla-recipe/data --out reports/mla-recipe

Runs that run at once share the GPU: their tokens/s are what each got while sharing it (runs.json records, for
each run, every run it shared the GPU with), not the speed of the shape alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def gated_mla(preset: str, latent: int = 256, rope: int = 32, nope: int = 64, v: int = 64,
              extra: tuple[str, ...] = ()) -> list[str]:
    """Model words of a gated MLA model of the preset's depth, its shape pinned."""
    return [f"model={preset}", "model.ada_ln=true", f"model.kv_lora_rank={latent}", f"model.qk_rope_head_dim={rope}",
            f"model.qk_nope_head_dim={nope}", f"model.v_head_dim={v}", *extra]


# The shapes measured: name -> model words after the recipe. Each pins its shape, so that a run repeats what
# reports/mla-recipe measured whatever the presets say now.
RUNS: dict[str, list[str]] = {
    "dit12": ["model=dit_small"],  # MDLM's DiT: MHA, 12 heads of 64, rotary on the whole head, gated, head bias
    "dit4": ["model=dit_small", "model.num_hidden_layers=4"],
    "plain12": [*gated_mla("large"), "model.ada_ln=false"],  # the MLA preset before the gated block
    "gated12": gated_mla("large"),  # the gated block's first preset; `large` now takes v96's value head
    "rope64": gated_mla("large", rope=64),
    "latent320": gated_mla("large", latent=320, rope=64),
    "nope32": gated_mla("large", rope=64, nope=32),
    "latent352": gated_mla("large", latent=352),  # cache 384: the 4x limit, spent on the latent
    "v96": gated_mla("large", v=96),  # value head as wide as the query/key head: same cache, 4.7M more weights
    "nokvnorm": gated_mla("large", extra=("model.kv_norm=false",)),
    "mdlmhead": gated_mla("large", extra=("model.head_bias=true", "model.zero_head=true")),
    # Shapes around the v96 `large` (each paired with v96 of the same budget): more heads of the same widths
    # (same cache, more weights), a wider non-rotary query/key part (qk 96 + 32), MDLM's final layer.
    "heads16": gated_mla("large", v=96, extra=("model.num_attention_heads=16",)),
    "nope96": gated_mla("large", nope=96, v=96),
    "v128": gated_mla("large", v=128),  # a value head wider than the query/key head
    "v96head": gated_mla("large", v=96, extra=("model.head_bias=true", "model.zero_head=true")),
    # Issue 31, attention alone: every shape has MDLM's gated block and DiT final layer (head bias, zero head),
    # 12 query heads and values 64 wide. MHA is dit12; GQA/MQA share K/V heads; MLA at the cache of each of them
    # (elements per token and block: GQA 2 x kv_heads x 64, MLA latent + rotary 32).
    "gqa4": ["model=dit_small", "model.num_key_value_heads=4"],  # cache 512
    "gqa2": ["model=dit_small", "model.num_key_value_heads=2"],  # cache 256
    "mqa": ["model=dit_small", "model.num_key_value_heads=1"],  # cache 128
    "mla512": gated_mla("large", latent=480, extra=("model.head_bias=true", "model.zero_head=true")),
    "mla256": gated_mla("large", latent=224, extra=("model.head_bias=true", "model.zero_head=true")),
    "mla128": gated_mla("large", latent=96, extra=("model.head_bias=true", "model.zero_head=true")),
    "small": gated_mla("small"),
    "small_rope64": gated_mla("small", rope=64),
    "small_v96": gated_mla("small", rope=64, v=96),
}
VAL_BATCHES = 12  # 384 validation blocks per source (fewer where a source has fewer)


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(f"mla_recipe: {message}", file=sys.stderr)
    raise SystemExit(2)


def recipe(root: str, out: Path, steps: int) -> list[str]:
    """The training words every run shares (before its model words)."""
    return ["data=mixture", f"data.root={root}", f"data.cache_dir={out.parent / 'cache'}", "train=h200",
            "runtime=h200", "train.batch_size=32", "train.micro_batch_size=32", "train.lr=6e-4",
            "train.lr_schedule=cosine", "train.lr_final=0.1", "train.warmup_steps=300", "train.betas=[0.9,0.95]",
            "train.log_every=50", "train.val_every=250", f"train.ckpt_every={min(steps, 500)}",
            f"train.val_batches={VAL_BATCHES}", "train.keep_checkpoints=1", f"train.steps={steps}",
            f"train.out_dir={out}"]


def run_words(root: str, out: Path, name: str, steps: int, override: list[str]) -> list[str]:
    """A run's words: the recipe, its model (a preset resets the model section, so dropout comes after it), and
    --override (e.g. tiny sizes on a CPU)."""
    return [*recipe(root, out / f"{name}-{steps}", steps), *RUNS[name], "model.dropout=0.0", *override]


def run(args: argparse.Namespace) -> None:
    from mdlm_sched.config_load import load
    from mdlm_sched.data import load_sources, load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = []
    for item in args.runs:
        name, _, steps = item.partition(":")
        if name not in RUNS or not steps.isdigit():
            refuse(f"--runs {item}: give NAME:STEPS with NAME one of {', '.join(RUNS)}")
        plan.append((name, int(steps)))
    # Tokenise and cache the data once, before the runs start, so that they do not all tokenise it at once.
    cfg = load(run_words(args.data_root, out, *plan[0], args.override))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    for source in [*cfg.data.train, *cfg.data.val.values()]:
        load_sources([source], tokenizer, cfg.data.seq_len, cfg.data.cache_dir, cfg.data.text_field,
                     cfg.data.max_docs)

    record_file = out / "runs.json"
    records = json.loads(record_file.read_text()) if record_file.is_file() else {}
    pending = [(f"{n}-{s}", n, s) for n, s in plan]
    running: dict[str, subprocess.Popen] = {}
    limit = args.parallel or len(pending)
    while pending or running:
        while pending and len(running) < limit:
            key, name, steps = pending.pop(0)
            console = open(out / f"{key}.console.log", "a")
            words = run_words(args.data_root, out, name, steps, args.override)
            running[key] = subprocess.Popen([sys.executable, "-m", "mdlm_sched", "train", *words, "--no-progress"],
                                            stdout=console, stderr=subprocess.STDOUT, env=os.environ.copy())
            # "with": every run that shared the GPU with this one at some time (filled in as others start).
            records.setdefault(key, {"words": words, "launches": []})["launches"].append(
                {"with": sorted(running), "start": time.strftime("%Y-%m-%dT%H:%M:%S")})
            for other in running:
                launch = records[other]["launches"][-1]
                launch["with"] = sorted({*launch["with"], key})
            print(f"[{time.strftime('%H:%M:%S')}] started {key}", flush=True)
        time.sleep(5)
        for key, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            records[key]["launches"][-1].update(end=time.strftime("%Y-%m-%dT%H:%M:%S"), returncode=proc.returncode)
            print(f"[{time.strftime('%H:%M:%S')}] {key} exited {proc.returncode}", flush=True)
            record_file.write_text(json.dumps(records, indent=1))
            if args.collect:
                collect(out, key, Path(args.collect))
                shutil.copy(record_file, Path(args.collect) / "runs.json")
    record_file.write_text(json.dumps(records, indent=1))


def collect(out: Path, key: str, dest: Path) -> None:
    """Copy a run's log, config and console output (no weights) to dest as <key>_log.jsonl etc."""
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((out / key / "log.jsonl", f"{key}_log.jsonl"), (out / key / "config.yaml", f"{key}_config.yaml"),
                      (out / f"{key}.console.log", f"{key}.console.log")):
        if src.is_file():
            shutil.copy(src, dest / name)


def speed(args: argparse.Namespace) -> None:
    """Milliseconds per denoising step of each run's shape (random weights: the same time as trained ones), with
    every sequence run at every step, as the sampler runs on a GPU (compiled, CUDA graphs for calls of up to 16
    sequences; --eager: neither): the median of --reps batches of --steps steps after an untimed one."""
    import torch

    from mdlm_sched.config import RuntimeConfig
    from mdlm_sched.errors import ConfigError
    from mdlm_sched.fileio import atomic_write_json, check_writable
    from mdlm_sched.runtime import configure_backends
    from mdlm_sched.sampling_config import SamplerSettings
    from mdlm_sched.schedule import parse_schedule
    from presets import random_denoiser_of, timed

    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        refuse(f"--runs {' '.join(unknown)}: give run names (no budget), each one of {', '.join(RUNS)}")
    if min(args.batches) < 1 or args.steps < 1 or args.reps < 1:
        refuse("--batches, --steps and --reps must be whole numbers >= 1")
    out, rows = Path(args.out), {}
    try:
        check_writable(out.parent, "--out")
    except ConfigError as e:
        refuse(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_backends(device)
    compiled = device.type == "cuda" and not args.eager
    graph_rows = RuntimeConfig().cuda_graph_rows if compiled else 0
    settings = SamplerSettings(cache=False)  # every sequence at every step: the cost of one full step
    for name in args.runs:
        model = random_denoiser_of([*RUNS[name], *args.override], device, compiled, graph_rows)
        seq_len = model.config.max_position_embeddings
        schedule = parse_schedule(f"m:{args.steps}", args.steps, ["m"])
        rows[name] = {"parameters": sum(p.numel() for p in model.model.parameters()),
                      "cache": model.config.kv_cache_elements, "seq_len": seq_len, "ms_per_step": {}}
        for batch in args.batches:
            model.prepare_graphs(batch, seq_len)
            # the first batch, untimed: compilation
            walls = [timed({"m": model}, schedule, settings, batch, seq_len, rep)[0] for rep in range(args.reps + 1)]
            rows[name]["ms_per_step"][str(batch)] = 1e3 * statistics.median(walls[1:]) / args.steps
            print(f"{name:>8} B={batch:<4} {rows[name]['ms_per_step'][str(batch)]:8.2f} ms per step", flush=True)
        del model
        atomic_write_json(out, {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                "compiled": compiled, "steps": args.steps, "reps": args.reps, "runs": rows})


# --------------------------------------------------------------------------------------------- report

def read_run(data: Path, key: str) -> dict:
    """One run's facts from its collected log and config."""
    from omegaconf import OmegaConf

    from mdlm_sched.artifacts import TrainingLog
    from mdlm_sched.models.denoiser import DenoiserConfig

    log = TrainingLog.read(data / f"{key}_log.jsonl")
    m = OmegaConf.to_container(OmegaConf.load(data / f"{key}_config.yaml"))["model"]
    shape = DenoiserConfig(attention=m["attention"], hidden_size=m["hidden_size"],
                           num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
                           kv_lora_rank=m["kv_lora_rank"], qk_rope_head_dim=m["qk_rope_head_dim"])
    rates = [r["tokens_per_s"] for r in log.train][2:]  # the first intervals hold compilation and warm-up
    return {"key": key, "model": m, "parameters": log.starts[0]["parameters"],
            "cache": shape.kv_cache_elements, "steps": log.train[-1]["step"] if log.train else 0,
            "tokens": log.train[-1]["tokens_seen"] if log.train else 0,
            "tokens_per_s": statistics.median(rates) if rates else None, "val": log.val}


def final(run: dict, source: str) -> dict:
    """The last validation record of a source."""
    return run["val"][source][-1]


def report(args: argparse.Namespace) -> None:
    import math

    import numpy as np

    from analysis.plots import plt, save
    from mdlm_sched.stats import paired_mean_difference

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launches = json.loads((data / "runs.json").read_text()) if (data / "runs.json").is_file() else {}
    timing = json.loads((data / "speed.json").read_text()) if (data / "speed.json").is_file() else None
    speed_batches = sorted({b for r in timing["runs"].values() for b in r["ms_per_step"]}, key=int) if timing else []
    found = {p.name.removesuffix("_log.jsonl"): read_run(data, p.name.removesuffix("_log.jsonl"))
             for p in sorted(data.glob("*_log.jsonl"))}
    runs = {k: r for k, r in found.items() if r["val"]}  # a run that failed before validating has nothing to show
    keys = sorted(runs)
    for key in sorted(set(found) - set(runs)):
        print(f"{key}: no validation record (the run failed before its first validation; see {key}.console.log)")
    # The headline source (OWT in the mixture) first, then the others, as the runs validated them.
    sources = list(dict.fromkeys(s for r in runs.values() for s in r["val"]))
    head_src = sources[0]

    def budget(key: str) -> int:
        return int(key.rsplit("-", 1)[1])

    def reference(key: str) -> str | None:
        """The DiT (multi-head attention) run of the same depth and budget, if one was made."""
        depth = runs[key]["model"]["num_hidden_layers"]
        refs = [k for k in keys if k != key and runs[k]["model"]["attention"] == "mha" and budget(k) == budget(key)
                and runs[k]["model"]["num_hidden_layers"] == depth]
        return refs[0] if refs else None

    def paired(record: dict, other: str) -> tuple[float, float, float]:
        """Mean per-block loss difference (record - other's last validation) with its paired 95% CI."""
        return paired_mean_difference([np.array(record["block_losses"])],
                                      [np.array(final(runs[other], head_src)["block_losses"])])

    rows, summary = [], {}
    for key in sorted(keys, key=lambda k: (runs[k]["model"]["num_hidden_layers"], budget(k), k)):
        r = runs[key]
        owt = final(r, head_src)
        cells = [f"{final(r, s)['ppl']:.2f}" if s in r["val"] else "" for s in sources]
        ci = owt.get("ppl_ci", [math.nan, math.nan])
        delta = ""
        ref = reference(key)
        entry = {"bound": owt["ppl"], "bound_ci": ci, "blocks": owt["blocks"], "cache": r["cache"],
                 "parameters": r["parameters"], "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"],
                 "other_sources": {s: final(r, s)["ppl"] for s in sources[1:] if s in r["val"]}}
        if ref is not None:
            d, lo, hi = paired(owt, ref)
            delta = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            entry.update(vs=ref, delta_nats=d, delta_ci=[lo, hi])
        vs_base = []
        for name in args.baseline:  # each baseline's run of this budget: one column (and summary entry) each
            base = f"{name}-{budget(key)}"
            vs_base.append("")
            if base in runs and base != key:
                d, lo, hi = paired(owt, base)
                vs_base[-1] = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                entry.setdefault("vs_baselines", {})[base] = {"delta_nats": d, "delta_ci": [lo, hi]}
        # The bound at the run's middle validation: the second budget (part-way down the same cosine, not a run of
        # that many steps; the table's column says so).
        curve = r["val"][head_src]
        middle = curve[(len(curve) - 1) // 2] if len(curve) > 1 else None
        if middle is not None:
            entry["middle"] = {"step": middle["step"], "bound": middle["ppl"], "bound_ci": middle.get("ppl_ci")}
        shape_speed = timing["runs"].get(key.rsplit("-", 1)[0], {}).get("ms_per_step", {}) if timing else {}
        if shape_speed:
            entry["ms_per_step"] = shape_speed
        summary[key] = entry
        shared = [k for k in launches.get(key, {}).get("launches", [{}])[-1].get("with", []) if k != key]
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else ""
        mid = (f"{middle['ppl']:.2f} [{middle['ppl_ci'][0]:.2f}, {middle['ppl_ci'][1]:.2f}] @ {middle['step']}"
               if middle is not None and middle.get("ppl_ci") else "")
        cols = [key, r["model"]["num_hidden_layers"], describe(r["model"]), r["steps"], f"{r['tokens'] / 1e6:.1f}M",
                f"{r['parameters'] / 1e6:.1f}M", r["cache"], f"{owt['ppl']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]", mid,
                *cells[1:], delta, *vs_base, rate, len(shared) + 1,
                *(f"{shape_speed[b]:.2f}" if b in shape_speed else "" for b in speed_batches)]
        rows.append("| " + " | ".join(str(c) for c in cols) + " |")
    names = ["run", "blocks", "attention and block", "steps", "tokens", "parameters", "cache / token / layer",
             f"{head_src} bound [95% CI]", f"{head_src} bound at the middle validation (same run) @ step",
             *sources[1:], f"{head_src} loss vs DiT, nats [paired 95% CI]",
             *(f"{head_src} loss vs {b}, nats [paired 95% CI]" for b in args.baseline), "tokens/s",
             "runs sharing the GPU", *(f"sampling ms / step, B = {b}" for b in speed_batches)]
    head = "| " + " | ".join(names) + " |\n|" + " --- |" * len(names)
    note = (f"\nSampling ms / step: {timing['device']}, {'compiled + CUDA graphs' if timing['compiled'] else 'eager'}, "
            f"every sequence at every step, random weights, median of {timing['reps']} batches of {timing['steps']} "
            f"steps (`speed.json`).\n" if timing else "")
    (out / "table.md").write_text(head + "\n" + "\n".join(rows) + "\n" + note)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    shapes = sorted({(r["model"]["num_hidden_layers"], r["model"]["hidden_size"]) for r in runs.values()}, reverse=True)
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (depth, width) in zip(axes[0], shapes):
        for key in keys:
            r = runs[key]
            if (r["model"]["num_hidden_layers"], r["model"]["hidden_size"]) != (depth, width):
                continue
            curve = r["val"][head_src]
            tokens = [v["step"] * r["tokens"] / max(1, r["steps"]) / 1e6 for v in curve]
            style = "--" if r["model"]["attention"] == "mha" else "-"
            ax.plot(tokens, [v["ppl"] for v in curve], style, marker="o", ms=3, label=key)
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(f"{head_src} validation perplexity bound")
        ax.set_title(f"{depth} x {width}: MLA (solid) and MDLM's DiT (dashed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "validation_curves")
    cache_figure(runs, summary, head_src, out)
    print((out / "table.md").read_text())


def cache_figure(runs: dict, summary: dict, source: str, out: Path) -> None:
    """bound_vs_cache.png/pdf: each run's final bound (95% CI over validation blocks) against its cache per token
    and layer, one panel per depth and budget; multi-head attention's K/V (MHA, GQA, MQA) and MLA's latent apart,
    the middle validation hollow."""
    from analysis.plots import plt, save

    panels = sorted({(r["model"]["num_hidden_layers"], r["steps"]) for r in runs.values()}, reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (depth, steps) in zip(axes[0], panels):
        for family, marker, colour in (("mha", "s", "#c0392b"), ("mla", "o", "#1b4f72")):
            keys = sorted((k for k, r in runs.items() if (r["model"]["num_hidden_layers"], r["steps"]) == (depth, steps)
                           and r["model"]["attention"] == family), key=lambda k: summary[k]["cache"])
            if not keys:
                continue
            x = [summary[k]["cache"] for k in keys]
            y = [summary[k]["bound"] for k in keys]
            err = [[v - summary[k]["bound_ci"][0] for k, v in zip(keys, y)],
                   [summary[k]["bound_ci"][1] - v for k, v in zip(keys, y)]]
            label = "K/V heads (MHA, GQA, MQA)" if family == "mha" else "MLA latent + rotary key"
            ax.errorbar(x, y, yerr=err, fmt=marker, color=colour, capsize=3, ms=5, label=f"{label}, step {steps}")
            mids = [(summary[k]["cache"], summary[k]["middle"]["bound"]) for k in keys if "middle" in summary[k]]
            if mids:
                ax.plot(*zip(*mids), marker, color=colour, markerfacecolor="white", ls="",
                        label=f"{label}, step {summary[keys[0]]['middle']['step']}")
            for k, xv, yv in zip(keys, x, y):
                ax.annotate(k.rsplit("-", 1)[0], (xv, yv), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache elements per token and layer (log scale)")
        ax.set_ylabel(f"{source} validation perplexity bound (log scale)")
        ax.set_title(f"{depth} blocks, {steps} steps (95% CI over validation blocks)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "bound_vs_cache")


def compare(args: argparse.Namespace) -> None:
    """Print the paired loss difference (a - b, nats, 95% CI over validation blocks) of two runs, from any data
    folders, at every validation step both made, for every source both validated."""
    import numpy as np

    from mdlm_sched.stats import paired_mean_difference

    for p in (args.a, args.b):
        if not Path(f"{p}_log.jsonl").is_file() or not Path(f"{p}_config.yaml").is_file():
            refuse(f"compare: no run at {p} (give DIR/KEY with DIR/KEY_log.jsonl and DIR/KEY_config.yaml, as "
                   "--collect writes them)")
    a, b = (read_run(Path(p).parent, Path(p).name) for p in (args.a, args.b))
    # source -> step -> that step's last validation record, for each run
    by_step = [{s: {v["step"]: v for v in r["val"][s]} for s in r["val"]} for r in (a, b)]
    sources = [s for s in by_step[0] if s in by_step[1]]
    if not sources:
        refuse(f"compare: {args.a} and {args.b} share no validation source")
    print(f"{Path(args.a).name} - {Path(args.b).name}, nats [paired 95% CI]\n\n| step | " + " | ".join(sources)
          + " |\n|" + " --- |" * (len(sources) + 1))
    for step in sorted(by_step[0][sources[0]].keys() & by_step[1][sources[0]].keys()):
        cells = []
        for source in sources:
            x, y = (runs[source].get(step) for runs in by_step)
            if x is None or y is None:
                cells.append("")
                continue
            d, lo, hi = paired_mean_difference([np.array(x["block_losses"])], [np.array(y["block_losses"])])
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"| {step} | " + " | ".join(cells) + " |")


def describe(m: dict) -> str:
    """A short description of a model section: attention shape and block kind."""
    block = "gated" if m["ada_ln"] or m["time_conditioning"] else "plain"
    if m["attention"] == "mha":
        kv = m["num_key_value_heads"] or m["num_attention_heads"]
        return f"MHA {m['num_attention_heads']}x{m['hidden_size'] // m['num_attention_heads']} (kv {kv}), {block}"
    extras = [x for x, on in (("no kv_norm", not m["kv_norm"]), ("head bias", m["head_bias"]),
                              ("zero head", m.get("zero_head", False))) if on]
    return (f"MLA {m['num_attention_heads']} heads, latent {m['kv_lora_rank']}, qk {m['qk_nope_head_dim']}+"
            f"{m['qk_rope_head_dim']}, v {m['v_head_dim']}, {block}" + "".join(f", {x}" for x in extras))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train the named runs (on the GPU), several at once")
    p.add_argument("--data-root", required=True, help="a folder with the files of ../shared/data")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="NAME:STEPS, launched in this order")
    p.add_argument("--parallel", type=int, default=0,
                   help="at most this many runs at once (the next starts as one ends); default: all at once")
    p.add_argument("--collect", help="copy each finished run's log and config here")
    p.add_argument("--override", nargs="*", default=[], help="train words applied after each run's own")
    p.set_defaults(fn=run)
    p = sub.add_parser("report", help="table.md, summary.json and the validation-curve figure")
    p.add_argument("data", help="the folder --collect filled")
    p.add_argument("--out", required=True)
    p.add_argument("--baseline", nargs="*", default=[], help="run names (e.g. gated12 v96): add each run's paired "
                   "difference to each of them at the same budget, one column each")
    p.set_defaults(fn=report)
    p = sub.add_parser("speed", help="ms per denoising step of each run's shape at each batch size (on the GPU)")
    p.add_argument("--runs", nargs="+", required=True, help="run names (NAME, no budget: the shape is the same)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--steps", type=int, default=16, help="denoising steps per timed batch")
    p.add_argument("--reps", type=int, default=3, help="timed batches (the median is reported)")
    p.add_argument("--eager", action="store_true", help="neither torch.compile nor CUDA graphs")
    p.add_argument("--override", nargs="*", default=[], help="config words applied after each run's model words")
    p.add_argument("--out", required=True, help="the JSON file (speed.json in the data folder is what report reads)")
    p.set_defaults(fn=speed)
    p = sub.add_parser("compare", help="the paired difference of two runs (from any data folders) along training")
    p.add_argument("a", help="DIR/KEY: the run whose files are DIR/KEY_log.jsonl and DIR/KEY_config.yaml")
    p.add_argument("b", help="DIR/KEY of the run it is compared with")
    p.set_defaults(fn=compare)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
