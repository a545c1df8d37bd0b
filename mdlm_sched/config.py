"""Typed run configuration: dataclass schemas, OmegaConf presets from configs/, key=value overrides.

`load(args)` takes command-line words in order:
  - `section=name` replaces that section with configs/<section>/<name>.yaml over the section's
    defaults (e.g. `model=large`);
  - `a.b=value` sets one field (OmegaConf dotlist syntax, e.g. `train.steps=200`);
  - any other word is a YAML file merged over the whole config.
A mapping given by a preset or a file (e.g. data.val) replaces the one before it; a dotlist
override such as `data.val.news=...` adds one entry.
Later words win. Unknown keys and impossible values raise ConfigError with a one-line message that
names the field and the fix. Interpolations such as ${data.root} are resolved; nothing is evaluated.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdlm_sched.architecture import Architecture
from mdlm_sched.data import check_source
from mdlm_sched.errors import ConfigError, DataError
from mdlm_sched.fileio import check_writable
from mdlm_sched.noise import NOISE_SCHEDULES

ARCHS = ("mdlm", "gpt2")
LR_SCHEDULES = ("constant", "cosine")
T = TypeVar("T")

# Seeds are non-negative and below 2^31: every random stream is seeded from (seed, step, stream)
# (runtime.step_seed), which must stay inside the 64-bit range torch generators take.
MAX_SEED = 2**31 - 1
# The most tokens one optimizer step may build on the device (batch_size x seq_len int64 ids: 16 GiB).
MAX_STEP_TOKENS = 2**31

# Field metadata flags. RESUME: a training run resumes only with the same value (train.py).
RESUME = {"resume": True}


def flagged_fields(schema: type, flag: str, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of dataclass `schema` whose metadata sets `flag`, nested sections included.

    A flagged section counts as a whole; an unflagged section is searched field by field.
    """
    out = []
    for f in fields(schema):
        path = f"{prefix}{f.name}"
        if f.metadata.get(flag):
            out.append(path)
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out += flagged_fields(f.default_factory, flag, f"{path}.")
    return out


@dataclass
class ModelConfig(Architecture):
    """Architecture of the model to train: a denoiser ("mdlm", its fields in architecture.Architecture) or the
    GPT-2 judge ("gpt2", which reads the width, depth, heads and dropout)."""

    arch: str = "mdlm"
    mlp_ratio: int = 4
    max_seq_len: int = 1024  # positions the model supports; data.seq_len must not exceed it
    vocab_size: int | None = None  # None = from the tokenizer (+1 for [MASK] in an mdlm)


@dataclass
class NoiseConfig:
    """Forward process (REFERENCE.md section 2)."""

    schedule: str = "loglinear"
    eps: float = 1e-3
    sampling_eps: float = 1e-3  # smallest t drawn for the training loss


@dataclass
class DataConfig:
    """Text sources, tokenizer and wrapping. A source is a local file/glob or `hf:NAME[#train|#val]`."""

    root: str = "../shared/data"
    train: list[str] = field(default_factory=lambda: ["${data.root}/owt_train.jsonl.xz"], metadata=RESUME)
    # name -> source; every source is validated and logged on its own, the first is the headline
    val: dict[str, str] = field(default_factory=lambda: {"owt": "${data.root}/owt_val.jsonl.xz"}, metadata=RESUME)
    tokenizer: str = field(default="${data.root}/gpt2-tokenizer", metadata=RESUME)
    seq_len: int = field(default=1024, metadata=RESUME)
    text_field: str = field(default="text", metadata=RESUME)
    max_docs: int | None = field(default=None, metadata=RESUME)  # per source; None = all documents
    cache_dir: str = ".cache/mdlm_sched"


@dataclass
class TrainConfig:
    """Optimisation (MDLM recipe defaults), logging, validation and checkpoints."""

    out_dir: str = "runs/default"
    steps: int = 1000
    # A model folder (or training run folder) of a denoiser whose architecture and weights start the run: fine-tuning
    # (e.g. of a model made by convert-mla). The model section is then not used. None = a new model from `model`.
    init: str | None = field(default=None, metadata=RESUME)
    batch_size: int = field(default=512, metadata=RESUME)  # global sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward; the rest is gradient accumulation
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    lr_schedule: str = "constant"  # after warm-up: constant (MDLM) | cosine (down to lr * lr_final at train.steps)
    lr_final: float = 0.1  # cosine only: the last step's lr as a fraction of train.lr
    grad_clip: float = 1.0  # 0 = off
    ema: float = 0.9999  # 0 = off
    seed: int = field(default=0, metadata=RESUME)
    log_every: int = 10
    val_every: int = 500
    val_batches: int = 8  # micro-batches per validation source
    ckpt_every: int = 500
    keep_checkpoints: int = 2


@dataclass
class RuntimeConfig:
    """Where and how to run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    compile: bool = False
    # Network calls of at most this many sequences replay captured CUDA graphs on a GPU (0 = off): at small
    # batches the launches, not the arithmetic, take the time.
    cuda_graph_rows: int = 16


@dataclass
class RunConfig:
    """A training run: the model, the forward process, the data, the optimisation and where it runs."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata=RESUME)
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata=RESUME)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


SECTIONS = tuple(f.name for f in fields(RunConfig))


def configs_dir() -> Path:
    """The presets folder: $MDLM_SCHED_CONFIGS, else configs/ of the checkout this package is in."""
    return Path(os.environ.get("MDLM_SCHED_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {path}; check the name (presets live in {configs_dir()})")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise ConfigError(f"{what}: cannot parse {path}: {str(exc).splitlines()[0]}; fix the YAML") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what}: {path} holds a YAML list, not a mapping of settings; write it as key: value "
                          f"lines (e.g. train: {{steps: 100}})")
    return loaded


def _override(cfg: Any, arg: str) -> Any:
    """cfg with one key=value override merged in; a value YAML cannot parse is a ConfigError."""
    try:
        dotlist = OmegaConf.from_dotlist([arg])
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"override {arg!r} is not valid YAML ({problem}); quote a value that holds commas, "
                          f"brackets or ${{...}}, or put it in a YAML file") from exc
    return OmegaConf.merge(cfg, dotlist)


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key '{key}'; check the spelling against the dataclasses in mdlm_sched/config.py"
    return f"bad value for '{key}': {msg}; give a value of the field's type"


def _merge(cfg: DictConfig, overlay: Any) -> DictConfig:
    """OmegaConf.merge, except that a mapping field (e.g. data.val) given by the overlay replaces the old one."""
    merged = OmegaConf.merge(cfg, overlay)
    _replace_mappings(merged, overlay)
    return merged


def _replace_mappings(target: DictConfig, overlay: DictConfig) -> None:
    for key, value in overlay.items_ex(resolve=False):  # interpolations may point outside the overlay
        if isinstance(value, DictConfig):
            if OmegaConf.get_type(target, key) is dict:  # a plain mapping, not a dataclass section
                target[key] = value
            else:
                _replace_mappings(target[key], value)


def load(args: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a validated RunConfig from presets, YAML files and key=value overrides (in order)."""
    cfg = OmegaConf.structured(RunConfig)
    try:
        for arg in args:
            key, eq, value = arg.partition("=")
            if not eq:
                cfg = _merge(cfg, _read_yaml(Path(arg), "config file"))
            elif key in SECTIONS and value and "/" not in value and not value.startswith("{"):
                preset = _read_yaml(configs_dir() / key / f"{value}.yaml", f"preset {key}={value}")
                cfg[key] = _merge(OmegaConf.structured(type(getattr(RunConfig(), key))), preset)
            else:
                cfg = _override(cfg, arg)
        run: RunConfig = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc
    validate(run)
    return run


def load_structured(schema: type[T], args: list[str] | tuple[str, ...], what: str) -> T:
    """An instance of the dataclass `schema` from YAML files and key=value overrides (in order), unvalidated."""
    cfg = OmegaConf.structured(schema)
    try:
        for arg in args:
            if "=" in arg and not Path(arg).is_file():
                cfg = _override(cfg, arg)
            else:
                cfg = _merge(cfg, _read_yaml(Path(arg), what))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every result)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(path: str | Path) -> RunConfig:
    """Read a config saved by to_yaml (e.g. a training run's config.yaml)."""
    return load([str(path)])


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def _validate_model(m: ModelConfig) -> None:
    require(m.arch in ARCHS, f"model.arch={m.arch!r} is unknown; use one of {', '.join(ARCHS)}")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "max_seq_len"):
        require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    require(m.vocab_size is None or m.vocab_size >= 2, f"model.vocab_size={m.vocab_size} must be >= 2 or null")
    if m.arch == "gpt2":
        require(m.hidden_size % m.num_attention_heads == 0,
                 f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                 f"{m.num_attention_heads}; pick a head count that divides it")
        return
    require(m.cond_dim >= 1, f"model.cond_dim={m.cond_dim} must be >= 1")
    require(m.vocab_pad_multiple >= 1, f"model.vocab_pad_multiple={m.vocab_pad_multiple} must be >= 1")
    require(m.attention in ("mla", "mha"), f"model.attention={m.attention!r}; use mla or mha")
    if m.attention == "mha":
        head_dim = m.hidden_size // m.num_attention_heads
        require(m.hidden_size % m.num_attention_heads == 0 and head_dim % 2 == 0,
                f"model.hidden_size={m.hidden_size} must be model.num_attention_heads={m.num_attention_heads} "
                f"heads of an even width (rotary pairs); pick a head count that divides it")
        kv = m.num_key_value_heads or m.num_attention_heads
        require(kv >= 1 and m.num_attention_heads % kv == 0,
                f"model.num_key_value_heads={m.num_key_value_heads} must divide model.num_attention_heads="
                f"{m.num_attention_heads} (0 = as many as the query heads)")
        return
    require(1 <= m.kv_lora_rank <= m.hidden_size,
             f"model.kv_lora_rank={m.kv_lora_rank} must be in [1, model.hidden_size={m.hidden_size}]; lower it")
    require(0 <= m.q_lora_rank <= m.hidden_size,
             f"model.q_lora_rank={m.q_lora_rank} must be 0 (full-rank query) or at most "
             f"model.hidden_size={m.hidden_size}; lower it")
    require(m.qk_rope_head_dim >= 2 and m.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even and >= 2 (rotary pairs)")
    require(m.qk_nope_head_dim >= 1 and m.v_head_dim >= 1,
             "model.qk_nope_head_dim and model.v_head_dim must be >= 1")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    require(d.seq_len >= 3, f"data.seq_len={d.seq_len} must be >= 3 ([BOS] + text + [EOS])")
    require(d.seq_len <= m.max_seq_len,
             f"data.seq_len={d.seq_len} is above the model's maximum model.max_seq_len={m.max_seq_len}; "
             f"lower data.seq_len or raise model.max_seq_len")
    require(len(d.train) > 0, "data.train is empty; list at least one source")
    require(d.max_docs is None or d.max_docs >= 1, f"data.max_docs={d.max_docs} must be >= 1 or null")
    named = [(f"data.train[{i}]", s) for i, s in enumerate(d.train)] + [(f"data.val.{k}", s) for k, s in d.val.items()]
    for field_name, source in named:
        try:
            check_source(source)
        except DataError as exc:
            raise ConfigError(f"{field_name}: {exc}") from exc
    looks_local = d.tokenizer.startswith((".", "/")) or os.sep in d.tokenizer.rstrip(os.sep)
    require(not looks_local or Path(d.tokenizer).is_dir(),
             f"data.tokenizer={d.tokenizer} is not a folder; point it at a folder with tokenizer.json "
             f"(e.g. ../shared/data/gpt2-tokenizer) or a hub name such as gpt2")


def _validate_train(t: TrainConfig) -> None:
    for name in ("steps", "batch_size", "micro_batch_size", "log_every", "val_every", "val_batches",
                 "ckpt_every", "keep_checkpoints"):
        require(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be >= 1")
    require(t.batch_size % t.micro_batch_size == 0,
             f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}; "
             f"make it one")
    require(math.isfinite(t.lr) and t.lr > 0, f"train.lr={t.lr} must be a finite number > 0")
    require(0 <= t.seed <= MAX_SEED, f"train.seed={t.seed} must be in [0, {MAX_SEED}]")
    require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
             f"train.betas={t.betas} must be two numbers in [0, 1)")
    require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    require(t.lr_schedule in LR_SCHEDULES,
             f"train.lr_schedule={t.lr_schedule!r} is unknown; use one of {', '.join(LR_SCHEDULES)}")
    require(0 <= t.lr_final <= 1, f"train.lr_final={t.lr_final} must be in [0, 1] (a fraction of train.lr)")
    require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 = off)")
    require(0 <= t.ema < 1, f"train.ema={t.ema} must be in [0, 1) (0 = off)")
    require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")


def validate_runtime(r: RuntimeConfig) -> None:
    """Check device and precision; raise ConfigError naming the field and the fix."""
    require(r.precision in ("auto", "bf16", "fp32"), f"runtime.precision={r.precision!r}; use auto, bf16 or fp32")
    require(r.cuda_graph_rows >= 0, f"runtime.cuda_graph_rows={r.cuda_graph_rows} must be >= 0 (0 = no CUDA graphs)")
    require(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
             f"runtime.device={r.device!r}; use auto, cpu, cuda or cuda:N")
    require(not r.device.startswith("cuda") or torch.cuda.is_available(),
             f"runtime.device={r.device} but no CUDA GPU is visible; use runtime.device=cpu")


def validate(cfg: RunConfig) -> None:
    """Check values that types cannot; raise ConfigError naming the field and the fix."""
    _validate_model(cfg.model)
    require(cfg.noise.schedule in NOISE_SCHEDULES,
             f"noise.schedule={cfg.noise.schedule!r} is unknown; use one of {', '.join(NOISE_SCHEDULES)}")
    require(0 < cfg.noise.eps < 1, f"noise.eps={cfg.noise.eps} must be in (0, 1)")
    require(0 < cfg.noise.sampling_eps < 1, f"noise.sampling_eps={cfg.noise.sampling_eps} must be in (0, 1)")
    _validate_data(cfg.data, cfg.model)
    _validate_train(cfg.train)
    require(cfg.train.batch_size * cfg.data.seq_len <= MAX_STEP_TOKENS,
            f"train.batch_size={cfg.train.batch_size} x data.seq_len={cfg.data.seq_len} tokens per step is above "
            f"{MAX_STEP_TOKENS:,}, more than one step's batch can hold in memory; lower train.batch_size")
    require(cfg.train.init is None or cfg.model.arch == "mdlm",
             f"train.init={cfg.train.init} starts a denoiser, but model.arch={cfg.model.arch!r}; train the judge "
             f"from scratch (drop train.init)")
    validate_runtime(cfg.runtime)
    check_writable(cfg.train.out_dir, "train.out_dir")
    check_writable(cfg.data.cache_dir, "data.cache_dir")
