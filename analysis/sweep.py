"""Sweeps: schedules x step counts x seeds, each point sampled, counted, timed and judged.

`run_sweep` plans every point first (a bad schedule fails before any work), then runs the points
not yet in `results.jsonl`, appending one line per finished point (FLOPs in both conventions,
calls per model, cache share, wall-clock, gen PPL with its protocol, entropy, per-sample values).
Killing the process loses only the point in progress; running the same command again skips the
finished points. A point that fails is logged to `failures.jsonl` and the others go on; the next
run retries it. The real-text reference rows (one per validation source) are lines of their own, computed once.

A point is identified by its canonical segments (so "sandwich" and "L125,H750,L125" are one
point), T, seed and sample count. `sweep.json` holds the settings every point shares (models,
judge, sampler, batch size); a rerun with different ones is refused rather than mixed in.

Under torchrun (`torchrun --nproc_per_node=N mdlm-sched sweep ...`) every rank loads the models and
the judge and takes part in every point: the sampler batches of a point (each drawn from its own
(seed, batch index) generator) and its judge batches are dealt out to the ranks and gathered back
in order, so a results line is the one a single process writes, apart from the wall-clock and the
provenance (which records world_size). Rank 0 alone writes files. A point that fails on any rank
fails on all of them (distributed.DistContext.gather_all), so the ranks stay in step.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from analysis.results import append_jsonl, read_jsonl
from mdlm_sched.checkpoint import atomic_file, atomic_write_text
from mdlm_sched.config import SweepConfig, SweepGroup, validate_sweep
from mdlm_sched.data import load_sources
from mdlm_sched.distributed import ONE_PROCESS, DistContext, distributed
from mdlm_sched.errors import ConfigError
from mdlm_sched.generate import ModelSet, cache_summary, flops_summary, load_models, run_schedule, warm_up
from mdlm_sched.metrics import Judge, entropy_summary, judge_tokens, load_judge, score_token_ids
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import autocast_dtype, configure_backends
from mdlm_sched.sampler import SamplerSettings, check_settings
from mdlm_sched.schedule import ModelSchedule, coarse_segment_specs

log = logging.getLogger(__name__)

RESULTS, FAILURES, SETTINGS = "results.jsonl", "failures.jsonl", "sweep.json"
# Settings every point of one results file must share (points may be added freely).
SHARED_FIELDS = ("models", "judge", "judge_context", "batch_size", "top_p", "cache", "noise_removal", "t_min",
                 "seq_len", "reference")


@dataclass
class Point:
    """One sampling run of a sweep."""

    label: str  # as the config wrote it (or the L/H pattern of an exhaustive-search schedule)
    schedule: ModelSchedule
    seed: int
    num_samples: int
    groups: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def key(self) -> str:
        return f"{self.schedule.segments_str()}|T{self.steps}|seed{self.seed}|n{self.num_samples}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.label}-T{self.steps}-s{self.seed}-n{self.num_samples}")


def plan(cfg: SweepConfig, model_set: ModelSet) -> list[Point]:
    """Every point of the sweep, in config order, each once (a point named by two groups lists both)."""
    points: dict[str, Point] = {}
    for group_name, group in cfg.groups.items():
        labelled = [(spec, spec) for spec in group.schedules]
        labelled += [(f"{p}@{f:g}", f"{p}@{f:g}") for p in group.placements for f in group.fractions]
        for steps in group.steps or cfg.steps:
            specs = labelled + (coarse_segment_specs(group.segments, steps) if group.segments else [])
            for label, spec in specs:
                schedule = model_set.schedule(spec, steps, cfg.t_min)
                for seed in group.seeds if group.seeds is not None else cfg.seeds:
                    point = Point(label, schedule, seed, group.num_samples or cfg.num_samples)
                    point = points.setdefault(point.key, point)
                    if group_name not in point.groups:
                        point.groups.append(group_name)
    return list(points.values())


def _shared_settings(cfg: SweepConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {name: resolved[name] for name in SHARED_FIELDS}


def _check_settings_file(out: Path, cfg: SweepConfig) -> None:
    """Write sweep.json, or refuse a results folder made with other shared settings."""
    path = out / SETTINGS
    shared = _shared_settings(cfg)
    if path.is_file():
        saved = json.loads(path.read_text())["shared"]
        for name in SHARED_FIELDS:
            if saved.get(name) != shared[name]:
                raise ConfigError(f"{out} holds a sweep with another {name} ({saved.get(name)!r}, now "
                                  f"{shared[name]!r}); use the same settings or a new out_dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"shared": shared, "config": OmegaConf.to_container(
        OmegaConf.structured(cfg))}, indent=1) + "\n")


def _sampler_settings(cfg: SweepConfig, seq_len: int) -> SamplerSettings:
    return SamplerSettings(batch_size=cfg.batch_size, seq_len=seq_len, top_p=cfg.top_p, cache=cfg.cache,
                           noise_removal=cfg.noise_removal, t_min=cfg.t_min)


def _quality(rows: list[list[int]], judge_ids: list[list[int]], judge: Judge, cfg: SweepConfig,
             progress: bool, ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any], dict[str, list]]:
    """Gen PPL of samples [N][L] (judge_ids: re-tokenized for the judge), entropy, and per-sample values."""
    gen = score_token_ids(judge_ids, judge, cfg.judge_batch_size, progress=progress, ctx=ctx)
    entropy, per_entropy = entropy_summary(rows)
    per_sample = {"nll": gen.nll.tolist(), "tokens_scored": gen.tokens.tolist(), "entropy": per_entropy}
    return gen.summary(judge.name, first_eos=True), entropy, per_sample


def _write_samples(path: Path, rows: list[list[int]], tokenizer: Any, per_sample: dict[str, list]) -> None:
    with atomic_file(path) as fh:
        for i, ids in enumerate(rows):
            fh.write(json.dumps({"index": i, "text": tokenizer.decode(ids), "token_ids": ids,
                                 **{k: v[i] for k, v in per_sample.items()}}) + "\n")


def run_point(point: Point, model_set: ModelSet, judge: Judge, cfg: SweepConfig, out: Path,
              progress: bool, ctx: DistContext = ONE_PROCESS) -> dict[str, Any]:
    """Sample, count, judge one point; return its results line (samples written first when kept).

    Under torchrun every rank calls this and gets the line; rank 0 alone writes the samples.
    """
    output = run_schedule(model_set, point.schedule, _sampler_settings(cfg, model_set.seq_len), point.num_samples,
                          point.seed, progress=progress, ctx=ctx)
    rows = output.tokens.tolist()
    start = time.perf_counter()
    judge_ids = judge_tokens(rows, model_set.tokenizer, judge, ctx)
    gen, entropy, per_sample = _quality(rows, judge_ids, judge, cfg, progress, ctx)
    judge_s = time.perf_counter() - start
    if cfg.save_samples and ctx.is_main:
        _write_samples(out / "samples" / f"{point.slug}.jsonl", rows, model_set.tokenizer, per_sample)
    counts = point.schedule.counts()
    light = model_set.light_to_heavy[0]
    return {
        "kind": "point", "key": point.key, "label": point.label, "groups": point.groups,
        "segments": point.schedule.segments_str(), "steps": point.steps, "seed": point.seed,
        "num_samples": point.num_samples, "steps_per_model": counts,
        "light_fraction": counts.get(light, 0) / point.steps,
        "flops": flops_summary(model_set, output), "cache": cache_summary(output, point.steps),
        "wall_s": output.wall_s, "judge_s": judge_s, "gen_ppl": gen, "entropy": entropy,
        "per_sample": per_sample, "provenance": provenance(model_set.device, ctx.world_size),
    }


def run_reference(name: str, source: str, model_set: ModelSet, judge: Judge, cfg: SweepConfig, progress: bool,
                  ctx: DistContext = ONE_PROCESS) -> dict[str, Any]:
    """A reference row: real validation blocks (same length and wrapping as samples), judged the same way."""
    with ctx.main_first():  # rank 0 tokenises and caches; the other ranks then read its cache
        blocks = load_sources([source], model_set.tokenizer, model_set.seq_len, cfg.cache_dir)
    rows = np.asarray(blocks[: cfg.reference.num_samples], dtype=np.int64).tolist()
    judge_ids = judge_tokens(rows, model_set.tokenizer, judge, ctx)  # once for both ways of counting
    gen, entropy, per_sample = _quality(rows, judge_ids, judge, cfg, progress, ctx)
    every_token = score_token_ids(judge_ids, judge, cfg.judge_batch_size, first_eos=False, ctx=ctx)
    return {"kind": "reference", "key": reference_key(name, source, cfg.reference.num_samples), "name": name,
            "source": source, "num_samples": len(rows), "gen_ppl": gen, "entropy": entropy,
            "judge_ppl_every_token": every_token.summary(judge.name, first_eos=False),
            "per_sample": per_sample, "provenance": provenance(model_set.device, ctx.world_size)}


def reference_key(name: str, source: str, num_samples: int) -> str:
    return f"reference|{name}|{source}|n{num_samples}"


@dataclass
class SweepOutcome:
    out_dir: Path
    done: int = 0  # points run now
    skipped: int = 0  # points finished by an earlier run
    failed: list[str] = field(default_factory=list)  # keys of points that failed now


FollowUp = Callable[[list[dict[str, Any]]], Mapping[str, SweepGroup]]


def run_sweep(cfg: SweepConfig, progress: bool = True, echo: Callable[[str], None] = print,
              follow_up: FollowUp | None = None) -> SweepOutcome:
    """Run every point of the sweep not yet in results.jsonl (see the module docstring); every rank returns.

    follow_up, if given, is called with the results records once the configured points are done; the
    groups it returns are planned and run too, with the same models and judge (e.g. the fraction curve
    of whichever placement measured best). Under torchrun it runs on rank 0 and its groups are shared.
    """
    validate_sweep(cfg)
    check_settings(_sampler_settings(cfg, cfg.seq_len or 1))  # before loading models: bad settings fail fast
    with distributed(cfg.runtime) as (ctx, device):
        return _run_sweep(cfg, ctx, device, progress and ctx.is_main, echo if ctx.is_main else lambda _: None,
                          follow_up)


def _run_sweep(cfg: SweepConfig, ctx: DistContext, device: torch.device, progress: bool,
               echo: Callable[[str], None], follow_up: FollowUp | None) -> SweepOutcome:
    configure_backends(device)
    model_set = load_models(cfg.models, device, autocast_dtype(cfg.runtime, device), cfg.runtime.compile,
                            cfg.seq_len)
    settings = _sampler_settings(cfg, model_set.seq_len)
    check_settings(settings, model_set.config)
    points = plan(cfg, model_set)
    judge = load_judge(cfg.judge, device, cfg.judge_context)
    out = Path(cfg.out_dir)
    # Rank 0 reads and writes the folder; the others get its answer, so that all ranks plan the same work.
    ctx.on_main(lambda: _check_settings_file(out, cfg))
    outcome = SweepOutcome(out)
    warmed = False

    def run_points(points: list[Point]) -> None:
        nonlocal warmed
        finished = ctx.on_main(lambda: {r["key"] for r in read_jsonl(out / RESULTS)})
        todo = [p for p in points if p.key not in finished]
        outcome.skipped += len(points) - len(todo)
        echo(f"sweep: {len(points)} points, {len(points) - len(todo)} already finished in {out / RESULTS}, "
             f"{len(todo)} to run")
        if todo and cfg.runtime.compile and not warmed:
            warm_up(model_set, settings)  # compilation stays out of wall_s
            warmed = True
        for n, point in enumerate(todo, 1):
            try:
                record = run_point(point, model_set, judge, cfg, out, progress, ctx)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory, a non-finite value: keep the others
                message = " ".join(str(exc).split())[:300]
                if ctx.is_main:
                    log.error("point %s failed: %s", point.key, message)
                    append_jsonl(out / FAILURES, {"key": point.key, "label": point.label, "error": message,
                                                  "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                outcome.failed.append(point.key)
                continue
            if ctx.is_main:
                append_jsonl(out / RESULTS, record)
            outcome.done += 1
            echo(f"  [{n}/{len(todo)}] {point.label} T={point.steps} seed={point.seed}: gen PPL "
                 f"{record['gen_ppl']['ppl']:.2f}, entropy {record['entropy']['mean']:.3f}, FLOPs saved "
                 f"{record['flops']['saving_blocks_only']:.1%} (blocks only) / "
                 f"{record['flops']['saving_full']:.1%} (full), {record['wall_s']:.1f} s")

    finished = ctx.on_main(lambda: {r["key"] for r in read_jsonl(out / RESULTS)})
    for name, source in cfg.reference.sources.items():
        if reference_key(name, source, cfg.reference.num_samples) not in finished:
            reference = run_reference(name, source, model_set, judge, cfg, progress, ctx)
            if ctx.is_main:
                append_jsonl(out / RESULTS, reference)
            echo(f"  reference {name} ({source}, {cfg.reference.num_samples} blocks) done")
    run_points(points)
    if follow_up is not None:
        groups = ctx.on_main(lambda: follow_up(read_jsonl(out / RESULTS)))
        if groups:
            run_points(plan(replace(cfg, groups=dict(groups)), model_set))
    return outcome
