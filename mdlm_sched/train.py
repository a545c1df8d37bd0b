"""Training loop shared by the MDLM denoiser and the autoregressive GPT-2 judge.

One optimizer step = `train.batch_size` sequences, run as micro-batches with gradient
accumulation. Every step is a pure function of (seed, step, state): its data indices, its noise
draws and its dropout masks are seeded from (seed, step), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would have taken.

Under torchrun (`torchrun --nproc_per_node=N mdlm-sched train ...`) each of the N ranks is a DDP
replica. The global batch stays `train.batch_size` whatever N: every rank builds the step's whole
batch and its noise draws (cheap: index gathers and mask draws) and runs its own contiguous
batch_size / N rows of it as micro-batches, so the set of (sequence, t, mask) of a step does not
depend on N, and neither does the averaged gradient. Dropout differs by rank (rank 0 draws what a
single process would). Rank 0 alone validates, logs and writes checkpoints, which hold the plain
model's weights: a run resumes with any N, one process included.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mdlm_sched.checkpoint import MODEL_DIR, atomic_write_text, export_model, load_latest_state, save_state
from mdlm_sched.config import RunConfig, TrainConfig, to_yaml
from mdlm_sched.data import load_sources, load_tokenizer, mask_token_id, tokenizer_hash
from mdlm_sched.diffusion import corrupt, nelbo_terms, sample_times
from mdlm_sched.distributed import ONE_PROCESS, DistContext, distributed
from mdlm_sched.errors import CheckpointError, ConfigError, NonFiniteLossError
from mdlm_sched.models import build_model
from mdlm_sched.noise import LogLinearNoise, make_noise
from mdlm_sched.runtime import (STREAM_DROPOUT, STREAM_INIT, STREAM_NOISE, STREAM_VAL, autocast, autocast_dtype,
                                configure_backends, rank_seed, step_generator, step_seed)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Objectives: what a batch of clean blocks x0 [B, L] costs a model.


class Objective(Protocol):
    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs for one optimizer step's sequences (all tensors have batch dim first)."""

    def loss(self, model: torch.nn.Module, *inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Mean loss per token of one micro-batch (float32 scalar)."""


@dataclass(frozen=True)
class MDLMObjective:
    """Continuous-time NELBO of the masked diffusion model; exp(mean) bounds the perplexity."""

    noise: LogLinearNoise
    mask_id: int
    sampling_eps: float

    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        # One low-discrepancy set of times over the whole step's batch, then masks at those times.
        t = sample_times(x0.shape[0], generator, self.sampling_eps, device=x0.device)
        return x0, corrupt(x0, t, self.noise, self.mask_id, generator), t

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
             training: bool) -> torch.Tensor:
        # Training keeps the output head in the autocast dtype for speed; evaluation uses float32.
        logits = model(x_t, sigma=self.noise.sigma(t), head_fp32=not training)
        return nelbo_terms(logits, x0, x_t, t, self.noise, self.mask_id).mean()


@dataclass(frozen=True)
class AutoregressiveObjective:
    """Next-token cross-entropy of a causal LM (the judge); exp(mean) is its perplexity."""

    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (x0,)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, *, training: bool) -> torch.Tensor:
        logits = model(input_ids=x0).logits  # [B, L, V]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())


def make_objective(cfg: RunConfig, mask_id: int) -> Objective:
    """The objective for cfg.model.arch."""
    if cfg.model.arch == "gpt2":
        return AutoregressiveObjective()
    return MDLMObjective(make_noise(cfg.noise.schedule, cfg.noise.eps), mask_id, cfg.noise.sampling_eps)


# ---------------------------------------------------------------------------------------------
# Data order and EMA.


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> np.ndarray:
    """Indices of the blocks of one step: a fresh permutation of the data per epoch, read in order."""
    k = step * batch_size + np.arange(batch_size)
    epochs, pos = np.divmod(k, n_blocks)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, int(epoch), n_blocks)[pos[sel]]
    return out


def learning_rate(tc: TrainConfig, step: int) -> float:
    """lr of optimizer step `step` (0-based): linear warm-up, then constant (MDLM) or cosine to lr * lr_final."""
    scale = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
    if tc.lr_schedule == "cosine" and step >= tc.warmup_steps:
        done = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - 1 - tc.warmup_steps))
        scale = tc.lr_final + (1 - tc.lr_final) * 0.5 * (1 + math.cos(math.pi * done))
    return tc.lr * scale


class EMA:
    """Exponential moving average of the parameters, with decay warm-up min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        decay = min(self.decay, (1 + num_updates) / (10 + num_updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in model.parameters()], 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for validation and export)."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    step: int
    last_loss: float | None
    val: dict[str, float] = field(default_factory=dict)  # "<source>" -> perplexity (bound for an mdlm)


class JsonlLog:
    """Append-only JSONL log; on resume, entries past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, keep_through_step: int) -> None:
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= keep_through_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def write(self, **record: object) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, blocks: np.ndarray, micro_batch_size: int,
             device: torch.device, amp: torch.dtype | None, seed: int) -> float:
    """Mean loss per token over blocks [N, L] (the same noise draws at every call for a given seed)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(blocks), micro_batch_size):
        x0 = torch.from_numpy(blocks[start:start + micro_batch_size].astype(np.int64)).to(device)
        with autocast(device, amp):
            loss = objective.loss(model, *objective.prepare(x0, generator), training=False)
        total += float(loss) * len(x0)  # every block has the same length, so weight by blocks
        count += len(x0)
    model.train(was_training)
    return total / count


def train_step(model: torch.nn.Module, step_loss: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
               inputs: tuple[torch.Tensor, ...], accum: int, device: torch.device, amp: torch.dtype | None,
               grad_clip: float, ctx: DistContext = ONE_PROCESS) -> tuple[float, torch.Tensor | None]:
    """One optimizer step over inputs split into `accum` micro-batches: (mean loss, grad norm before clipping).

    Under torchrun, model is the DDP wrapper and inputs are this rank's rows: DDP averages the ranks' gradients,
    each the mean over the rank's rows, so the gradient is the mean over the global batch, as in one process.
    The loss returned is the global mean too, the same on every rank.

    The grad norm stays a device tensor: reading it costs a host sync, so the caller does that only to log it.

    A non-finite loss skips the optimizer step (gradients are dropped) and is returned for the caller to stop on.
    """
    total = torch.zeros((), device=device)
    for i, micro in enumerate(zip(*(x.chunk(accum) for x in inputs))):
        # DDP all-reduces gradients during a backward pass; only the last micro-batch's needs to.
        accumulate_only = isinstance(model, DDP) and i < accum - 1
        with model.no_sync() if accumulate_only else nullcontext():
            with autocast(device, amp):
                loss = step_loss(model, *micro, training=True) / accum
            loss.backward()
        total += loss.detach()
    total = ctx.mean(total)  # the global mean: every rank takes the same decision below
    # Clip before the host sync so that the GPU has the norm kernels queued while the CPU waits;
    # clipping non-finite gradients is harmless, since they are dropped below.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    loss_value = float(total)  # one host sync per step: the finite-loss guard needs it
    if math.isfinite(loss_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def _check_resume_compatible(cfg: RunConfig, out_dir: Path) -> None:
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = OmegaConf.load(saved_path)
    current = OmegaConf.structured(cfg)
    for key in ("model", "noise", "data.train", "data.val", "data.tokenizer", "data.seq_len", "data.text_field",
                "data.max_docs", "train.batch_size", "train.seed"):
        a, b = OmegaConf.select(saved, key), OmegaConf.select(current, key)
        if a != b:
            raise CheckpointError(f"{out_dir} holds a run with a different '{key}'; resume with the same "
                                  f"settings or choose a new train.out_dir")


def rank_accumulation(tc: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank and optimizer step: the global batch split over the ranks, then into micro-batches."""
    split = world_size * tc.micro_batch_size
    if tc.batch_size % split:
        raise ConfigError(f"train.batch_size={tc.batch_size} does not split into {world_size} ranks x "
                          f"train.micro_batch_size={tc.micro_batch_size}; make train.batch_size a multiple of {split} "
                          f"or change train.micro_batch_size")
    return tc.batch_size // split


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    """Train cfg.model on cfg.data; resume from cfg.train.out_dir if it holds a checkpoint.

    Under torchrun every rank runs this and gets the result (validation results on rank 0 only).
    """
    with distributed(cfg.runtime) as (ctx, device):
        return _train(cfg, ctx, device, progress and ctx.is_main)


def _train(cfg: RunConfig, ctx: DistContext, device: torch.device, progress: bool) -> TrainResult:
    tc = cfg.train
    accum = rank_accumulation(tc, ctx.world_size)  # before any work: a batch that does not split fails fast
    out_dir = Path(tc.out_dir)
    configure_backends(device)
    amp = autocast_dtype(cfg.runtime, device)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tok_hash = tokenizer_hash(tokenizer)
    torch.manual_seed(step_seed(tc.seed, 0, STREAM_INIT))  # initial weights
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tok_hash).to(device)
    objective = make_objective(cfg, mask_id=mask_token_id(tokenizer))
    data_args = dict(tokenizer=tokenizer, seq_len=cfg.data.seq_len, cache_dir=cfg.data.cache_dir,
                     text_field=cfg.data.text_field, max_docs=cfg.data.max_docs)
    max_val = tc.val_batches * tc.micro_batch_size
    with ctx.main_first():  # rank 0 tokenises and caches; the other ranks then read its cache
        train_blocks = load_sources(cfg.data.train, **data_args)
        val_blocks = {name: load_sources([src], **data_args)[:max_val] for name, src in cfg.data.val.items()}
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters; %d train blocks of %d tokens; %d process(es), %d micro-batches of %d "
             "sequences each per step", cfg.model.arch, n_params / 1e6, len(train_blocks), cfg.data.seq_len,
             ctx.world_size, accum, tc.micro_batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                  weight_decay=tc.weight_decay, fused=device.type == "cuda")
    ema = EMA(model, tc.ema) if tc.ema > 0 else None

    start = 0
    state = load_latest_state(out_dir)
    if state is not None:
        _check_resume_compatible(cfg, out_dir)
        tensors, opt_state, meta = state
        with torch.no_grad():  # by parameter name: tied weights (the GPT-2 head) are stored once
            for name, param in model.named_parameters():
                param.copy_(tensors["model"][name])
        optimizer.load_state_dict(opt_state)
        if ema is not None:
            ema.load_state_dict(tensors["ema"])
        start = meta["step"]
        log.info("resumed from %s at step %d", out_dir / "checkpoints", start)
    jlog = None  # rank 0 alone writes the run folder
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        jlog = JsonlLog(out_dir / "log.jsonl", keep_through_step=start)
        # What the run sees, for reports (tokens seen, passes over the data): written at every (re)start.
        jlog.write(step=start, event="resume" if start > 0 else "start", world_size=ctx.world_size,
                   train_blocks=len(train_blocks), train_tokens=len(train_blocks) * cfg.data.seq_len,
                   parameters=n_params)
    # DDP averages the gradients over the ranks; `model` stays the plain module (EMA, validation, checkpoints).
    replica = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.world_size > 1 \
        else model

    step_loss = torch.compile(objective.loss) if cfg.runtime.compile else objective.loss
    tokens_per_step = tc.batch_size * cfg.data.seq_len
    result = TrainResult(out_dir, out_dir / MODEL_DIR, start, None)

    def validate(step: int) -> None:
        with ema.applied(model) if ema is not None else nullcontext():
            for i, (name, blocks) in enumerate(val_blocks.items()):
                nelbo = evaluate(model, objective, blocks, tc.micro_batch_size, device, amp,
                                 seed=step_seed(tc.seed, i, STREAM_VAL))  # the same draws at every validation
                result.val[name] = math.exp(nelbo)
                jlog.write(step=step, split=f"val/{name}", loss=nelbo, ppl=math.exp(nelbo), blocks=len(blocks))
                kind = "perplexity bound" if cfg.model.arch == "mdlm" else "perplexity"
                log.info("step %d val/%s: loss %.4f, %s %.2f (%d blocks)", step, name, nelbo, kind,
                         math.exp(nelbo), len(blocks))

    def checkpoint(step: int) -> None:
        tensors = {"model": dict(model.named_parameters())}
        if ema is not None:
            tensors["ema"] = ema.state_dict()
        save_state(out_dir, step, tensors, optimizer.state_dict(),
                   {"tokens_seen": step * tokens_per_step, "world_size": ctx.world_size}, keep=tc.keep_checkpoints)
        with ema.applied(model) if ema is not None else nullcontext():
            export_model(model, tokenizer, result.model_dir)

    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not progress, desc="train")
    t_last, tokens_since = time.perf_counter(), 0
    for step in bar:
        lr = learning_rate(tc, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, tc.batch_size, len(train_blocks), tc.seed)
        x0 = torch.from_numpy(train_blocks[idx].astype(np.int64)).to(device, non_blocking=True)
        # The draws of the whole global batch, the same on every rank; then this rank's rows of it.
        inputs = objective.prepare(x0, step_generator(tc.seed, step, STREAM_NOISE, device))
        inputs = tuple(x[ctx.rows(tc.batch_size)] for x in inputs)
        torch.manual_seed(rank_seed(step_seed(tc.seed, step, STREAM_DROPOUT), ctx.rank))  # this step's dropout

        loss_value, grad_norm = train_step(replica, step_loss, optimizer, inputs, accum, device, amp, tc.grad_clip,
                                           ctx)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"loss is {loss_value} at step {step}; stopped before the optimizer step "
                                     f"(last checkpoint in {out_dir / 'checkpoints'}); "
                                     f"lower train.lr or check the data")
        if ema is not None:
            ema.update(model, step)
        done = step + 1
        tokens_since += tokens_per_step
        result.step, result.last_loss = done, loss_value

        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            if jlog is not None:
                jlog.write(step=done, loss=loss_value, lr=lr,
                           grad_norm=None if grad_norm is None else float(grad_norm),
                           tokens_seen=done * tokens_per_step, epochs=done * tc.batch_size / len(train_blocks),
                           tokens_per_s=tokens_since / (now - t_last))
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_since / (now - t_last):.0f}")
            t_last, tokens_since = now, 0
        validating = done % tc.val_every == 0 or done == tc.steps
        saving = done % tc.ckpt_every == 0 or done == tc.steps
        if validating and ctx.is_main:
            validate(done)
        if saving and ctx.is_main:
            checkpoint(done)
        if validating or saving:
            ctx.barrier()  # the other ranks wait for rank 0's validation and checkpoint
            t_last, tokens_since = time.perf_counter(), 0  # keep their time out of tokens/s
    bar.close()
    if jlog is not None:
        jlog.close()
    if start >= tc.steps:
        log.info("%s is already trained to step %d (train.steps=%d); nothing to do", out_dir, start, tc.steps)
    return result
