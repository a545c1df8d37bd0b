"""Typed settings of the commands that sample trained denoisers: sample, analyze, sweep.

`SamplerSettings` is what the denoising loop itself takes, declared once: `SamplingConfig`, the one
section every sampling command shares (models, length, runtime), extends it, and `SampleConfig` and
`SweepConfig` extend that, so that a YAML file or a command line spells a setting the same way in all
of them. The settings are checked whenever one of these is made (a config file is made into one when it
is loaded), before any model is loaded.

Fields whose metadata carries SHARED are the settings every point of one sweep results folder
must share (`shared_settings`); a rerun with other values is refused rather than mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from mdlm_sched.artifacts import SampleRun
from mdlm_sched.config import MAX_SEED, RuntimeConfig
from mdlm_sched.config_load import load_structured
from mdlm_sched.config_checks import require, validate_runtime
from mdlm_sched.data import check_source
from mdlm_sched.errors import ConfigError, DataError, SamplingError
from mdlm_sched.fileio import check_writable
from mdlm_sched.schedule import DEFAULT_T_MIN, PAPER_PLACEMENTS, check_steps, grid_steps

SHARED = {"shared": True}
# Every sample is held in memory until it is written: a typo must not become an allocation that cannot succeed.
MAX_SAMPLES = 10_000_000
# Which judged tokens gen PPL counts (metrics.py defines each; "mdlm" is the field's).
TOKEN_RULES = ("mdlm", "first-eos", "every-token")


@dataclass
class SamplerSettings:
    """How the denoising loop samples (sampler.sample); checked when made."""

    top_p: float = field(default=1.0, metadata=SHARED)  # nucleus sampling; 1 = the full distribution
    cache: bool = field(default=True, metadata=SHARED)  # run the network only on sequences that unmask at the step
    noise_removal: bool = field(default=True, metadata=SHARED)  # argmax-fill the masks left after the last step
    t_min: float = field(default=DEFAULT_T_MIN, metadata=SHARED)  # the last step ends at t_min (0 = all unmasked)
    # The latent cache (latent_cache.py; MLA models): keep each model's latents across steps and recompute only
    # the positions that unmask or changed. Approximate; off = exact sampling.
    latent_cache: bool = field(default=False, metadata=SHARED)
    latent_refresh_every: int = field(default=8, metadata=SHARED)  # recompute a whole sequence every R steps (0: no)
    latent_refresh_share: float = field(default=0.5, metadata=SHARED)  # ... or once more of it changed than this

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p={self.top_p} must be in (0, 1]; use 1 for the full distribution")
        if not 0.0 <= self.t_min < 1.0:
            raise SamplingError(f"t_min={self.t_min} must be in [0, 1)")
        if self.latent_cache and not self.cache:
            raise SamplingError("latent_cache: true needs cache: true (the latent cache runs only the sequences "
                                "that unmask at a step)")
        if not (isinstance(self.latent_refresh_every, int) and self.latent_refresh_every >= 0):
            raise SamplingError(f"latent_refresh_every={self.latent_refresh_every} must be a whole number >= 0 "
                                f"(1: refresh at every step, exact; 0: only on a model change or the share)")
        if not 0.0 <= self.latent_refresh_share <= 1.0:
            raise SamplingError(f"latent_refresh_share={self.latent_refresh_share} must be in [0, 1] (the share of "
                                f"a sequence's positions changed since cached that triggers a full recompute)")

    def sampler_settings(self) -> SamplerSettings:
        """The sampler's own settings, as a SamplerSettings (checked: bad values raise SamplingError)."""
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in fields(SamplerSettings)})


@dataclass
class SamplingConfig(SamplerSettings):
    """What every command that loads denoisers and samples them shares: the sampler's settings and these."""

    models: dict[str, str] = field(default_factory=dict, metadata=SHARED)  # name -> model folder or run folder
    seq_len: int | None = field(default=None, metadata=SHARED)  # None = the models' max_position_embeddings
    batch_size: int = field(default=16, metadata=SHARED)  # sequences per sampler call; batch k draws from (seed, k)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class SampleConfig(SamplingConfig):
    """A sampling run (`mdlm-sched sample`): models by name, a schedule, how many samples, where to."""

    schedule: str = "all-large"  # preset[@fraction] | segments (L125,H750,L125) | t:thresholds
    steps: int = 1000  # T, the denoising steps
    num_samples: int = 16
    seed: int = 0
    prompts: list[str] = field(default_factory=list)  # texts, cycled over the samples; [BOS] is put first
    prompt_token_ids: list[list[int]] = field(default_factory=list)  # raw token ids, cycled likewise
    out_dir: str = "runs/samples"


@dataclass
class AnalysisConfig:
    """What the per-step analysis evaluates (`mdlm-sched analyze`, and the pipeline's analysis stage)."""

    steps: int = 1000  # T of the sampler whose grid is analysed
    grid: int = 50  # steps evaluated, evenly spaced over 0..T-1 (<= T)
    t_min: float = DEFAULT_T_MIN
    data: str = "../shared/data/owt_val.jsonl.xz"  # validation source of the masked states
    num_blocks: int = 64  # validation blocks (masked states per grid step)
    trajectory_samples: int = 32  # all-heavy samples whose states are analysed (0 = none)
    batch_size: int = 16
    seed: int = 0
    shade: list[str] = field(default_factory=lambda: list(PAPER_PLACEMENTS))  # schedules drawn on the figures
    cache_dir: str = ".cache/mdlm_sched"


@dataclass
class SweepGroup:
    """Points of a sweep that belong together in the report (e.g. placements, a fraction curve).

    A group's schedules are `schedules`, plus `named` ones (a label for a long schedule string), plus
    placement@fraction for every placement and fraction,
    plus the 2^segments coarse-segment schedules of the seed paper's exhaustive search (segments > 0).
    step_counts, seeds and num_samples default to the sweep's.
    """

    schedules: list[str] = field(default_factory=list)
    named: dict[str, str] = field(default_factory=dict)  # label -> schedule, e.g. optimised@0.25: small:250,...
    placements: list[str] = field(default_factory=list)  # presets, e.g. sandwich
    fractions: list[float] = field(default_factory=list)  # light-step fractions for each placement
    segments: int = 0  # k > 0: every assignment of L or H to k equal segments (2^k schedules)
    step_counts: list[int] | None = None  # values of T
    seeds: list[int] | None = None
    num_samples: int | None = None


@dataclass
class ReferenceConfig:
    """The real-text reference rows: validation blocks scored exactly as samples are."""

    # name -> validation source, one row each (the first is the headline row of tables and figures); {} = none
    sources: dict[str, str] = field(default_factory=lambda: {"owt": "../shared/data/owt_val.jsonl.xz"})
    num_samples: int = 256


@dataclass
class SweepConfig(SamplingConfig):
    """`mdlm-sched sweep`: schedules x step counts x seeds, each point sampled, timed and judged."""

    batch_size: int = field(default=64, metadata=SHARED)
    judge: str = field(default="", metadata=SHARED)  # a causal LM folder (or run folder) or a hub name
    judge_batch_size: int = 16  # chunks per judge forward
    judge_context: int | None = field(default=None, metadata=SHARED)  # None = min(1024, the judge's positions)
    token_rule: str = field(default="mdlm", metadata=SHARED)  # the headline gen PPL's rule (metrics.TOKEN_RULES)
    groups: dict[str, SweepGroup] = field(default_factory=dict)
    step_counts: list[int] = field(default_factory=lambda: [1000])  # values of T
    seeds: list[int] = field(default_factory=lambda: [0])
    num_samples: int = 256
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata=SHARED)
    mauve: bool = False  # MAUVE of each point against the headline reference (needs pip install 'mdlm-sched[mauve]')
    mauve_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # k-means seeds: its spread
    save_samples: bool = True  # samples/<point>.jsonl beside the results
    # features/<point>.npy and features/reference.npy: MAUVE's judge features, for MAUVE computed later
    # elsewhere (sweep_mauve), e.g. where the GPU machine lacks mauve-text
    save_features: bool = False
    cache_dir: str = ".cache/mdlm_sched"  # tokenised reference blocks
    out_dir: str = "runs/sweep"


def shared_settings(cfg: SweepConfig) -> dict:
    """The SHARED fields of a sweep config, resolved to plain values (sweep.json's "shared")."""
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {f.name: resolved[f.name] for f in fields(SweepConfig) if f.metadata.get("shared")}


def check_seed(seed: int, what: str = "seed") -> None:
    """A seed must be in [0, MAX_SEED] (config.py says why)."""
    require(0 <= seed <= MAX_SEED, f"{what}={seed} must be in [0, {MAX_SEED}]")


def check_num_samples(n: int, what: str = "num_samples") -> None:
    """A run holds at most MAX_SAMPLES samples."""
    require(1 <= n <= MAX_SAMPLES, f"{what}={n} must be in [1, {MAX_SAMPLES:,}]; split a larger run into several "
                                   f"runs with other seeds")


def check_group_draws(seeds: list[int] | None, num_samples: int | None, what: str) -> None:
    """A group's own seeds and sample count (None = the sweep's), e.g. what=groups.placements."""
    if num_samples is not None:
        check_num_samples(num_samples, f"{what}.num_samples")
    require(seeds is None or len(seeds) > 0, f"{what}.seeds is empty; list at least one")
    for seed in seeds or []:
        check_seed(seed, f"{what}.seeds entry")


def validate_sampling(cfg: SamplingConfig) -> SamplerSettings:
    """Check the shared sampling section; return the sampler's settings (built, so checked, here)."""
    require(len(cfg.models) > 0, "no models given; name at least one, e.g. --model large=runs/large")
    require(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")
    require(cfg.seq_len is None or cfg.seq_len >= 1, f"seq_len={cfg.seq_len} must be >= 1 or null")
    validate_runtime(cfg.runtime)
    return cfg.sampler_settings()


def validate_sample(cfg: SampleConfig) -> SamplerSettings:
    """Check a SampleConfig; return the sampler's settings."""
    settings = validate_sampling(cfg)
    check_steps(cfg.steps)
    check_num_samples(cfg.num_samples)
    check_seed(cfg.seed)
    require(not (cfg.prompts and cfg.prompt_token_ids), "give prompts as texts or as token ids, not both")
    check_writable(cfg.out_dir, "out_dir")
    run = SampleRun(Path(cfg.out_dir))
    written = [p.name for p in (run.samples, run.record) if p.exists()]  # a finished run is never overwritten
    require(not written, f"out_dir={cfg.out_dir} already holds a sampling run ({', '.join(written)}); give a new "
                         f"--out, or delete that folder to sample it again")
    return settings


def validate_analysis(cfg: AnalysisConfig) -> None:
    """Check an AnalysisConfig's values (its schedules to shade are parsed once the models are known)."""
    check_steps(cfg.steps, "analysis steps")
    check_seed(cfg.seed, "analysis seed")
    grid_steps(cfg.steps, cfg.grid)
    require(0.0 <= cfg.t_min < 1.0, f"t_min={cfg.t_min} must be in [0, 1)")
    for name in ("num_blocks", "batch_size"):
        require(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1")
    require(cfg.trajectory_samples >= 0, f"trajectory_samples={cfg.trajectory_samples} must be >= 0")
    try:
        check_source(cfg.data)
    except DataError as exc:
        raise ConfigError(f"analysis data: {exc}") from exc
    check_writable(cfg.cache_dir, "analysis cache_dir")


def validate_sweep(cfg: SweepConfig) -> SamplerSettings:
    """Check a SweepConfig's values (schedules are parsed when the models are known); return the sampler's settings."""
    settings = validate_sampling(cfg)
    require(bool(cfg.judge), "sweep: no judge; set judge: to a causal LM folder or a hub name such as gpt2-large")
    require(len(cfg.groups) > 0, "sweep: no groups; list at least one under groups: with schedules: [...]")
    for name, group in cfg.groups.items():
        require(bool(group.schedules or group.named or (group.placements and group.fractions) or group.segments),
                f"groups.{name} has no schedules; give schedules, named schedules, placements with fractions, or "
                f"segments")
        require(bool(group.placements) == bool(group.fractions),
                f"groups.{name}: placements and fractions go together; give both or neither")
        require(group.segments >= 0, f"groups.{name}.segments={group.segments} must be >= 0")
        require(group.step_counts is None or len(group.step_counts) > 0,
                f"groups.{name}.step_counts is empty; list at least one step count")
        for steps in group.step_counts or []:
            check_steps(steps, f"groups.{name}.step_counts entry")
        check_group_draws(group.seeds, group.num_samples, f"groups.{name}")
    require(len(cfg.step_counts) > 0, "step_counts is empty; list at least one step count")
    for steps in cfg.step_counts:
        check_steps(steps, "step_counts entry")
    require(len(cfg.seeds) > 0, "seeds is empty; list at least one seed")
    for seed in cfg.seeds:
        check_seed(seed, "seeds entry")
    check_num_samples(cfg.num_samples)
    require(cfg.judge_batch_size >= 1, f"judge_batch_size={cfg.judge_batch_size} must be >= 1")
    require(cfg.token_rule in TOKEN_RULES, f"token_rule={cfg.token_rule!r} is unknown; use one of "
                                           f"{', '.join(TOKEN_RULES)}")
    require(not cfg.mauve or (bool(cfg.reference.sources) and len(cfg.mauve_seeds) > 0),
            "mauve: true needs a reference source (reference.sources) and at least one of mauve_seeds")
    require(not cfg.save_features or bool(cfg.reference.sources),
            "save_features: true needs a reference source (reference.sources), whose features MAUVE compares with")
    require(cfg.reference.num_samples >= 1, f"reference.num_samples={cfg.reference.num_samples} must be >= 1")
    for name, source in cfg.reference.sources.items():
        try:
            check_source(source)
        except DataError as exc:
            raise ConfigError(f"reference.sources.{name}: {exc}") from exc
    check_writable(cfg.out_dir, "out_dir")
    check_writable(cfg.cache_dir, "cache_dir")
    return settings


def load_sweep(args: list[str] | tuple[str, ...]) -> SweepConfig:
    """Build a validated SweepConfig from YAML files and key=value overrides (in order)."""
    sweep = load_structured(SweepConfig, args, "sweep file")
    validate_sweep(sweep)
    return sweep
