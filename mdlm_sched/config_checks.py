"""The checks of a RunConfig's values: each impossible value is a ConfigError of one line naming the field and
the fix. Sources are checked to exist, output folders to be writable, a CUDA device to be there."""

from __future__ import annotations

import math
import os
from pathlib import Path

from mdlm_sched.config import (ARCHS, COMPILE_MODES, LOSS_KERNELS, LR_SCHEDULES, MAX_SEED, MAX_STEP_TOKENS, DataConfig,
                               ModelConfig, RunConfig, RuntimeConfig, TrainConfig)
from mdlm_sched.data import check_source
from mdlm_sched.errors import ConfigError, DataError
from mdlm_sched.fileio import check_writable
from mdlm_sched.noise import NOISE_SCHEDULES


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


def _validate_data(d: DataConfig, m: ModelConfig, sources: bool) -> None:
    require(d.seq_len >= 3, f"data.seq_len={d.seq_len} must be >= 3 ([BOS] + text + [EOS])")
    require(d.seq_len <= m.max_seq_len,
             f"data.seq_len={d.seq_len} is above the model's maximum model.max_seq_len={m.max_seq_len}; "
             f"lower data.seq_len or raise model.max_seq_len")
    require(len(d.train) > 0, "data.train is empty; list at least one source")
    require(d.max_docs is None or d.max_docs >= 1, f"data.max_docs={d.max_docs} must be >= 1 or null")
    if not sources:
        return
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
    require(t.loss_kernel in LOSS_KERNELS,
            f"train.loss_kernel={t.loss_kernel!r} is unknown; use one of {', '.join(LOSS_KERNELS)}")


def validate_runtime(r: RuntimeConfig) -> None:
    """Check device, precision, compile mode and graph rows; raise ConfigError naming the field and the fix."""
    require(r.precision in ("auto", "bf16", "fp32"), f"runtime.precision={r.precision!r}; use auto, bf16 or fp32")
    require(r.compile_mode in COMPILE_MODES,
            f"runtime.compile_mode={r.compile_mode!r}; use {' or '.join(COMPILE_MODES)}")
    require(r.cuda_graph_rows >= 0, f"runtime.cuda_graph_rows={r.cuda_graph_rows} must be >= 0 (0 = no CUDA graphs)")
    require(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
             f"runtime.device={r.device!r}; use auto, cpu, cuda or cuda:N")
    if r.device.startswith("cuda"):
        import torch  # here, not at the top: the CLI checks its words (and answers --help) before torch loads

        require(torch.cuda.is_available(),
                f"runtime.device={r.device} but no CUDA GPU is visible; use runtime.device=cpu")


def validate(cfg: RunConfig, sources: bool = True) -> None:
    """Check values that types cannot; raise ConfigError naming the field and the fix. sources=False skips the
    check that the data files and tokenizer exist (for a caller that builds a model and reads no data)."""
    _validate_model(cfg.model)
    require(cfg.noise.schedule in NOISE_SCHEDULES,
             f"noise.schedule={cfg.noise.schedule!r} is unknown; use one of {', '.join(NOISE_SCHEDULES)}")
    require(0 < cfg.noise.eps < 1, f"noise.eps={cfg.noise.eps} must be in (0, 1)")
    require(0 < cfg.noise.sampling_eps < 1, f"noise.sampling_eps={cfg.noise.sampling_eps} must be in (0, 1)")
    _validate_data(cfg.data, cfg.model, sources)
    _validate_train(cfg.train)
    require(cfg.train.batch_size * cfg.data.seq_len <= MAX_STEP_TOKENS,
            f"train.batch_size={cfg.train.batch_size} x data.seq_len={cfg.data.seq_len} tokens per step is above "
            f"{MAX_STEP_TOKENS:,}, more than one step's batch can hold in memory; lower train.batch_size")
    require(cfg.train.init is None or cfg.model.arch == "mdlm",
             f"train.init={cfg.train.init} starts a denoiser, but model.arch={cfg.model.arch!r}; train the judge "
             f"from scratch (drop train.init)")
    require(cfg.train.loss_kernel == "torch" or cfg.model.arch == "mdlm",
            f"train.loss_kernel={cfg.train.loss_kernel} fuses the denoiser's head; the {cfg.model.arch} judge trains "
            f"with train.loss_kernel=torch")
    validate_runtime(cfg.runtime)
    check_writable(cfg.train.out_dir, "train.out_dir")
    check_writable(cfg.data.cache_dir, "data.cache_dir")
