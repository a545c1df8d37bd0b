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

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mdlm_sched.artifacts import LOG_RESUME, LOG_START, LOG_TRAIN, LOG_VAL, TrainRun
from mdlm_sched.checkpoint import export_model, load_latest_state, save_state
from mdlm_sched.config import RunConfig, TrainConfig, flagged_fields
from mdlm_sched.config_load import to_yaml
from mdlm_sched.data import load_sources, load_tokenizer, mask_token_id, tokenizer_hash
from mdlm_sched.distributed import distributed
from mdlm_sched.errors import CheckpointError, ConfigError, NonFiniteLossError
from mdlm_sched.fileio import append_jsonl, atomic_write_text, read_jsonl
from mdlm_sched.models import build_model
from mdlm_sched.models.head_loss import require_loss_kernel
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.objectives import evaluate, make_objective
from mdlm_sched.ranks import ONE_PROCESS, DistContext
from mdlm_sched.runtime import (STREAM_DROPOUT, STREAM_INIT, STREAM_NOISE, STREAM_VAL, autocast, autocast_dtype,
                                configure_backends, rank_seed, step_generator, step_seed)
from mdlm_sched.stats import mean_interval

log = logging.getLogger(__name__)

# Config fields a resumed run must share with the run it resumes (the model, the data it sees, its order).
RESUME_KEYS = tuple(flagged_fields(RunConfig, "resume"))


# ---------------------------------------------------------------------------------------------
# Data order, learning rate, EMA.


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
# One optimizer step.


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


def rank_accumulation(tc: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank and optimizer step: the global batch split over the ranks, then into micro-batches."""
    split = world_size * tc.micro_batch_size
    if tc.batch_size % split:
        raise ConfigError(f"train.batch_size={tc.batch_size} does not split into {world_size} ranks x "
                          f"train.micro_batch_size={tc.micro_batch_size}; make train.batch_size a multiple of {split} "
                          f"or change train.micro_batch_size")
    return tc.batch_size // split


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    step: int
    last_loss: float | None
    val: dict[str, float] = field(default_factory=dict)  # "<source>" -> perplexity (bound for an mdlm)


def _check_resume_compatible(cfg: RunConfig, run: TrainRun) -> None:
    if not run.config.exists():
        return
    saved = OmegaConf.load(run.config)
    current = OmegaConf.structured(cfg)
    for key in RESUME_KEYS:
        if OmegaConf.select(saved, key) != OmegaConf.select(current, key):
            raise CheckpointError(f"{run.root} holds a run with a different '{key}'; resume with the same "
                                  f"settings or choose a new train.out_dir")


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    """Train cfg.model on cfg.data; resume from cfg.train.out_dir if it holds a checkpoint.

    Under torchrun every rank runs this and gets the result (validation results on rank 0 only).
    """
    with distributed(cfg.runtime) as (ctx, device):
        trainer = _Trainer(cfg, ctx, device)
        start = trainer.resume()
        trainer.loop(start, progress and ctx.is_main)
        return trainer.result


class _Trainer:
    """One training run: the model, its optimizer and EMA, the data, the log, and the steps taken so far."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, device: torch.device) -> None:
        tc = cfg.train
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.accum = rank_accumulation(tc, ctx.world_size)  # before any work: a batch that does not split fails
        self.run = TrainRun(Path(tc.out_dir))
        # The newest checkpoint, read before any work too: a damaged one fails before the data are tokenised.
        self.state = load_latest_state(self.run, ["model", "ema"] if tc.ema > 0 else ["model"])
        if self.state is not None:
            _check_resume_compatible(cfg, self.run)
        configure_backends(device)
        self.amp = autocast_dtype(cfg.runtime, device)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        torch.manual_seed(step_seed(tc.seed, 0, STREAM_INIT))  # initial weights
        self.model = build_model(cfg, len(self.tokenizer), self.tokenizer.eos_token_id,
                                 tokenizer_hash(self.tokenizer)).to(device) if tc.init is None else \
            self._initial_model(tc.init, device)
        # Before the data are tokenised: a kernel library that is not there, or cannot take this head.
        require_loss_kernel(tc.loss_kernel, device, self.model.lm_head.bias is not None)
        self.objective = make_objective(cfg, mask_id=mask_token_id(self.tokenizer))
        data_args = dict(tokenizer=self.tokenizer, seq_len=cfg.data.seq_len, cache_dir=cfg.data.cache_dir,
                         text_field=cfg.data.text_field, max_docs=cfg.data.max_docs)
        max_val = tc.val_batches * tc.micro_batch_size
        with ctx.main_first():  # rank 0 tokenises and caches; the other ranks then read its cache
            self.train_blocks = load_sources(cfg.data.train, **data_args)
            self.val_blocks = {name: load_sources([src], **data_args)[:max_val] for name, src in cfg.data.val.items()}
        self.parameters = sum(p.numel() for p in self.model.parameters())
        log.info("model %s: %.2fM parameters; %d train blocks of %d tokens; %d process(es), %d micro-batches of %d "
                 "sequences each per step", cfg.model.arch, self.parameters / 1e6, len(self.train_blocks),
                 cfg.data.seq_len, ctx.world_size, self.accum, tc.micro_batch_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                           weight_decay=tc.weight_decay, fused=device.type == "cuda")
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        # DDP averages the gradients over the ranks; `model` stays the plain module (EMA, validation, checkpoints).
        self.replica = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if ctx.world_size > 1 else self.model
        self.step_loss = torch.compile(self.objective.loss, mode=cfg.runtime.compile_mode) if cfg.runtime.compile \
            else self.objective.loss
        self.tokens_per_step = tc.batch_size * cfg.data.seq_len
        self.result = TrainResult(self.run.root, self.run.model, 0, None)

    def _initial_model(self, path: str, device: torch.device) -> torch.nn.Module:
        """The denoiser at train.init, checked against the run's tokenizer and length, in training mode."""
        model = load_denoiser(path, device)
        c = model.config
        if c.tokenizer_hash != tokenizer_hash(self.tokenizer):
            raise ConfigError(f"train.init={path} was trained with another tokenizer than data.tokenizer="
                              f"{self.cfg.data.tokenizer}; set data.tokenizer to the model's folder")
        if self.cfg.data.seq_len > c.max_position_embeddings:
            raise ConfigError(f"data.seq_len={self.cfg.data.seq_len} exceeds the length of train.init={path} "
                              f"({c.max_position_embeddings}); set data.seq_len={c.max_position_embeddings}")
        if (c.noise_schedule, c.noise_eps) != (self.cfg.noise.schedule, self.cfg.noise.eps):
            raise ConfigError(f"train.init={path} was trained with noise {c.noise_schedule} (eps {c.noise_eps}); set "
                              f"noise.schedule={c.noise_schedule} noise.eps={c.noise_eps}")
        log.info("fine-tuning %s (%s attention); the model section of the config is not used", path, c.attention)
        return model.train()

    # ----------------------------------------------------------------------------- resume

    def resume(self) -> int:
        """Load the newest checkpoint if there is one; start (or restart) the log; return the first step to take."""
        start = 0
        if self.state is not None:
            tensors, opt_state, meta = self.state
            self.state = None  # applied below; not kept twice in memory
            with torch.no_grad():  # by parameter name: tied weights (the GPT-2 head) are stored once
                for name, param in self.model.named_parameters():
                    param.copy_(tensors["model"][name])
            self.optimizer.load_state_dict(opt_state)
            if self.ema is not None:
                self.ema.load_state_dict(tensors["ema"])
            start = meta["step"]
            log.info("resumed from %s at step %d", self.run.checkpoints, start)
        self.result.step = start
        if self.ctx.is_main:  # rank 0 alone writes the run folder
            self.run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run.config, to_yaml(self.cfg))
            # Records past the resumed step are dropped: those steps are taken again (from step 0, all of them:
            # the start record and train.init's step-0 validation are written again).
            kept = [r for r in read_jsonl(self.run.log) if r["step"] <= start] if start > 0 else []
            atomic_write_text(self.run.log, "".join(json.dumps(r) + "\n" for r in kept))
            # What the run sees, for reports (tokens seen, passes over the data): written at every (re)start.
            self._log(kind=LOG_RESUME if start > 0 else LOG_START, step=start, world_size=self.ctx.world_size,
                      train_blocks=len(self.train_blocks),
                      train_tokens=len(self.train_blocks) * self.cfg.data.seq_len, parameters=self.parameters)
        return start

    # ----------------------------------------------------------------------------- helpers

    def _log(self, **record: object) -> None:
        append_jsonl(self.run.log, record)

    def validate(self, step: int) -> None:
        """The validation loss of every source under the EMA weights (rank 0)."""
        tc = self.cfg.train
        kind = "perplexity bound" if self.cfg.model.arch == "mdlm" else "perplexity"
        with self.ema.applied(self.model) if self.ema is not None else nullcontext():
            for i, (name, blocks) in enumerate(self.val_blocks.items()):
                losses = evaluate(self.model, self.objective, blocks, tc.micro_batch_size, self.device, self.amp,
                                  seed=step_seed(tc.seed, i, STREAM_VAL))  # the same draws at every validation
                loss, low, high = mean_interval(losses)  # 95% interval over the validation blocks
                self.result.val[name] = math.exp(loss)
                # The blocks' own losses let two runs validated on the same draws be compared block by block.
                self._log(kind=LOG_VAL, step=step, source=name, loss=loss, ppl=math.exp(loss),
                          ppl_ci=[math.exp(low), math.exp(high)], blocks=len(blocks),
                          block_losses=[round(float(x), 6) for x in losses])
                log.info("step %d val/%s: loss %.4f, %s %.2f [95%% CI %.2f-%.2f over %d blocks]", step, name, loss,
                         kind, math.exp(loss), math.exp(low), math.exp(high), len(blocks))

    def checkpoint(self, step: int) -> None:
        """A resumable state, then the Hugging Face export of the EMA weights (rank 0)."""
        tensors = {"model": dict(self.model.named_parameters())}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        save_state(self.run, step, tensors, self.optimizer.state_dict(),
                   {"tokens_seen": step * self.tokens_per_step, "world_size": self.ctx.world_size},
                   keep=self.cfg.train.keep_checkpoints)
        with self.ema.applied(self.model) if self.ema is not None else nullcontext():
            export_model(self.model, self.tokenizer, self.run.model)

    # ----------------------------------------------------------------------------- the loop

    def loop(self, start: int, progress: bool) -> None:
        """Take the steps from `start` to train.steps, logging, validating and saving on schedule."""
        tc, ctx = self.cfg.train, self.ctx
        self.model.train()
        if start == 0 and tc.init is not None and ctx.is_main:
            self.validate(0)  # the starting model's bound, on the same draws as every later validation
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not progress, desc="train")
        t_last, tokens_since = time.perf_counter(), 0
        for step in bar:
            lr = learning_rate(tc, step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(step, tc.batch_size, len(self.train_blocks), tc.seed)
            x0 = torch.from_numpy(self.train_blocks[idx].astype(np.int64)).to(self.device, non_blocking=True)
            # The draws of the whole global batch, the same on every rank; then this rank's rows of it.
            inputs = self.objective.prepare(x0, step_generator(tc.seed, step, STREAM_NOISE, self.device))
            inputs = tuple(x[ctx.rows(tc.batch_size)] for x in inputs)
            torch.manual_seed(rank_seed(step_seed(tc.seed, step, STREAM_DROPOUT), ctx.rank))  # this step's dropout

            loss_value, grad_norm = train_step(self.replica, self.step_loss, self.optimizer, inputs, self.accum,
                                               self.device, self.amp, tc.grad_clip, ctx)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at step {step}; stopped before the optimizer step "
                                         f"(last checkpoint in {self.run.checkpoints}); lower train.lr or check the "
                                         f"data")
            if self.ema is not None:
                self.ema.update(self.model, step)
            done = step + 1
            tokens_since += self.tokens_per_step
            self.result.step, self.result.last_loss = done, loss_value

            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                if ctx.is_main:
                    self._log(kind=LOG_TRAIN, step=done, loss=loss_value, lr=lr,
                              grad_norm=None if grad_norm is None else float(grad_norm),
                              tokens_seen=done * self.tokens_per_step,
                              epochs=done * tc.batch_size / len(self.train_blocks),
                              tokens_per_s=tokens_since / (now - t_last))
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_since / (now - t_last):.0f}")
                t_last, tokens_since = now, 0
            validating = done % tc.val_every == 0 or done == tc.steps
            saving = done % tc.ckpt_every == 0 or done == tc.steps
            if validating and ctx.is_main:
                self.validate(done)
            if saving and ctx.is_main:
                self.checkpoint(done)
            if validating or saving:
                ctx.barrier()  # the other ranks wait for rank 0's validation and checkpoint
                t_last, tokens_since = time.perf_counter(), 0  # keep their time out of tokens/s
        bar.close()
        if start >= tc.steps:
            log.info("%s is already trained to step %d (train.steps=%d); nothing to do", self.run.root, start,
                     tc.steps)
