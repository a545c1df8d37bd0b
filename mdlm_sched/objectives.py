"""Objectives: what a batch of clean blocks x0 [B, L] costs a model, in training and in validation.

The masked diffusion model's continuous-time NELBO (exp of its mean bounds the perplexity) and the
autoregressive judge's next-token cross-entropy share one protocol, so that one training loop serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from mdlm_sched.config import NoiseConfig, RunConfig
from mdlm_sched.diffusion import corrupt, masked_positions, nelbo_terms, sample_times
from mdlm_sched.models.denoiser import DenoiserConfig
from mdlm_sched.noise import LogLinearNoise, make_noise
from mdlm_sched.runtime import autocast


class Objective(Protocol):
    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs for one optimizer step's sequences (all tensors have batch dim first)."""

    def loss(self, model: torch.nn.Module, *inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Mean loss per token of one micro-batch (float32 scalar)."""

    def block_losses(self, model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """Loss per token of each sequence [B] (evaluation: float32 head); its mean is loss(training=False)."""


@dataclass(frozen=True)
class MDLMObjective:
    """Continuous-time NELBO of the masked diffusion model; exp(mean) bounds the perplexity."""

    noise: LogLinearNoise
    mask_id: int
    sampling_eps: float
    loss_kernel: str = "torch"  # the head's cross-entropy in training (config.LOSS_KERNELS)

    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        # One low-discrepancy set of times over the whole step's batch, then masks at those times.
        t = sample_times(x0.shape[0], generator, self.sampling_eps, device=x0.device)
        return x0, corrupt(x0, t, self.noise, self.mask_id, generator), t

    def _terms(self, model: torch.nn.Module, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """NELBO terms [M] at the masked positions [M] (flat indices into x0 [B, L]), and those positions."""
        # Unmasked positions cost nothing under SUBS, so the output head (a quarter of the FLOPs of a
        # 12 x 768 model) runs only at the masked ones: about half of them. Under torch.compile the
        # data-dependent M splits the graph here; the part after it compiles with M dynamic.
        positions = masked_positions(x_t, self.mask_id)  # [M]
        # Training keeps the output head in the autocast dtype (and its kernel) for speed; evaluation uses
        # PyTorch's float32 head.
        nll = model(x_t, sigma=self.noise.sigma(t), head_fp32=not training, positions=positions,
                    targets=x0.flatten().index_select(0, positions),
                    loss_kernel=self.loss_kernel if training else "torch")  # [M]
        return nelbo_terms(nll, t, positions, x0.shape[1], self.noise), positions

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
             training: bool) -> torch.Tensor:
        return self._terms(model, x0, x_t, t, training)[0].sum() / x0.numel()

    def block_losses(self, model: torch.nn.Module, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        terms, positions = self._terms(model, x0, x_t, t, training=False)
        rows = torch.zeros(x0.shape[0], device=terms.device, dtype=terms.dtype)
        return rows.index_add_(0, positions // x0.shape[1], terms) / x0.shape[1]  # [B]


@dataclass(frozen=True)
class AutoregressiveObjective:
    """Next-token cross-entropy of a causal LM (the judge); exp(mean) is its perplexity."""

    def prepare(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (x0,)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, *, training: bool) -> torch.Tensor:
        logits = model(input_ids=x0).logits  # [B, L, V]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())

    def block_losses(self, model: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x0).logits  # [B, L, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten(), reduction="none")
        return nll.view(x0.shape[0], -1).mean(dim=1)  # [B]


def make_objective(cfg: RunConfig, mask_id: int) -> Objective:
    """The objective for cfg.model.arch."""
    if cfg.model.arch == "gpt2":
        return AutoregressiveObjective()
    return MDLMObjective(make_noise(cfg.noise.schedule, cfg.noise.eps), mask_id, cfg.noise.sampling_eps,
                         cfg.train.loss_kernel)


def denoiser_objective(config: DenoiserConfig) -> MDLMObjective:
    """The NELBO of a saved denoiser, with the forward process it was trained with (its config's)."""
    return MDLMObjective(make_noise(config.noise_schedule, config.noise_eps), config.mask_token_id,
                         NoiseConfig().sampling_eps)


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, blocks: np.ndarray, micro_batch_size: int,
             device: torch.device, amp: torch.dtype | None, seed: int) -> np.ndarray:
    """Loss per token of each of blocks [N, L]: float64 [N], whose mean is the validation loss (every block has
    the same length). The same noise draws at every call for a given seed and micro-batch size, so two models
    evaluated alike are paired block by block (intervals over blocks: stats.paired_mean_difference)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for start in range(0, len(blocks), micro_batch_size):
        x0 = torch.from_numpy(blocks[start:start + micro_batch_size].astype(np.int64)).to(device)
        with autocast(device, amp):
            losses.append(objective.block_losses(model, *objective.prepare(x0, generator)).double())
    model.train(was_training)
    return torch.cat(losses).cpu().numpy()
