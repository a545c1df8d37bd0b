"""Typed run configuration: the dataclass schemas of a run's sections and their flags (no heavy imports).

config_load builds a RunConfig from presets, YAML files and overrides; config_checks checks its values.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass

from mdlm_sched.architecture import Architecture

ARCHS = ("mdlm", "gpt2")
LR_SCHEDULES = ("constant", "cosine")
# The denoiser's head + cross-entropy in training: PyTorch, or a fused kernel library (models/head_loss.py)
LOSS_KERNELS = ("torch", "liger", "cce")
# torch.compile modes of the training step (runtime.compile_mode)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

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
    loss_kernel: str = "torch"  # torch | liger | cce (optional extras, CUDA only): the denoiser's head + loss


@dataclass
class RuntimeConfig:
    """Where and how to run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    compile: bool = False
    # torch.compile's mode for the training step (with compile): default, or max-autotune-no-cudagraphs, which tunes
    # Triton matrix-product templates per shape and can fuse element-wise work into them (minutes more compilation,
    # other rounding). Sampling always compiles in the default mode, with cudagraph.py's own CUDA graphs.
    compile_mode: str = "default"
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
