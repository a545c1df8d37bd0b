"""Sampling runs: load named models, run the sampler batch by batch, count FLOPs, write the results.

A run of N samples is split into batches of `batch_size` (the last one may be smaller; no sample is
dropped). Batch k draws from its own generator, seeded from (seed, k), so a run is reproducible
from its seed and batch size, and batches can be spread over processes without changing a sample:
under torchrun, `run_schedule` deals the batches out to the ranks and gathers them back in order.
`mdlm-sched sample` writes each finished batch as it completes (BatchStore), so that a killed run
resumes from its finished batches with the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mdlm_sched.artifacts import SampleRun
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import atomic_file, atomic_write_json, atomic_write_text, read_json
from mdlm_sched.flops import forward_flops, trace_flops
from mdlm_sched.modelset import ModelSet, open_models
from mdlm_sched.provenance import provenance
from mdlm_sched.ranks import ONE_PROCESS, DistContext
from mdlm_sched.runtime import STREAM_SAMPLE, step_generator
from mdlm_sched.sampler import StepRecord, check_prompts, sample
from mdlm_sched.sampling_config import SampleConfig, SamplerSettings, validate_sample
from mdlm_sched.schedule import ModelSchedule


@dataclass
class SamplingOutput:
    """Tokens of every sample and the trace of every batch."""

    tokens: torch.Tensor  # [N, L] long, CPU
    trace: list[StepRecord]  # all batches, in order
    wall_s: float  # sampling only (models loaded and compiled before)
    batch_wall_s: list[float]  # each batch's own wall-clock, in batch order (timed where it ran)


Batch = tuple[torch.Tensor, list[StepRecord], float]  # tokens [b, L] on the CPU, its trace, its seconds


@dataclass(frozen=True)
class BatchStore:
    """The finished batches of an unfinished sampling run, one file each (SampleRun.batch), each with the settings
    that made it. Nothing is written before the first batch is done, so a run refused on the way leaves nothing."""

    run: SampleRun
    settings: dict[str, Any]  # what the samples depend on

    @property
    def folder(self) -> Path:
        return self.run.batch(0).parent

    def check(self) -> int:
        """How many batches an earlier run with the same settings finished (ConfigError if its settings differ)."""
        files = sorted(self.folder.glob("batch-*.json"))
        if files and read_json(files[0], "a batch of an unfinished sampling run")["settings"] != \
                json.loads(json.dumps(self.settings)):  # compared as they read back from the file
            raise ConfigError(f"{self.run.root} holds an unfinished sampling run with other settings; rerun it with "
                              f"the same settings to resume it, or give a new --out")
        return len(files)

    def load(self, k: int) -> Batch | None:
        """Batch k if it was finished earlier."""
        path = self.run.batch(k)
        if not path.is_file():
            return None
        saved = read_json(path, f"batch {k} of an unfinished sampling run (delete it to sample it again)")
        return torch.tensor(saved["tokens"]), [StepRecord(**r) for r in saved["trace"]], saved["seconds"]

    def save(self, k: int, batch: Batch) -> None:
        tokens, trace, seconds = batch
        atomic_write_json(self.run.batch(k), {"settings": self.settings, "tokens": tokens.tolist(),
                                              "trace": [asdict(r) for r in trace], "seconds": seconds})

    def close(self) -> None:
        """The run's files are written: its batches are no longer needed."""
        shutil.rmtree(self.folder)


def warm_up(model_set: ModelSet, settings: SamplerSettings, batch_size: int, steps: int = 8) -> None:
    """A few untimed steps of every model at this batch size, and the capture of its CUDA graphs, so that
    compilation and capture are in no timing; with the latent cache on, a few of its steps too."""
    # cache=False runs every sequence at every step: the compiled full forward sees the whole batch's shape.
    paths = [replace(settings, cache=False, latent_cache=False)]
    if settings.latent_cache:
        paths.append(settings)
    for name in model_set.light_to_heavy:
        for path in paths:
            sample(model_set.models, model_set.schedule(f"{name}:{steps}", steps), model_set.noise, path,
                   torch.Generator(device=model_set.device).manual_seed(0), batch_size, model_set.seq_len)
        model_set.models[name].prepare_graphs(batch_size, model_set.seq_len, settings.latent_cache)


def run_schedule(model_set: ModelSet, schedule: ModelSchedule, settings: SamplerSettings, num_samples: int,
                 batch_size: int, seed: int, prompts: Sequence[Sequence[int]] = (), progress: bool = True,
                 ctx: DistContext = ONE_PROCESS, store: BatchStore | None = None) -> SamplingOutput:
    """Sample num_samples sequences in batches of batch_size (the last may be smaller; prompts cycled over samples).

    A batch's samples depend only on (seed, batch index, batch size). Under torchrun, each rank runs its
    share of the batches and every rank gets the whole output, the same as one process's; wall_s then runs
    from a common start until the last rank's samples have been gathered. With a store, batches finished by an
    earlier run are read back instead of sampled, and each new one is written as soon as it is done.
    """
    if prompts:
        check_prompts(prompts, model_set.config, model_set.seq_len)
    device = model_set.device
    n_batches = -(-num_samples // batch_size)
    bar = tqdm(total=len(ctx.share(n_batches)) * len(schedule), desc=f"sampling {schedule.spec}", unit="step",
               disable=not progress, leave=False)

    def run_batch(k: int) -> Batch:
        if store is not None and (done := store.load(k)) is not None:
            return done
        first = k * batch_size
        size = min(batch_size, num_samples - first)
        batch_prompts = [prompts[(first + j) % len(prompts)] for j in range(size)] if prompts else None
        start = time.perf_counter()  # the device is idle here: the last batch ended with a copy to the host
        result = sample(model_set.models, schedule, model_set.noise, settings,
                        step_generator(seed, k, STREAM_SAMPLE, device), size, model_set.seq_len, batch_prompts,
                        on_step=lambda record: bar.update(1) if record.step < len(schedule) else None)
        batch = result.tokens.cpu(), result.trace, time.perf_counter() - start  # .cpu() waits for the device
        if store is not None:
            store.save(k, batch)
        return batch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    ctx.barrier()
    start = time.perf_counter()
    batches = ctx.map_sharded(n_batches, run_batch)  # [(tokens [b, L], trace, seconds)] in batch order
    sync()
    wall = time.perf_counter() - start
    bar.close()
    return SamplingOutput(tokens=torch.cat([tokens for tokens, _, _ in batches]),
                          trace=[record for _, trace, _ in batches for record in trace], wall_s=wall,
                          batch_wall_s=[seconds for _, _, seconds in batches])


def flops_summary(model_set: ModelSet, output: SamplingOutput) -> dict[str, Any]:
    """FLOPs of the run in each convention (flops.py), per model, and against the same calls made by the heaviest
    model."""
    configs = model_set.configs
    used = trace_flops(output.trace, configs, model_set.seq_len)
    heavy = model_set.light_to_heavy[-1]
    baseline = trace_flops(output.trace, configs, model_set.seq_len, as_model=heavy)

    def saving(a: int, b: int) -> float:
        return 1.0 - a / b if b else 0.0

    per_forward = {}
    for name, config in configs.items():
        one = forward_flops(config, model_set.seq_len)
        per_forward[name] = {"blocks_only": one.blocks_only, "full": one.full}
    return {
        "blocks_only": used.blocks_only,
        "full": used.full,
        "head_everywhere": used.head_everywhere,
        "baseline_model": heavy,
        "baseline_blocks_only": baseline.blocks_only,
        "baseline_full": baseline.full,
        "baseline_head_everywhere": baseline.head_everywhere,
        "saving_blocks_only": saving(used.blocks_only, baseline.blocks_only),
        "saving_full": saving(used.full, baseline.full),
        "saving_head_everywhere": saving(used.head_everywhere, baseline.head_everywhere),
        "calls": used.calls,
        "sequences_run": used.sequences,
        "per_forward_one_sequence": per_forward,
        "convention": "matmul FLOPs of the calls made (2 per multiply-add); blocks_only = transformer blocks "
                      "incl. attention scores; full = + output head at the positions decoded + time embedding; "
                      "head_everywhere = full with the head at every position of every sequence run (MDLM's "
                      "sampler)",
    }


def cache_summary(output: SamplingOutput, steps: int) -> dict[str, Any]:
    """How many sequence-steps ran the network and how many were served without it."""
    denoising = [r for r in output.trace if r.step < steps]
    run = sum(r.run for r in denoising)
    skipped = sum(r.skipped for r in denoising)
    return {"sequence_steps": run + skipped, "run": run, "skipped": skipped,
            "skipped_share": skipped / (run + skipped) if run + skipped else 0.0,
            "noise_removal_sequences": sum(r.run for r in output.trace if r.step == steps)}


def trace_table(trace: Sequence[StepRecord]) -> list[dict[str, Any]]:
    """Per-step totals over batches: step, t, s, model, run, skipped, unmasked."""
    rows: dict[int, dict[str, Any]] = {}
    for r in trace:
        row = rows.setdefault(r.step, {"step": r.step, "t": r.t, "s": r.s, "model": r.model,
                                       "run": 0, "skipped": 0, "unmasked": 0})
        row["run"] += r.run
        row["skipped"] += r.skipped
        row["unmasked"] += r.unmasked
    return [rows[k] for k in sorted(rows)]


def text_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of text prompts, each with [BOS] first (training blocks start with it)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # verbose=False: a prompt longer than the model is refused by check_prompts with its own one-line message,
    # without the tokenizer's warning about the length first.
    return [[bos, *tokenizer.encode(text, verbose=False)] for text in texts]


def write_samples(path: Path, tokens: torch.Tensor, tokenizer: Any, seed: int, batch_size: int) -> None:
    """samples.jsonl: one line per sample with its index, batch, text and token ids (atomic)."""
    with atomic_file(path) as f:
        for i, ids in enumerate(tokens.tolist()):
            f.write(json.dumps({"index": i, "seed": seed, "batch": i // batch_size,
                                "text": tokenizer.decode(ids), "token_ids": ids}) + "\n")


def sample_command(cfg: SampleConfig, progress: bool = True,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`mdlm-sched sample`: load, sample, write samples.jsonl, trace.csv and record.json; return the record."""
    from omegaconf import OmegaConf

    settings = validate_sample(cfg)  # before loading models: bad settings fail fast
    out = SampleRun(Path(cfg.out_dir))
    # Samples depend on every setting but the folder (the runtime too: device generators and precision).
    store = BatchStore(out, {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg)).items()
                             if k != "out_dir"})
    resumed = store.check()
    model_set = open_models(cfg.models, cfg.runtime, cfg.seq_len)
    schedule = model_set.schedule(cfg.schedule, cfg.steps, cfg.t_min)
    prompts = text_prompts(model_set.tokenizer, cfg.prompts) if cfg.prompts else cfg.prompt_token_ids
    if model_set.needs_warm_up:
        warm_up(model_set, settings, cfg.batch_size)
    output = run_schedule(model_set, schedule, settings, cfg.num_samples, cfg.batch_size, cfg.seed, prompts,
                          progress, store=store)

    flops = flops_summary(model_set, output)
    cache = cache_summary(output, cfg.steps)
    n_tokens = output.tokens.numel()
    record = {
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "schedule": {"spec": schedule.spec, "segments": schedule.segments_str(), "steps_per_model": schedule.counts()},
        "models": {name: {"path": cfg.models[name], "layers": m.config.num_hidden_layers,
                          "hidden_size": m.config.hidden_size, "parameters": m.parameters}
                   for name, m in model_set.models.items()},
        "light_to_heavy": model_set.light_to_heavy,
        "num_samples": cfg.num_samples,
        "seq_len": model_set.seq_len,
        "seed": cfg.seed,
        "flops": flops,
        "cache": cache,
        "wall_s": output.wall_s,  # of this invocation: batches resumed from an earlier one took no time here
        "resumed_batches": resumed,
        # a resumed run's wall-clock does not cover the batches it read back: no rate from it
        "tokens_per_s": n_tokens / output.wall_s if output.wall_s > 0 and not resumed else None,
        "provenance": provenance(model_set.device),
    }
    write_samples(out.samples, output.tokens, model_set.tokenizer, cfg.seed, cfg.batch_size)
    rows = trace_table(output.trace)
    atomic_write_text(out.trace, "step,t,s,model,run,skipped,unmasked\n" + "".join(
        f"{r['step']},{r['t']:.6f},{r['s']:.6f},{r['model']},{r['run']},{r['skipped']},{r['unmasked']}\n"
        for r in rows))
    atomic_write_json(out.record, record)
    store.close()

    heavy = flops["baseline_model"]
    echo(f"sampled {cfg.num_samples} x {model_set.seq_len} tokens, T={cfg.steps}, schedule {schedule.spec} "
         f"= {schedule.segments_str()}")
    for name in model_set.light_to_heavy:
        info = record["models"][name]
        echo(f"  {name:>8}: {info['layers']} x {info['hidden_size']}, {info['parameters'] / 1e6:.1f}M params, "
             f"{schedule.counts().get(name, 0)} steps, {flops['sequences_run'].get(name, 0)} sequences run in "
             f"{flops['calls'].get(name, 0)} calls")
    echo(f"  cache: {cache['skipped_share']:.1%} of {cache['sequence_steps']} sequence-steps needed no network call")
    echo(f"  FLOPs: blocks-only {flops['blocks_only']:.3e} ({flops['saving_blocks_only']:.1%} saved vs all-{heavy}), "
         f"full {flops['full']:.3e} ({flops['saving_full']:.1%} saved)")
    rate = f"{record['tokens_per_s']:.0f} tokens/s" if record["tokens_per_s"] else \
        f"{resumed} batches resumed from an earlier run"
    echo(f"  wall-clock {output.wall_s:.2f} s, {rate} on {model_set.device}")
    first_text = model_set.tokenizer.decode(output.tokens[0].tolist()).replace("\n", " ")
    echo(f"  sample 0: {first_text[:160]!r}")
    echo(f"  wrote {out.samples}, {out.trace}, {out.record}")
    return record
