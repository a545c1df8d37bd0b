"""`mdlm-sched pipeline EXPERIMENT.yaml`: one experiment end to end, resumable stage by stage.

Stages, in order: train each denoiser (its own config words over the words every run shares),
train the GPT-2 judge (or take a judge as given, e.g. gpt2-large), the per-step analysis, the
sweep, the report. A rerun of the same command picks up where the last one stopped: training
continues from its last checkpoint (a finished run does nothing), the analysis is kept once
written, the sweep skips finished points. The analysis and sweep record the training steps of the
models they were made from, and a rerun after further training refuses to mix old and new results.

A failing analysis or sweep point does not stop the rest: the report is written from what
finished and the command exits 1. Under out_dir: train/<name>/ (training runs), analysis/,
sweep/, pipeline.json (stages, wall-clock, training summaries, provenance); the report goes to
report_dir.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from analysis.per_step import PerStepSettings, analyze_models
from analysis.report import build_report, main_steps, summarize
from analysis.sweep import run_sweep
from mdlm_sched.checkpoint import atomic_write_text
from mdlm_sched.config import (RunConfig, RuntimeConfig, SweepConfig, SweepGroup, load, load_structured,
                               validate_sweep)
from mdlm_sched.errors import ConfigError
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import resolve_device
from mdlm_sched.schedule import PRESETS

log = logging.getLogger(__name__)

JUDGE = "judge"  # the judge's training run is train/judge
STATE = "pipeline.json"


@dataclass
class FractionCurve:
    """The light-share curve of the best placement, picked once the placements are measured."""

    among: str = "placements"  # the sweep group whose placement presets compete: the lowest mean gen PPL wins
    fractions: list[float] = field(default_factory=list)  # light shares of the curve; [] = no curve
    seeds: list[int] | None = None  # None = the sweep's
    num_samples: int | None = None


@dataclass
class ExperimentConfig:
    """An experiment (configs/experiment/*.yaml): what to train, analyse, sweep and report."""

    title: str = "Model scheduling experiment"
    data_root: str = "../shared/data"  # for ${data_root} in the words and paths below
    out_dir: str = "runs/experiment"
    report_dir: str = ""  # "" = <out_dir>/report
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # every stage, training included
    # `mdlm-sched train` words: those of every run first, then each run's own. A section preset such as
    # model=small resets its section, so model.* overrides go after it, in the run's own words.
    train_common: list[str] = field(default_factory=list)
    models: dict[str, list[str]] = field(default_factory=dict)  # denoiser name -> its own words (model=small, ...)
    judge: list[str] = field(default_factory=list)  # the judge's own words; [] = sweep.judge as given
    analysis: PerStepSettings = field(default_factory=PerStepSettings)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # its models, judge, out_dir, runtime are set here
    fraction_curve: FractionCurve = field(default_factory=FractionCurve)


@dataclass
class Plan:
    """An experiment resolved: every training config and the sweep, all validated before any work."""

    experiment: ExperimentConfig
    runs: dict[str, RunConfig]  # denoisers in config order, then the judge if it is trained
    sweep: SweepConfig

    @property
    def out(self) -> Path:
        return Path(self.experiment.out_dir)

    @property
    def report_dir(self) -> Path:
        return Path(self.experiment.report_dir or self.out / "report")


def load_experiment(args: list[str] | tuple[str, ...]) -> Plan:
    """Read an experiment from YAML files and key=value overrides; resolve and validate every stage's config."""
    exp = load_structured(ExperimentConfig, args, "experiment file")
    if len(exp.models) < 2:
        raise ConfigError(f"experiment: models lists {len(exp.models)} denoiser(s); give at least two "
                          f"(e.g. small and large) under models:")
    if JUDGE in exp.models:
        raise ConfigError(f"experiment: '{JUDGE}' is the judge's run name; rename that denoiser")
    if not exp.judge and not exp.sweep.judge:
        raise ConfigError("experiment: no judge; give its training words under judge: or a causal LM under "
                          "sweep.judge (e.g. gpt2-large)")
    out = Path(exp.out_dir)
    runtime = [f"runtime.{k}={v}" for k, v in OmegaConf.to_container(OmegaConf.structured(exp.runtime)).items()]
    runs = {name: load([*exp.train_common, *words, *runtime, f"train.out_dir={out / 'train' / name}"])
            for name, words in [*exp.models.items(), *([(JUDGE, exp.judge)] if exp.judge else [])]}
    for name, cfg in runs.items():
        want = "gpt2" if name == JUDGE else "mdlm"
        if cfg.model.arch != want:
            raise ConfigError(f"experiment: run '{name}' has model.arch={cfg.model.arch}, expected {want}; "
                              f"give it a {'judge_*' if want == 'gpt2' else 'denoiser'} model preset")
    sweep = replace(exp.sweep, models={name: str(out / "train" / name) for name in exp.models},
                    judge=str(out / "train" / JUDGE) if exp.judge else exp.sweep.judge,
                    out_dir=str(out / "sweep"), runtime=exp.runtime)
    validate_sweep(sweep)
    curve = exp.fraction_curve
    if curve.fractions:
        group = sweep.groups.get(curve.among)
        if group is None or not _candidates(group.schedules):
            raise ConfigError(f"fraction_curve.among={curve.among!r} is not a sweep group with placement presets "
                              f"({', '.join(_candidates(PRESETS))}); name one")
        if not all(0 < f < 1 for f in curve.fractions):
            raise ConfigError(f"fraction_curve.fractions={curve.fractions} must lie in (0, 1)")
    return Plan(exp, runs, sweep)


def _candidates(labels: Sequence[str]) -> list[str]:
    """The placement presets among schedule labels (all-large and all-small place nothing)."""
    return [label for label in labels if label in PRESETS and not label.startswith("all-")]


def best_placement(records: Sequence[Mapping[str, Any]], group: str) -> tuple[str, int, dict[str, float]]:
    """(placement, T, mean gen PPL of each candidate) of the group's placement presets at its most common T."""
    rows = [r for r in summarize([p for p in records if p["kind"] == "point"])
            if group in r["groups"] and _candidates([r["label"]])]
    if not rows:
        raise ConfigError(f"sweep group {group!r} has no finished placement points to choose the curve's from; "
                          f"rerun the command once they finish")
    steps = main_steps(rows)
    ppl = {r["label"]: r["gen_ppl_mean"] for r in rows if r["steps"] == steps}
    return min(ppl, key=ppl.get), steps, ppl


def training_summary(run_dir: Path) -> dict[str, Any]:
    """What a training run did, from its config.yaml and log.jsonl: size, tokens seen, passes, validation."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "lr" in r]
    start = [r for r in records if r.get("event") in ("start", "resume")][-1]
    vals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if str(r.get("split", "")).startswith("val/"):
            vals.setdefault(r["split"][4:], []).append((r["step"], r["ppl"]))
    last = steps[-1] if steps else {}
    tokens_seen = last.get("tokens_seen", 0)
    return {
        "run": str(run_dir), "arch": cfg.model.arch, "layers": cfg.model.num_hidden_layers,
        "hidden_size": cfg.model.hidden_size, "parameters": start["parameters"], "steps": last.get("step", 0),
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "lr": cfg.train.lr,
        "lr_schedule": cfg.train.lr_schedule, "warmup_steps": cfg.train.warmup_steps, "dropout": cfg.model.dropout,
        "tokens_seen": tokens_seen, "train_tokens": start["train_tokens"],
        "passes": tokens_seen / start["train_tokens"], "last_loss": last.get("loss"),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
        # per source: the last value, and the best with its step (a last value above the best means overfitting)
        "val": {name: {"last": series[-1][1], "last_step": series[-1][0], "best": min(p for _, p in series),
                       "best_step": min(series, key=lambda sp: sp[1])[0]} for name, series in vals.items()},
    }


class _State:
    """pipeline.json: per stage its wall-clock and the model steps it was made from; rewritten atomically."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **record: Any) -> None:
        self.data["stages"][name] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")

    def check_models(self, name: str, folder: Path, models: dict[str, int]) -> None:
        made_from = self.stage(name).get("models")
        if folder.exists() and made_from is not None and made_from != models:  # a deleted folder is redone
            raise ConfigError(f"{folder} was made from models at steps {made_from}, now {models}; delete it "
                              f"to redo the {name} or choose a new out_dir")


@dataclass
class PipelineOutcome:
    report: Path
    failed: list[str]  # stages or sweep points that failed


def run_pipeline(plan: Plan, progress: bool = True, echo: Callable[[str], None] = print) -> PipelineOutcome:
    """Run (or resume) every stage of the experiment; see the module docstring."""
    from mdlm_sched.train import train  # transformers and the trainer load only once the config is valid

    exp, out = plan.experiment, plan.out
    state = _State(out)
    state.data["config"] = OmegaConf.to_container(OmegaConf.structured(exp))
    state.data["provenance"] = provenance(resolve_device(exp.runtime))
    failed: list[str] = []

    steps: dict[str, int] = {}
    for name, cfg in plan.runs.items():
        stage, start = f"train/{name}", time.perf_counter()
        echo(f"pipeline: training {name} ({cfg.model.arch}, {cfg.model.num_hidden_layers} x {cfg.model.hidden_size}) "
             f"to step {cfg.train.steps} in {cfg.train.out_dir}")
        result = train(cfg, progress=progress)
        steps[name] = result.step
        if state.stage(stage).get("step") != result.step:  # it trained now: this is the stage's wall-clock
            state.set(stage, step=result.step, wall_s=time.perf_counter() - start)

    analysis_dir = out / "analysis"
    state.check_models("analysis", analysis_dir, steps)
    if (analysis_dir / "per_step.json").is_file():
        echo(f"pipeline: per-step analysis already in {analysis_dir}")
    else:
        echo(f"pipeline: per-step analysis (T={exp.analysis.steps}, {exp.analysis.grid} grid steps) -> {analysis_dir}")
        start = time.perf_counter()
        try:
            analyze_models(plan.sweep.models, exp.analysis, exp.runtime, analysis_dir, plan.sweep.seq_len, progress)
            state.set("analysis", models=steps, wall_s=time.perf_counter() - start)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the sweep and the report still run
            log.error("per-step analysis failed: %s", exc)
            failed.append("analysis")

    sweep_dir = Path(plan.sweep.out_dir)
    state.check_models("sweep", sweep_dir, steps)
    echo(f"pipeline: sweep -> {sweep_dir}")
    start = time.perf_counter()
    curve = exp.fraction_curve

    def fraction_group(records: list[dict[str, Any]]) -> dict[str, SweepGroup]:
        best, at_steps, candidates = best_placement(records, curve.among)
        echo(f"pipeline: fraction curve for {best}, the lowest gen PPL at T={at_steps} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in candidates.items())})")
        state.data["fraction_curve"] = {"placement": best, "steps": at_steps, "gen_ppl_of_candidates": candidates}
        return {"fraction": SweepGroup(placements=[best], fractions=curve.fractions, steps=[at_steps],
                                       seeds=curve.seeds, num_samples=curve.num_samples)}

    outcome = run_sweep(plan.sweep, progress=progress, echo=echo,
                        follow_up=fraction_group if curve.fractions else None)
    failed += outcome.failed
    previous = state.stage("sweep").get("wall_s", 0.0)  # sweep points accumulate over reruns
    state.set("sweep", models=steps, wall_s=previous + (time.perf_counter() - start if outcome.done else 0.0),
              points_done=outcome.done + outcome.skipped, points_failed=len(outcome.failed))

    state.data["training"] = {name: training_summary(Path(cfg.train.out_dir)) for name, cfg in plan.runs.items()}
    folders = [f for f in (analysis_dir, sweep_dir)
               if (f / "per_step.json").is_file() or (f / "results.jsonl").is_file()]
    start = time.perf_counter()
    report = build_report(folders, plan.report_dir, exp.title, experiment=state.data)
    state.set("report", wall_s=time.perf_counter() - start, path=str(report))
    atomic_write_text(plan.report_dir / "experiment.json", json.dumps(state.data, indent=1) + "\n")
    return PipelineOutcome(report, failed)
