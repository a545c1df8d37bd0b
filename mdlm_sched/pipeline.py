"""`mdlm-sched pipeline EXPERIMENT.yaml`: one experiment end to end, resumable stage by stage.

Stages, in order: train each denoiser (its own config words over the words every run shares),
train the GPT-2 judge (or take a judge as given, e.g. gpt2-large), the per-step analysis, the
optimiser (schedules for chosen FLOPs savings, added to the sweep), the sweep, the optimiser's cost
model calibrated on every schedule the sweep measured, then each variant (SweepVariant: the sweep's
schedules again with other sampler settings, e.g. the latent cache, compared with the sweep point by
point); the command then writes the report from their files (analysis.report). A rerun of the same
command picks up where the last one stopped: training continues from its last checkpoint (a
finished run does nothing), the analysis is kept once written, the sweep skips finished points.
The analysis and sweep record the training steps of the models they were made from, and a rerun
after further training refuses to mix old and new results.

Every stage's settings are checked before any work: the training configs, the analysis settings,
and every schedule of the sweep and of the analysis figures, parsed against the configured models.

A failing analysis or sweep point does not stop the rest: the report is written from what
finished and the command exits 1. The folders are artifacts.PipelineDir's.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mdlm_sched.artifacts import PipelineDir, ReportDir, SweepResults, TrainingLog, TrainRun
from mdlm_sched.config import RunConfig, RuntimeConfig
from mdlm_sched.config_load import load, load_structured, replace_typed
from mdlm_sched.data import load_tokenizer, tokenizer_hash
from mdlm_sched.errors import ConfigError
from mdlm_sched.fileio import atomic_write_json, check_writable, read_json
from mdlm_sched.flops import forward_flops, names_light_to_heavy
from mdlm_sched.models import denoiser_config
from mdlm_sched.optimise import DEFAULT_BINS, FLOPS_CONVENTIONS, check_targets, run_optimise
from mdlm_sched.per_step import analyze_models
from mdlm_sched.provenance import provenance
from mdlm_sched.runtime import RECORDED_FAILURES, resolve_device
from mdlm_sched.sampling_config import (AnalysisConfig, SamplerSettings, SweepConfig, SweepGroup, check_group_draws,
                                        validate_analysis, validate_sweep)
from mdlm_sched.schedule import PLACEMENTS, parse_schedule
from mdlm_sched.summary import best_placement
from mdlm_sched.sweep import plan as plan_points
from mdlm_sched.sweep import run_sweep
from mdlm_sched.sweep_compare import PAIRING_SETTINGS, compare_sweeps

log = logging.getLogger(__name__)

JUDGE = "judge"  # the judge's training run is train/judge


@dataclass
class FractionCurve:
    """The light-share curve of the best placement, picked once the placements are measured."""

    among: str = "placements"  # the sweep group whose placement presets compete (summary.best_placement)
    fractions: list[float] = field(default_factory=list)  # light shares of the curve; [] = no curve
    seeds: list[int] | None = None  # None = the sweep's
    num_samples: int | None = None


@dataclass
class OptimiseStage:
    """The schedule optimiser in the pipeline (mdlm_sched.optimise)."""

    savings: list[float] = field(default_factory=list)  # FLOPs savings whose optimised schedules join the sweep
    tolerances: list[float] = field(default_factory=list)  # gen-PPL tolerances, solved with the calibrated model
    bins: int = DEFAULT_BINS
    flops: str = FLOPS_CONVENTIONS[0]  # blocks-only, or executed
    group: str = "optimised"  # the sweep group of the optimised schedules (labels optimised-<saving>)
    seeds: list[int] | None = None  # None = the sweep's
    num_samples: int | None = None


@dataclass
class SweepVariant:
    """The sweep again with other sampler settings (the latent cache, say), compared point by point with it.

    Its points are those of `groups` (planned as the sweep's are); every other setting is the sweep's but the
    reference rows, of which it scores only the headline one (MAUVE's reference). Its samples pair with the
    sweep's (same models, judge, batches and randomness), so each of its schedules that the sweep also ran gets
    paired intervals (sweep_compare); a setting that would break the pairing is refused.
    """

    settings: dict[str, Any] = field(default_factory=dict)  # sampler settings replaced, e.g. latent_cache: true
    groups: dict[str, SweepGroup] = field(default_factory=dict)


# The sampler settings a variant may change: all but those its samples must share with the sweep's to pair.
VARIANT_SETTINGS = tuple(f.name for f in fields(SamplerSettings) if f.name not in PAIRING_SETTINGS)


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
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # its models, judge, out_dir, runtime are set here
    fraction_curve: FractionCurve = field(default_factory=FractionCurve)
    optimise: OptimiseStage = field(default_factory=OptimiseStage)
    variants: dict[str, SweepVariant] = field(default_factory=dict)  # name -> the sweep with other sampler settings


@dataclass
class Plan:
    """An experiment resolved: every training config and the sweep, all validated before any work."""

    experiment: ExperimentConfig
    runs: dict[str, RunConfig]  # denoisers in config order, then the judge if it is trained
    sweep: SweepConfig
    variants: dict[str, SweepConfig]  # name -> the variant's sweep, resolved (SweepVariant)

    @property
    def out(self) -> PipelineDir:
        return PipelineDir(Path(self.experiment.out_dir))

    @property
    def report_dir(self) -> Path:
        return Path(self.experiment.report_dir) if self.experiment.report_dir else self.out.report


def _light_to_heavy(runs: dict[str, RunConfig], names: list[str], seq_len: int | None) -> tuple[list[str], float]:
    """The denoisers' names by FLOPs per forward, from their configs (before any of them is trained), and the
    blocks-only FLOPs saving of the lightest alone."""
    tokenizer = load_tokenizer(runs[names[0]].data.tokenizer)
    configs = {name: denoiser_config(runs[name], len(tokenizer), tokenizer.eos_token_id, tokenizer_hash(tokenizer))
               for name in names}
    seq_len = seq_len or runs[names[0]].model.max_seq_len
    order = names_light_to_heavy(configs, seq_len)
    per_forward = [forward_flops(configs[name], seq_len).blocks_only for name in order]
    return order, 1 - per_forward[0] / per_forward[-1]


def load_experiment(args: list[str] | tuple[str, ...]) -> Plan:
    """Read an experiment from YAML files and key=value overrides; resolve and check every stage's settings."""
    exp = load_structured(ExperimentConfig, args, "experiment file")
    if len(exp.models) < 2:
        raise ConfigError(f"experiment: models lists {len(exp.models)} denoiser(s); give at least two "
                          f"(e.g. small and large) under models:")
    if JUDGE in exp.models:
        raise ConfigError(f"experiment: '{JUDGE}' is the judge's run name; rename that denoiser")
    if not exp.judge and not exp.sweep.judge:
        raise ConfigError("experiment: no judge; give its training words under judge: or a causal LM under "
                          "sweep.judge (e.g. gpt2-large)")
    out = PipelineDir(Path(exp.out_dir))
    check_writable(out.root, "out_dir")
    if exp.report_dir:
        check_writable(exp.report_dir, "report_dir")
    runtime = [f"runtime.{k}={v}" for k, v in OmegaConf.to_container(OmegaConf.structured(exp.runtime)).items()]
    runs = {name: load([*exp.train_common, *words, *runtime, f"train.out_dir={out.train(name).root}"])
            for name, words in [*exp.models.items(), *([(JUDGE, exp.judge)] if exp.judge else [])]}
    for name, cfg in runs.items():
        want = "gpt2" if name == JUDGE else "mdlm"
        if cfg.model.arch != want:
            raise ConfigError(f"experiment: run '{name}' has model.arch={cfg.model.arch}, expected {want}; "
                              f"give it a {'judge_*' if want == 'gpt2' else 'denoiser'} model preset")
    sweep = replace(exp.sweep, models={name: str(out.train(name).root) for name in exp.models},
                    judge=str(out.train(JUDGE).root) if exp.judge else exp.sweep.judge,
                    out_dir=str(out.sweep.root), runtime=exp.runtime)
    validate_sweep(sweep)
    validate_analysis(exp.analysis)
    # Every schedule is parsed now, against the models as configured: a typo fails before any training.
    light_to_heavy, lightest_saving = _light_to_heavy(runs, list(exp.models), sweep.seq_len)
    opt = exp.optimise
    check_targets(opt.savings, opt.tolerances, opt.bins, opt.flops, lightest_saving)
    if not opt.bins <= exp.analysis.steps:
        raise ConfigError(f"optimise.bins={opt.bins} exceeds the analysis's steps={exp.analysis.steps}; use fewer")
    if opt.group in sweep.groups:
        raise ConfigError(f"optimise.group={opt.group!r} is a group of the sweep already; name another")
    plan_points(sweep, light_to_heavy)
    for spec in exp.analysis.shade:
        parse_schedule(spec, exp.analysis.steps, light_to_heavy, exp.analysis.t_min)
    curve = exp.fraction_curve
    check_group_draws(opt.seeds, opt.num_samples, "optimise")
    check_group_draws(curve.seeds, curve.num_samples, "fraction_curve")
    if curve.fractions:
        group = sweep.groups.get(curve.among)
        if group is None or not [label for label in group.schedules if label in PLACEMENTS]:
            raise ConfigError(f"fraction_curve.among={curve.among!r} is not a sweep group with placement presets "
                              f"({', '.join(PLACEMENTS)}); name one")
        if not all(0 < f < 1 for f in curve.fractions):
            raise ConfigError(f"fraction_curve.fractions={curve.fractions} must lie in (0, 1)")
    variants = {name: _variant_sweep(name, variant, sweep, out, light_to_heavy)
                for name, variant in exp.variants.items()}
    return Plan(exp, runs, sweep, variants)


def _variant_sweep(name: str, variant: SweepVariant, sweep: SweepConfig, out: PipelineDir,
                   light_to_heavy: list[str]) -> SweepConfig:
    """A variant's sweep config, checked like the sweep's (bad settings and schedules fail before any work)."""
    what = f"variants.{name}"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{what}: a variant's name is its folder under variants/; give a plain name")
    unknown = sorted(set(variant.settings) - set(VARIANT_SETTINGS))
    if unknown or not variant.settings:
        raise ConfigError(f"{what}.settings={dict(variant.settings)} must replace one or more of "
                          f"{', '.join(VARIANT_SETTINGS)}" + (f" (not {', '.join(unknown)}: the variant's samples "
                                                             f"must pair with the sweep's)" if unknown else ""))
    if not variant.groups:
        raise ConfigError(f"{what}.groups is empty; give the schedules to sample again, e.g. "
                          f"groups: {{cached: {{schedules: [all-large]}}}}")
    headline = dict(list(sweep.reference.sources.items())[:1])
    cfg = replace(replace_typed(sweep, variant.settings), groups=variant.groups, out_dir=str(out.variant(name).root),
                  reference=replace(sweep.reference, sources=headline))
    validate_sweep(cfg)
    plan_points(cfg, light_to_heavy)
    return cfg


def training_summary(run: TrainRun) -> dict[str, Any]:
    """What a training run did, from its config.yaml and log.jsonl: size, tokens seen, passes, validation."""
    cfg = OmegaConf.load(run.config)
    records = TrainingLog.read(run.log)
    start, steps = records.starts[-1], records.train
    last = steps[-1] if steps else {}
    tokens_seen = last.get("tokens_seen", 0)
    vals = {name: [(r["step"], r["ppl"]) for r in series] for name, series in records.val.items()}
    return {
        "run": str(run.root), "arch": cfg.model.arch, "layers": cfg.model.num_hidden_layers,
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


class PipelineState:
    """pipeline.json: per stage its wall-clock and the model steps it was made from; rewritten atomically."""

    def __init__(self, out: PipelineDir) -> None:
        self.path = out.state
        self.data: dict[str, Any] = read_json(self.path, "the pipeline.json of a pipeline run") \
            if self.path.is_file() else {"stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **record: Any) -> None:
        self.data["stages"][name] = record
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def check_models(self, name: str, folder: Path, models: dict[str, int]) -> None:
        made_from = self.stage(name).get("models")
        if folder.exists() and made_from is not None and made_from != models:  # a deleted folder is redone
            raise ConfigError(f"{folder} was made from models at steps {made_from}, now {models}; delete it "
                              f"to redo the {name} or choose a new out_dir")

    def record_report(self, report: ReportDir, wall_s: float) -> None:
        """The report stage, once the report is written, and a copy of this record beside it."""
        self.set("report", wall_s=wall_s, path=str(report.report))
        atomic_write_json(report.experiment, self.data)


@dataclass
class PipelineOutcome:
    state: PipelineState
    report_folders: list[Path]  # the analysis and sweep folders that hold results
    failed: list[str]  # stages or sweep points that failed


def run_pipeline(plan: Plan, progress: bool = True, echo: Callable[[str], None] = print) -> PipelineOutcome:
    """Run (or resume) the experiment's training, analysis and sweep; see the module docstring."""
    from mdlm_sched.train import train  # transformers and the trainer load only once the config is valid

    exp, out = plan.experiment, plan.out
    state = PipelineState(out)
    state.data["config"] = OmegaConf.to_container(OmegaConf.structured(exp))
    state.data["provenance"] = provenance(resolve_device(exp.runtime))
    failed: list[str] = []

    trained_steps: dict[str, int] = {}  # run name -> the training step its model is at
    for name, cfg in plan.runs.items():
        stage, start = f"train/{name}", time.perf_counter()
        done = out.train(name).latest_step()
        echo(f"pipeline: {name} ({cfg.model.arch}, {cfg.model.num_hidden_layers} x {cfg.model.hidden_size}) "
             + (f"already trained to step {done}" if done == cfg.train.steps else
                f"training to step {cfg.train.steps}" + (f" from step {done}" if done else ""))
             + f" in {cfg.train.out_dir}")
        result = train(cfg, progress=progress)
        trained_steps[name] = result.step
        if state.stage(stage).get("step") != result.step:  # it trained now: this is the stage's wall-clock
            state.set(stage, step=result.step, wall_s=time.perf_counter() - start)

    # Written as soon as training ends, so that a run cut short in a later stage still says what its models are.
    state.data["training"] = {name: training_summary(TrainRun(Path(cfg.train.out_dir)))
                              for name, cfg in plan.runs.items()}
    state.save()

    analysis = out.analysis
    state.check_models("analysis", analysis.root, trained_steps)
    if analysis.exists():
        echo(f"pipeline: per-step analysis already in {analysis.root}")
    else:
        echo(f"pipeline: per-step analysis (T={exp.analysis.steps}, {exp.analysis.grid} grid steps) -> "
             f"{analysis.root}")
        start = time.perf_counter()
        try:
            analyze_models(plan.sweep.models, exp.analysis, exp.runtime, analysis, plan.sweep.seq_len, progress)
            state.set("analysis", models=trained_steps, wall_s=time.perf_counter() - start)
        except RECORDED_FAILURES as exc:  # e.g. out of memory: the sweep and the report still run
            log.error("per-step analysis failed: %s", exc)
            failed.append("analysis")

    sweep_cfg, opt = plan.sweep, exp.optimise
    if opt.savings and analysis.exists():  # recomputed on every run: it is cheap and follows from the analysis
        echo(f"pipeline: optimiser for FLOPs savings {', '.join(f'{s:g}' for s in opt.savings)} -> {out.optimise.root}")
        record = run_optimise(analysis, out.optimise, opt.savings, (), opt.bins, opt.flops, echo=echo)
        named = {f"{opt.group}-{item['value']:g}": item["thresholds"] for item in record["schedules"]}
        group = SweepGroup(named=named, seeds=opt.seeds, num_samples=opt.num_samples)
        sweep_cfg = replace(sweep_cfg, groups={**sweep_cfg.groups, opt.group: group})
    elif opt.savings:
        failed.append("optimise")  # there is no analysis to optimise from

    sweep = out.sweep
    state.check_models("sweep", sweep.root, trained_steps)
    echo(f"pipeline: sweep -> {sweep.root}")
    start = time.perf_counter()
    curve = exp.fraction_curve

    def fraction_group(results: SweepResults) -> dict[str, SweepGroup]:
        best = best_placement(results.points, curve.among)
        echo(f"pipeline: fraction curve for {best['placement']}, the lowest gen PPL at T={best['steps']} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in best['gen_ppl'].items())}); "
             f"{'separated from' if best['separated'] else 'not separated from'} the runner-up")
        state.data["fraction_curve"] = best
        return {"fraction": SweepGroup(placements=[best["placement"]], fractions=curve.fractions,
                                       step_counts=[best["steps"]], seeds=curve.seeds, num_samples=curve.num_samples)}

    outcome = run_sweep(sweep_cfg, progress=progress, echo=echo,
                        follow_up=fraction_group if curve.fractions else None)
    failed += outcome.failed
    previous = state.stage("sweep").get("wall_s", 0.0)  # sweep points accumulate over reruns
    state.set("sweep", models=trained_steps, wall_s=previous + (time.perf_counter() - start if outcome.done else 0.0),
              points_done=outcome.done + outcome.skipped, points_failed=len(outcome.failed))

    if (opt.savings or opt.tolerances) and analysis.exists() and sweep.results.is_file():
        echo(f"pipeline: optimiser calibrated on the sweep's measured schedules -> {out.calibrated.root}")
        run_optimise(analysis, out.calibrated, opt.savings, opt.tolerances, opt.bins, opt.flops, sweep, echo=echo)

    folders = [root for root, done in ((analysis.root, analysis.exists()), (sweep.root, sweep.results.is_file()),
                                       (out.optimise.root, out.optimise.record.is_file()),
                                       (out.calibrated.root, out.calibrated.record.is_file())) if done]
    for name, cfg in plan.variants.items():
        failed += _run_variant(name, cfg, plan, state, trained_steps, progress, echo)
        if out.variant_compare(name).record.is_file():
            folders.append(out.variant_compare(name).root)
    return PipelineOutcome(state, folders, failed)


def _run_variant(name: str, cfg: SweepConfig, plan: Plan, state: PipelineState, trained_steps: dict[str, int],
                 progress: bool, echo: Callable[[str], None]) -> list[str]:
    """Sweep a variant (resumable like the sweep) and compare it with the sweep; return what failed."""
    out, stage = plan.out, f"variant/{name}"
    variant = out.variant(name)
    state.check_models(stage, variant.root, trained_steps)
    settings = ", ".join(f"{k}={v}" for k, v in plan.experiment.variants[name].settings.items())
    echo(f"pipeline: variant {name} ({settings}) -> {variant.root}")
    start = time.perf_counter()
    outcome = run_sweep(cfg, progress=progress, echo=echo)
    previous = state.stage(stage).get("wall_s", 0.0)
    state.set(stage, models=trained_steps, wall_s=previous + (time.perf_counter() - start if outcome.done else 0.0),
              points_done=outcome.done + outcome.skipped, points_failed=len(outcome.failed))
    if variant.results.is_file() and out.sweep.results.is_file():
        compare = out.variant_compare(name)
        compare.write(compare_sweeps(out.sweep, variant))
        echo(f"pipeline: variant {name} against the sweep -> {compare.record}")
    return outcome.failed
