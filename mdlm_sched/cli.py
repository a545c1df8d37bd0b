"""`mdlm-sched <subcommand>`: the command-line entry point.

Bad input ends with one line on stderr and exit code 2; a diverged training run with exit code 1.
Option defaults are read from the config dataclasses (SampleConfig, AnalysisConfig), never restated.
The dependencies run one way: cli (the top layer) -> analysis (reports and figures; torch-free) -> mdlm_sched.
analysis is imported here at module level. The library's torch-bound modules are imported inside each command,
after its input is checked, so that a bad input fails in a fraction of a second rather than after torch loads.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path

from analysis.compare_section import comparison_lines
from analysis.report import build_report, per_step_figures
from mdlm_sched.cli_inputs import add_sampling_run_args, model_pairs, read_prompt_file, runtime_from_args
from mdlm_sched.errors import NonFiniteLossError, UserError
from mdlm_sched.ranks import launch_context

CONFIG_HELP = ("config words, in order: section=preset (configs/<section>/<preset>.yaml), "
               "a.b=value overrides, or YAML files")


def _train(args: argparse.Namespace) -> int:
    from mdlm_sched.config_load import load

    cfg = load(args.config)  # before importing the trainer (and transformers): bad input fails fast
    from mdlm_sched.train import train

    result = train(cfg, progress=not args.no_progress)
    if not launch_context().is_main:  # under torchrun, rank 0 reports for all
        return 0
    kind = "perplexity bound" if cfg.model.arch == "mdlm" else "perplexity"
    print(f"trained {cfg.model.arch} to step {result.step} in {result.out_dir}")
    if result.last_loss is not None:
        print(f"  last training loss: {result.last_loss:.4f}")
    for name, ppl in result.val.items():
        print(f"  val/{name} {kind}: {ppl:.2f}")
    print(f"  model (Hugging Face format): {result.model_dir}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mdlm_sched.sampling_config import SampleConfig

    texts, ids = read_prompt_file(args.prompts_file) if args.prompts_file else ([], [])
    cfg = SampleConfig(
        models=model_pairs(args.model), schedule=args.schedule, steps=args.steps, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=args.seed, top_p=args.top_p, cache=not args.no_cache,
        noise_removal=not args.no_noise_removal, seq_len=args.seq_len, t_min=args.t_min,
        latent_cache=args.latent_cache, latent_refresh_every=args.latent_refresh_every,
        latent_refresh_share=args.latent_refresh_share, prompts=[*args.prompt, *texts], prompt_token_ids=ids,
        out_dir=args.out, runtime=runtime_from_args(args),
    )
    from mdlm_sched.generate import sample_command

    sample_command(cfg, progress=not args.no_progress)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from mdlm_sched.artifacts import AnalysisDir
    from mdlm_sched.sampling_config import AnalysisConfig

    settings = AnalysisConfig(steps=args.steps, grid=args.grid, data=args.data, num_blocks=args.num_blocks,
                              trajectory_samples=args.trajectory_samples, batch_size=args.batch_size,
                              seed=args.seed, shade=args.shade or AnalysisConfig().shade, cache_dir=args.cache_dir,
                              t_min=args.t_min)
    out = AnalysisDir(Path(args.out))
    if out.csv.exists() or out.json.exists():  # an analysis is hours of work on big models: never overwrite it
        raise UserError(f"--out {args.out} already holds a per-step analysis ({out.csv.name}); give a new --out, or "
                        f"delete that folder to analyse again")
    from mdlm_sched.per_step import analyze_models
    from mdlm_sched.summary import band_text

    record = analyze_models(model_pairs(args.model), settings, runtime_from_args(args), out, args.seq_len,
                            progress=not args.no_progress)
    figures = per_step_figures(out.root, out.root)
    print(f"per-step analysis of {', '.join(record['light_to_heavy'])} at {len(record['grid_steps'])} of "
          f"T={settings.steps} steps")
    for p in record["peaks"]:
        print(f"  {p['source']:>10} {p['metric']:>6} {p['model']:>16}: peak at step {p['step']} (t={p['t']:.3f}), "
              f"{p['mean']:.4f} {band_text(p['ci_low'], p['ci_high'])}")
    print(f"  wrote {out.csv}, {out.json} and {len(figures)} figure files")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mdlm_sched.sampling_config import load_sweep

    cfg = load_sweep(args.config)
    from mdlm_sched.sweep import run_sweep

    outcome = run_sweep(cfg, progress=not args.no_progress)
    if launch_context().is_main:  # under torchrun, rank 0 reports for all (the ranks agree on the failures)
        print(f"sweep: {outcome.done} points run, {outcome.skipped} finished earlier; results in "
              f"{outcome.out.results}")
        if outcome.failed:
            print(f"mdlm-sched: {len(outcome.failed)} points failed (see {outcome.out.failures}); "
                  f"rerun the same command to retry them", file=sys.stderr)
    return 1 if outcome.failed else 0


def _pipeline(args: argparse.Namespace) -> int:
    from mdlm_sched.pipeline import load_experiment, run_pipeline

    plan = load_experiment(args.config)  # every stage's config is checked before any work
    outcome = run_pipeline(plan, progress=not args.no_progress)
    from mdlm_sched.artifacts import ReportDir

    start = time.perf_counter()
    path = build_report(outcome.report_folders, plan.report_dir, plan.experiment.title,
                        experiment=outcome.state.data)
    outcome.state.record_report(ReportDir(plan.report_dir), time.perf_counter() - start)
    print(f"pipeline: report in {path}")
    if outcome.failed:
        print(f"mdlm-sched: {len(outcome.failed)} parts failed ({', '.join(outcome.failed)}); the report holds the "
              f"rest; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _optimise(args: argparse.Namespace) -> int:
    from mdlm_sched.artifacts import AnalysisDir, OptimiseDir, SweepDir
    from mdlm_sched.optimise import run_optimise

    run_optimise(AnalysisDir(Path(args.analysis)), OptimiseDir(Path(args.out)), args.saving, args.tolerance,
                 args.bins, args.flops, SweepDir(Path(args.sweep)) if args.sweep else None, args.model, args.steps)
    return 0


def _import_mdlm(args: argparse.Namespace) -> int:
    from mdlm_sched.artifacts import IMPORT_RECORD
    from mdlm_sched.checkpoint import check_new_model_folder, export_model
    from mdlm_sched.data import load_tokenizer, tokenizer_hash
    from mdlm_sched.models.mdlm_format import load_mdlm

    out = check_new_model_folder(args.out, "imported model")
    tokenizer = load_tokenizer(args.tokenizer, fix="give --tokenizer the folder (or hub name) of the tokenizer the "
                                                   "model was trained with")
    imported = load_mdlm(args.source, tokenizer, tokenizer_hash(tokenizer), ema=not args.no_ema)
    export_model(imported.model, tokenizer, out, records={IMPORT_RECORD: imported.record})
    print(f"imported {args.source}: {imported.describe()}; written to {out} (what was read: {out / IMPORT_RECORD})")
    return 0


def _convert_mla(args: argparse.Namespace) -> int:
    from mdlm_sched.config import RuntimeConfig
    from mdlm_sched.convert import convert_command

    runtime = RuntimeConfig(device=args.device, precision=args.precision)
    result = convert_command(args.source, args.out, args.kv_lora_rank, args.qk_rope_head_dim, args.calibration,
                             args.calibration_blocks, args.cache_dir, runtime, progress=not args.no_progress,
                             **({} if args.save_every is None else {"save_every_s": args.save_every}))
    if result.resumed_blocks:
        print(f"resumed an unfinished conversion: {result.resumed_blocks} of {result.blocks} calibration blocks "
              f"were done")
    print(f"converted {args.source} to MLA (latent {args.kv_lora_rank}, rotary key {args.qk_rope_head_dim}): "
          f"{result.kv_converted} key/value elements per token and block, against {result.kv_source}; "
          f"written to {args.out}")
    if result.bound_source is not None:
        print(f"  perplexity bound on the {result.blocks} calibration blocks (the data the conversion was fit on, "
              f"same noise draws): source {result.bound_source:.2f}, converted {result.bound_converted:.2f}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mdlm_sched.fileio import read_json

    experiment = None
    if args.experiment:
        experiment = read_json(Path(args.experiment), "the pipeline.json of a mdlm-sched pipeline run")
    path = build_report([Path(f) for f in args.folders], Path(args.out), args.title, experiment)
    print(f"wrote {path} and its figures (PNG + PDF) in {path.parent}")
    return 0


def _mauve(args: argparse.Namespace) -> int:
    from mdlm_sched.artifacts import SweepDir
    from mdlm_sched.sweep_mauve import mauve_from_features

    out = SweepDir(Path(args.sweep))
    mauve_from_features(out, args.seeds, progress=not args.no_progress)
    print(f"wrote {out.mauve}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mdlm_sched.artifacts import CompareDir, SweepDir
    from mdlm_sched.fileio import check_writable
    from mdlm_sched.sweep_compare import compare_sweeps

    if args.out:
        check_writable(Path(args.out), "--out")
    record = compare_sweeps(SweepDir(Path(args.a)), SweepDir(Path(args.b)))
    text = "\n".join(comparison_lines(record["rows"], record["differing"], args.a, args.b)) + "\n"
    print(text, end="")
    if args.out:
        out = CompareDir(Path(args.out))
        out.write(record, text)
        print(f"wrote {out.text} and {out.record.name}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from mdlm_sched.config_load import load, to_yaml

    print(to_yaml(load(args.config)), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (what is wrong, and where the usage is), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from mdlm_sched.config import DataConfig, ModelConfig, RuntimeConfig
    from mdlm_sched.optimise import DEFAULT_BINS, FLOPS_CONVENTIONS
    from mdlm_sched.sampling_config import AnalysisConfig, SampleConfig, SweepConfig

    sample, analysis, sweep_defaults = SampleConfig(), AnalysisConfig(), SweepConfig()
    # No abbreviated options: with config words between options, "--no-progres" must be an error, not a guess.
    parser = _Parser(prog="mdlm-sched", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # a usage line that does not wrap
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)
    p = sub.add_parser("train", help="train an MLA-MDLM (model.arch=mdlm) or the GPT-2 judge (model.arch=gpt2)")
    p.add_argument("config", nargs="*", help=CONFIG_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    p = sub.add_parser("sample", help="sample from named MDLMs with a model schedule",
                       description="Sample with a model schedule. Schedules: a preset (all-large, all-small, "
                                   "early-small, late-small, sandwich, small-in-the-middle, alternating; "
                                   "optionally @FRACTION of light steps, default 0.25), segments such as "
                                   "L125,H750,L125 (H = heaviest model, L = lightest, or model names), or "
                                   "t-thresholds such as t:L>0.875,H>0.125,L.")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a model by name: its folder, its training run folder, or hf:REPO[@REVISION] of such a folder "
                        "(repeat for each model)")
    p.add_argument("--schedule", default=sample.schedule, help="preset[@fraction], segments or t:thresholds")
    p.add_argument("--steps", type=int, default=sample.steps, help=f"denoising steps T (default {sample.steps})")
    p.add_argument("--num-samples", type=int, default=sample.num_samples)
    p.add_argument("--batch-size", type=int, default=sample.batch_size, help="sequences per sampler call")
    p.add_argument("--seed", type=int, default=sample.seed)
    p.add_argument("--top-p", type=float, default=sample.top_p, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat; cycled over samples)")
    p.add_argument("--prompts-file", help='JSON lines of {"text": ...} or {"token_ids": [...]}')
    p.add_argument("--no-cache", action="store_true", help="run the network on every sequence at every step")
    p.add_argument("--no-noise-removal", action="store_true", help="leave masks left after the last step")
    p.add_argument("--latent-cache", action="store_true", help="reuse MLA's latents across steps (docs/sampling.md)")
    p.add_argument("--latent-refresh-every", type=int, default=sample.latent_refresh_every, metavar="R",
                   help="with --latent-cache: recompute a whole sequence every R steps (1 = exact, 0 = never)")
    p.add_argument("--latent-refresh-share", type=float, default=sample.latent_refresh_share, metavar="S",
                   help="with --latent-cache: recompute a whole sequence once more than S of it changed since cached")
    add_sampling_run_args(p, sample.out_dir)
    p.set_defaults(func=_sample)
    p = sub.add_parser("analyze", help="per-step loss and KL between models on the sampler's time grid")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a model by name (at least two; the heaviest is the reference)")
    p.add_argument("--steps", type=int, default=analysis.steps, help="T of the sampler whose grid is analysed")
    p.add_argument("--grid", type=int, default=analysis.grid, help="steps evaluated, evenly spaced over the T steps")
    p.add_argument("--data", default=analysis.data, help="validation source (masked states)")
    p.add_argument("--num-blocks", type=int, default=analysis.num_blocks,
                   help="validation blocks masked at every grid step")
    p.add_argument("--trajectory-samples", type=int, default=analysis.trajectory_samples,
                   help="all-heavy samples whose states are analysed too (0 = none)")
    p.add_argument("--batch-size", type=int, default=analysis.batch_size)
    p.add_argument("--seed", type=int, default=analysis.seed)
    p.add_argument("--shade", action="append", default=[], metavar="SCHEDULE",
                   help="a schedule whose light steps the figures show (repeat; default: the four placements)")
    p.add_argument("--cache-dir", default=analysis.cache_dir, help="tokenised data cache")
    add_sampling_run_args(p, "runs/analysis")
    p.set_defaults(func=_analyze)
    p = sub.add_parser("sweep", help="sample, count and judge many schedules; resumable")
    p.add_argument("config", nargs="+", help="sweep YAML files and a.b=value overrides, in order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("pipeline", help="one experiment end to end: train, analyse, sweep, report; resumable")
    p.add_argument("config", nargs="+", help="experiment YAML files (configs/experiment/) and a.b=value overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_pipeline)
    p = sub.add_parser("optimise", help="the schedule predicted best for a FLOPs saving or a gen-PPL tolerance",
                       description="Fit an additive cost model to a per-step analysis (calibrated on a sweep's "
                                   "measured schedules when given) and solve exactly for the schedule predicted "
                                   "best at each FLOPs saving or gen-PPL tolerance.")
    p.add_argument("--analysis", required=True, help="out folder of mdlm-sched analyze (per_step.csv and .json)")
    p.add_argument("--sweep", help="out folder of a sweep of the same models: calibrates the cost model")
    p.add_argument("--saving", action="append", type=float, default=[],
                   help="FLOPs saving against all-heavy to reach, e.g. 0.25 (repeat)")
    p.add_argument("--tolerance", action="append", type=float, default=[],
                   help="largest predicted relative gen-PPL increase, e.g. 0.05 (repeat)")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS,
                   help=f"step bins the schedule is made of (default {DEFAULT_BINS})")
    p.add_argument("--flops", default=FLOPS_CONVENTIONS[0], choices=FLOPS_CONVENTIONS,
                   help="blocks-only: every step one forward (the seed paper's); executed: this sampler's cache")
    p.add_argument("--model", action="append", default=[], help="restrict to these models of the analysis (repeat)")
    p.add_argument("--steps", type=int, default=None, help="T (default: the analysis's)")
    p.add_argument("--out", default="runs/optimise", help="output folder for optimise.json")
    p.set_defaults(func=_optimise)
    p = sub.add_parser("import-mdlm", help="convert an MDLM DiT checkpoint (HF folder, Lightning .ckpt, hf:REPO) "
                                           "into a model folder of this project")
    p.add_argument("source", help="a Hugging Face folder (mdlm-owt layout), a Lightning .ckpt, or hf:REPO[@REVISION]")
    p.add_argument("out", help="new folder for the model (config.json, model.safetensors, tokenizer)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with (a folder or hub name)")
    p.add_argument("--no-ema", action="store_true", help="a Lightning checkpoint's trained weights, not its EMA")
    p.set_defaults(func=_import_mdlm)
    model_defaults, data_defaults, runtime_defaults = ModelConfig(), DataConfig(), RuntimeConfig()
    p = sub.add_parser("convert-mla", help="convert a multi-head / grouped-query attention MDLM to MLA (TransMLA)",
                       description="TransMLA for MDLMs: RoRoPE, a shared rotary key on the pairs of largest "
                                   "||q|| ||k||, and a balanced PCA of the remaining keys and the values into the "
                                   "latent. Exact at --kv-lora-rank 2*G*hd with --qk-rope-head-dim G*hd (G key/value "
                                   "heads of width hd); lossy below, until fine-tuned (train.init).")
    p.add_argument("source", help="a model folder of this project with attention=mha (e.g. from import-mdlm)")
    p.add_argument("out", help="new folder for the converted model")
    p.add_argument("--kv-lora-rank", type=int, default=model_defaults.kv_lora_rank,
                   help=f"width of the key/value latent (default {model_defaults.kv_lora_rank})")
    p.add_argument("--qk-rope-head-dim", type=int, default=model_defaults.qk_rope_head_dim,
                   help=f"width of the shared rotary key, even (default {model_defaults.qk_rope_head_dim})")
    p.add_argument("--calibration", help="data source (a local file or a hub dataset) whose noised blocks give the "
                                         "attention inputs' statistics; default: none (the weights alone)")
    p.add_argument("--calibration-blocks", type=int, default=64, help="blocks of calibration data used (default 64)")
    p.add_argument("--save-every", type=float, metavar="SECONDS",
                   help="seconds between saves of the calibration's progress to OUT.unfinished, from which a killed "
                        "run resumes (default: convert.SAVE_EVERY_S, a minute)")
    p.add_argument("--cache-dir", default=data_defaults.cache_dir, help="tokenised data cache")
    p.add_argument("--device", default=runtime_defaults.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=runtime_defaults.precision, help="auto (bf16 on cuda) | bf16 | fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_convert_mla)
    p = sub.add_parser("report", help="figures and a Markdown report from sweep/analysis/optimise/compare folders")
    p.add_argument("folders", nargs="+", help="out folders of mdlm-sched sweep, analyze, optimise and/or compare")
    p.add_argument("--out", default="runs/report", help="folder for report.md and the figures")
    p.add_argument("--title", default="Model scheduling report")
    p.add_argument("--experiment", help="pipeline.json of a `mdlm-sched pipeline` run: adds command, device, training")
    p.set_defaults(func=_report)
    p = sub.add_parser("mauve", help="MAUVE of a sweep's points from the judge features it saved (save_features)")
    p.add_argument("sweep", help="out folder of mdlm-sched sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=sweep_defaults.mauve_seeds,
                   help=f"k-means seeds, whose spread MAUVE's s.d. is (default {sweep_defaults.mauve_seeds})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_mauve)
    p = sub.add_parser("compare", help="two sweeps of the same schedules, paired point by point (e.g. a sampler "
                                       "setting against exact sampling)")
    p.add_argument("a", help="out folder of the baseline sweep (A)")
    p.add_argument("b", help="out folder of the sweep compared with it (B)")
    p.add_argument("--out", help="also write compare.md and compare.json here")
    p.set_defaults(func=_compare)
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("config", nargs="*", help=CONFIG_HELP)
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "--no-progress" in (sys.argv[1:] if argv is None else argv):
        # Every tqdm bar, transformers' and huggingface_hub's included; tqdm reads this when it is first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    if words and words[0].startswith("-") and words[0] not in ("-h", "--help"):  # else: "COMMAND is required"
        parser.error(f"unrecognized option {words[0]}: options follow a command (mdlm-sched COMMAND --help)")
    args, extra = parser.parse_known_args(argv)
    if extra:  # config words after an option (train model=tiny --no-progress train.steps=2) come back in order
        if not hasattr(args, "config") or any(word.startswith("-") for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.config += extra
    # The project's own progress at INFO; libraries (matplotlib's font cache, fontTools' PDF subsetting) only warn.
    # Under torchrun, the other ranks log only warnings and errors: rank 0 speaks for the run.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mdlm_sched").setLevel(logging.INFO if launch_context().is_main else logging.WARNING)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"mdlm-sched: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdlm-sched: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        print(f"mdlm-sched: training stopped: {exc}", file=sys.stderr)
        return 1
