"""Sweeps: schedules x step counts x seeds, each point sampled, counted, timed and judged.

`run_sweep` plans every point first (a bad schedule fails before any work), then runs the points
not yet in `results.jsonl`, appending one line per finished point (FLOPs in both conventions,
calls per model, cache share, wall-clock, gen PPL with its protocol, entropy, per-sample values).
Killing the process loses only the point in progress; running the same command again skips the
finished points. A point that fails for want of memory or on bad input is logged to `failures.jsonl`
and the others go on; the next run retries it (any other exception is a bug and stops the sweep).
The real-text reference rows (one per validation source) are lines of their own, computed once.

A point is identified by its canonical segments (so "sandwich" and "L125,H750,L125" are one
point), T, seed and sample count. `sweep.json` holds the settings every point shares (models,
judge, sampler, batch size); a rerun with different ones is refused rather than mixed in.

Under torchrun (`torchrun --nproc_per_node=N mdlm-sched sweep ...`) every rank loads the models and
the judge and takes part in every point: the sampler batches of a point (each drawn from its own
(seed, batch index) generator) and its judge batches are dealt out to the ranks and gathered back
in order, so a results line is the one a single process writes, apart from the wall-clock and the
provenance (which records world_size). Rank 0 alone writes files. A point that fails on any rank
fails on all of them (ranks.DistContext.gather_all), so the ranks stay in step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from mdlm_sched.artifacts import SweepDir, SweepResults
from mdlm_sched.data import load_sources
from mdlm_sched.distributed import distributed
from mdlm_sched.errors import ConfigError, ScheduleError
from mdlm_sched.fileio import atomic_file, atomic_write_json, read_json
from mdlm_sched.generate import cache_summary, flops_summary, run_schedule, warm_up
from mdlm_sched.metrics import (Judge, entropy_summary, judge_features, judge_tokens, load_judge, mauve_scores,
                                score_token_ids)
from mdlm_sched.modelset import ModelSet, open_models
from mdlm_sched.provenance import provenance
from mdlm_sched.ranks import ONE_PROCESS, DistContext
from mdlm_sched.runtime import RECORDED_FAILURES
from mdlm_sched.sampler import RANDOMNESS_LAYOUT
from mdlm_sched.sampling_config import SamplerSettings, SweepConfig, SweepGroup, shared_settings, validate_sweep
from mdlm_sched.schedule import ModelSchedule, coarse_segment_specs, is_single_segment, parse_schedule
from mdlm_sched.sweep_records import (UTC_FORMAT, CacheUse, EntropySummary, Failure, MauveSummary, PerSample,
                                      PPLSummary, ReferenceRow, SamplingFlops, SweepPoint, Timing, point_slug)

log = logging.getLogger(__name__)


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
        """T, the denoising steps."""
        return len(self.schedule)

    @property
    def key(self) -> str:
        return f"{self.schedule.segments_str()}|T{self.steps}|seed{self.seed}|n{self.num_samples}"

    @property
    def slug(self) -> str:
        return point_slug(self.label, self.steps, self.seed, self.num_samples)


def plan(cfg: SweepConfig, light_to_heavy: Sequence[str]) -> list[Point]:
    """Every point of the sweep, in config order, each once (a point named by two groups lists both).

    light_to_heavy: the model names, lightest first; every schedule is parsed here, so a bad one fails
    before any work.
    """
    points: dict[str, Point] = {}
    for group_name, group in cfg.groups.items():
        labelled = [(spec, spec) for spec in group.schedules] + list(group.named.items())
        labelled += [(f"{p}@{f:g}", f"{p}@{f:g}") for p in group.placements for f in group.fractions]
        for steps in group.step_counts or cfg.step_counts:
            specs = labelled + (coarse_segment_specs(group.segments, steps) if group.segments else [])
            for label, spec in specs:
                try:
                    schedule = parse_schedule(spec, steps, light_to_heavy, cfg.t_min)
                except ScheduleError as exc:
                    split = sum(is_single_segment(s) for s in group.schedules) > 1 and is_single_segment(spec)
                    if split:  # YAML reads [L2,H6] as the two schedules "L2" and "H6"
                        raise ScheduleError(f"{exc}; groups.{group_name}.schedules holds several one-segment "
                                            f"schedules: if they were one segment string, quote it in the YAML, "
                                            f"e.g. schedules: ['L2,H6']") from None
                    raise
                for seed in group.seeds if group.seeds is not None else cfg.seeds:
                    point = Point(label, schedule, seed, group.num_samples or cfg.num_samples)
                    point = points.setdefault(point.key, point)
                    if group_name not in point.groups:
                        point.groups.append(group_name)
    return list(points.values())


def _check_settings_file(out: SweepDir, cfg: SweepConfig) -> None:
    """Write sweep.json, or refuse a results folder whose finished lines were made with other shared settings.

    Settings of a sweep that finished nothing (one that failed while setting up) are simply replaced.
    """
    shared = {**shared_settings(cfg), "sampler_randomness": RANDOMNESS_LAYOUT}
    if out.settings.is_file() and out.finished_keys():
        saved = read_json(out.settings, "the sweep.json of a sweep")["shared"]
        # A setting that sweep.json lacks did not exist when it was written: the sweep ran with its default.
        defaults = {f.name: f.default for f in fields(SweepConfig) if f.default is not MISSING}
        for name, value in shared.items():
            if saved.get(name, defaults.get(name)) != value:
                raise ConfigError(f"{out.root} holds a sweep with another {name} ({saved.get(name)!r}, now "
                                  f"{value!r}); use the same settings or a new out_dir")
        return
    atomic_write_json(out.settings, {"shared": shared, "config": OmegaConf.to_container(OmegaConf.structured(cfg))})


def _quality(rows: list[list[int]], judge_ids: list[list[int]], judge: Judge, cfg: SweepConfig, seq_len: int,
             progress: bool, ctx: DistContext) -> dict[str, Any]:
    """The sweep_records.Judged fields the judge measures: gen PPL under every token rule (the headline:
    cfg.token_rule), entropy, and the per-sample values of both, for samples [N][L] (judge_ids: the same samples
    re-tokenized for the judge)."""
    by_rule = score_token_ids(judge_ids, judge, cfg.judge_batch_size, seq_len, progress=progress, ctx=ctx)
    entropy, per_entropy = entropy_summary(rows)
    return {
        "gen_ppl": PPLSummary(**by_rule[cfg.token_rule].summary(judge.name)),
        "gen_ppl_rules": {rule: PPLSummary(**gen.summary(judge.name)) for rule, gen in by_rule.items()},
        "entropy": EntropySummary(**entropy),
        "per_sample": PerSample(nll={rule: gen.nll.tolist() for rule, gen in by_rule.items()},
                                tokens={rule: gen.tokens.tolist() for rule, gen in by_rule.items()},
                                entropy=per_entropy),
    }


def _write_samples(path: Path, rows: list[list[int]], tokenizer: Any, values: PerSample, rule: str) -> None:
    with atomic_file(path) as fh:
        for i, ids in enumerate(rows):
            fh.write(json.dumps({"index": i, "text": tokenizer.decode(ids), "token_ids": ids,
                                 "nll": values.nll[rule][i], "tokens_scored": values.tokens[rule][i],
                                 "entropy": values.entropy[i]}) + "\n")


def _save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as fh:
        np.save(fh, array)


def run_point(point: Point, model_set: ModelSet, judge: Judge, cfg: SweepConfig, settings: SamplerSettings,
              out: SweepDir, progress: bool, ctx: DistContext = ONE_PROCESS,
              mauve_reference: np.ndarray | None = None) -> SweepPoint:
    """Sample, count, judge one point; return its results record (samples written first when kept).

    mauve_reference: judge features of the reference blocks, when the sweep measures MAUVE or saves features.
    Under torchrun every rank calls this and gets the line; rank 0 alone writes the samples and features.
    """
    output = run_schedule(model_set, point.schedule, settings, point.num_samples, cfg.batch_size, point.seed,
                          progress=progress, ctx=ctx)
    rows = output.tokens.tolist()
    start = time.perf_counter()
    judge_ids = judge_tokens(rows, model_set.tokenizer, judge, ctx)
    quality = _quality(rows, judge_ids, judge, cfg, model_set.seq_len, progress, ctx)
    mauve = None
    if mauve_reference is not None:
        features = judge_features(judge_ids, judge, cfg.judge_batch_size, model_set.seq_len)
        if cfg.mauve:
            mauve = MauveSummary(**mauve_scores(features, mauve_reference, cfg.mauve_seeds))
        if cfg.save_features and ctx.is_main:
            _save_array(out.feature_file(point.slug), features)
    judge_s = time.perf_counter() - start
    if cfg.save_samples and ctx.is_main:
        _write_samples(out.sample_file(point.slug), rows, model_set.tokenizer, quality["per_sample"], cfg.token_rule)
    counts = point.schedule.counts()
    light = model_set.light_to_heavy[0]
    return SweepPoint(
        key=point.key, num_samples=point.num_samples, **quality,
        provenance=provenance(model_set.device, ctx.world_size), label=point.label, groups=point.groups,
        segments=point.schedule.segments_str(), steps=point.steps, seed=point.seed, steps_per_model=counts,
        light_fraction=counts.get(light, 0) / point.steps, flops=SamplingFlops(**flops_summary(model_set, output)),
        cache=CacheUse(**cache_summary(output, point.steps)), wall_s=output.wall_s,
        batch_wall_s=output.batch_wall_s, judge_s=judge_s, mauve=mauve)


def _reference_rows(source: str, model_set: ModelSet, cfg: SweepConfig, ctx: DistContext) -> list[list[int]]:
    """The reference source's first validation blocks (same length and wrapping as samples)."""
    with ctx.main_first():  # rank 0 tokenises and caches; the other ranks then read its cache
        blocks = load_sources([source], model_set.tokenizer, model_set.seq_len, cfg.cache_dir,
                              short_fix=f"give the reference source {source} more text")
    return np.asarray(blocks[: cfg.reference.num_samples], dtype=np.int64).tolist()


def run_reference(name: str, source: str, model_set: ModelSet, judge: Judge, cfg: SweepConfig, progress: bool,
                  ctx: DistContext = ONE_PROCESS) -> ReferenceRow:
    """A reference row: real validation blocks, judged exactly as samples are."""
    rows = _reference_rows(source, model_set, cfg, ctx)
    judge_ids = judge_tokens(rows, model_set.tokenizer, judge, ctx)
    return ReferenceRow(key=reference_key(name, source, cfg.reference.num_samples), num_samples=len(rows),
                        **_quality(rows, judge_ids, judge, cfg, model_set.seq_len, progress, ctx),
                        provenance=provenance(model_set.device, ctx.world_size), name=name, source=source)


def _utc_now() -> str:
    return time.strftime(UTC_FORMAT, time.gmtime())


def reference_key(name: str, source: str, num_samples: int) -> str:
    return f"reference|{name}|{source}|n{num_samples}"


@dataclass
class SweepOutcome:
    out: SweepDir
    done: int = 0  # points run now
    skipped: int = 0  # points finished by an earlier run
    failed: list[str] = field(default_factory=list)  # keys of points that failed now


FollowUp = Callable[[SweepResults], Mapping[str, SweepGroup]]


def run_sweep(cfg: SweepConfig, progress: bool = True, echo: Callable[[str], None] = print,
              follow_up: FollowUp | None = None) -> SweepOutcome:
    """Run every point of the sweep not yet in results.jsonl (see the module docstring); every rank returns.

    follow_up, if given, is called with the sweep's results once the configured points are done; the
    groups it returns are planned and run too, with the same models and judge (e.g. the fraction curve
    of whichever placement measured best). Under torchrun it runs on rank 0 and its groups are shared.
    """
    settings = validate_sweep(cfg)  # before loading models: bad settings fail fast
    with distributed(cfg.runtime) as (ctx, device):
        model_set = open_models(cfg.models, cfg.runtime, cfg.seq_len, device)
        points = plan(cfg, model_set.light_to_heavy)
        judge = load_judge(cfg.judge, device, cfg.judge_context)
        run = _SweepRun(cfg, settings, model_set, judge, ctx, progress and ctx.is_main,
                        echo if ctx.is_main else lambda _: None)
        # Rank 0 reads and writes the folder; the others get its answer, so that all ranks plan the same work.
        ctx.on_main(lambda: _check_settings_file(run.outcome.out, cfg))
        run.references()
        run.points(points)
        if follow_up is not None:
            groups = ctx.on_main(lambda: follow_up(run.outcome.out.read()))
            if groups:
                points += plan(replace(cfg, groups=dict(groups)), model_set.light_to_heavy)
                run.points(points)
        if run.outcome.done:  # the baselines' wall-clock, measured again now that the run's points are done
            run.retime_baselines(points)
        return run.outcome


class _SweepRun:
    """The loaded models and judge of one sweep, and what it has done so far."""

    def __init__(self, cfg: SweepConfig, settings: SamplerSettings, model_set: ModelSet, judge: Judge,
                 ctx: DistContext, progress: bool, echo: Callable[[str], None]) -> None:
        self.cfg, self.settings, self.model_set, self.judge = cfg, settings, model_set, judge
        self.ctx, self.progress, self.echo = ctx, progress, echo
        self.outcome = SweepOutcome(SweepDir(Path(cfg.out_dir)))
        self.warmed = False
        self.planned: set[str] = set()  # keys of the points passed to points() so far
        self._mauve_reference: np.ndarray | None = None

    def mauve_reference(self) -> np.ndarray | None:
        """Judge features of the headline reference blocks (computed once), when the sweep measures MAUVE or
        saves features (then also written to features/reference.npy)."""
        if (self.cfg.mauve or self.cfg.save_features) and self._mauve_reference is None:
            source = next(iter(self.cfg.reference.sources.values()))
            rows = _reference_rows(source, self.model_set, self.cfg, self.ctx)
            judge_ids = judge_tokens(rows, self.model_set.tokenizer, self.judge, self.ctx)
            self._mauve_reference = judge_features(judge_ids, self.judge, self.cfg.judge_batch_size,
                                                   self.model_set.seq_len)
            if self.cfg.save_features and self.ctx.is_main:
                _save_array(self.outcome.out.reference_features, self._mauve_reference)
        return self._mauve_reference

    def _finished(self) -> set[str]:
        return self.ctx.on_main(self.outcome.out.finished_keys)

    def _append(self, record: SweepPoint | ReferenceRow | Timing | Failure) -> None:
        if self.ctx.is_main:
            self.outcome.out.append(record)

    def references(self) -> None:
        """The reference rows not yet in results.jsonl."""
        finished, cfg = self._finished(), self.cfg
        for name, source in cfg.reference.sources.items():
            if reference_key(name, source, cfg.reference.num_samples) not in finished:
                record = run_reference(name, source, self.model_set, self.judge, cfg, self.progress, self.ctx)
                self._append(record)
                # the blocks judged: fewer than asked for where the source has fewer
                self.echo(f"  reference {name} ({source}, {record.num_samples} blocks) done")

    def points(self, points: list[Point]) -> None:
        """Run the points not yet in results.jsonl; record the ones that fail for want of memory or on bad input."""
        out, finished = self.outcome.out, self._finished()
        todo = [p for p in points if p.key not in finished]
        # Finished before this run: not counted again when a follow-up group re-plans the points already done.
        self.outcome.skipped += sum(p.key in finished and p.key not in self.planned for p in points)
        self.planned.update(p.key for p in points)
        self.echo(f"sweep: {len(points)} points, {len(points) - len(todo)} already finished in {out.results}, "
                  f"{len(todo)} to run")
        if todo and self.model_set.needs_warm_up and not self.warmed:
            warm_up(self.model_set, self.settings, self.cfg.batch_size)  # compilation and capture stay out of wall_s
            self.warmed = True
        for n, point in enumerate(todo, 1):
            try:
                record = run_point(point, self.model_set, self.judge, self.cfg, self.settings, out, self.progress,
                                   self.ctx, self.mauve_reference())
            except RECORDED_FAILURES as exc:  # out of memory or bad input: keep the others, retry on a rerun
                message = " ".join(str(exc).split())[:300]
                if self.ctx.is_main:
                    log.error("point %s failed: %s", point.key, message)
                self._append(Failure(point.key, point.label, message, _utc_now()))
                self.outcome.failed.append(point.key)
                continue
            self._append(record)
            self.outcome.done += 1
            self.echo(f"  [{n}/{len(todo)}] {point.label} T={point.steps} seed={point.seed}: gen PPL "
                      f"{record.gen_ppl.ppl:.2f}, entropy {record.entropy.mean:.3f}, FLOPs saved "
                      f"{record.flops.saving_blocks_only:.1%} (blocks only) / "
                      f"{record.flops.saving_full:.1%} (full), {record.wall_s:.1f} s")

    def retime_baselines(self, points: list[Point]) -> None:
        """Time the first batch of each finished all-heavy point again (its lowest seed, per T and sample count):
        with the time in its point, the spread a wall-clock saving is set against (summary.wall_spread)."""
        heavy, finished = self.model_set.light_to_heavy[-1], self._finished()
        baselines: dict[tuple[int, int], Point] = {}
        for p in sorted(points, key=lambda p: p.seed):
            if p.schedule.counts() == {heavy: p.steps} and p.key in finished:
                baselines.setdefault((p.steps, p.num_samples), p)
        for point in baselines.values():
            output = run_schedule(self.model_set, point.schedule, self.settings,
                                  min(self.cfg.batch_size, point.num_samples), self.cfg.batch_size, point.seed,
                                  progress=False, ctx=self.ctx)
            self._append(Timing(point.key, 0, output.batch_wall_s[0], _utc_now()))
            self.echo(f"  baseline {point.label} T={point.steps}: first batch timed again, "
                      f"{output.batch_wall_s[0]:.2f} s")
