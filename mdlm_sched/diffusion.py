"""MDLM maths (Sahoo et al. 2024): forward masking, SUBS parameterisation, continuous-time NELBO.

Only tensors in, tensors out: no models are trained or called here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mdlm_sched.noise import LogLinearNoise


def sample_times(batch_size: int, generator: torch.Generator, sampling_eps: float = 1e-3,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Low-discrepancy (antithetic) times t [B] in [sampling_eps, 1]: one uniform offset, B even strata."""
    u = torch.rand((), generator=generator, device=generator.device).to(device)
    strata = (u + torch.arange(batch_size, device=device, dtype=torch.float32) / batch_size) % 1.0
    return (1 - sampling_eps) * strata + sampling_eps


def corrupt(x0: torch.Tensor, t: torch.Tensor, noise: LogLinearNoise, mask_id: int,
            generator: torch.Generator) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0): each token of x0 [B, L] becomes [MASK] with probability 1 - alpha(t [B])."""
    p_mask = (1 - noise.alpha(t))[:, None]  # [B, 1]
    draw = torch.rand(x0.shape, generator=generator, device=generator.device).to(x0.device)
    return torch.where(draw < p_mask, torch.full_like(x0, mask_id), x0)


def forbid_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 copy of logits [..., V] with the [MASK] logit at -inf (the caller's tensor is untouched)."""
    is_mask = torch.arange(logits.shape[-1], device=logits.device) == mask_id
    return logits.float().masked_fill(is_mask, float("-inf"))


def masked_positions(x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Flat indices [M] into x_t [B, L] of its [MASK] tokens, in order (reading M costs a host sync)."""
    return (x_t == mask_id).flatten().nonzero().squeeze(1)


def masked_nll(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p_theta(x_0 | x_t) under SUBS at every position of logits [..., V], targets x0 [...].

    The caller keeps the masked positions (SUBS carries the unmasked ones over, at zero loss). The [MASK] column
    is excluded from the softmax (zero masking probability).
    """
    logits = forbid_mask(logits, mask_id)
    return F.cross_entropy(logits.flatten(0, -2), x0.flatten(), reduction="none").view_as(x0)


def nelbo_terms(nll: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, seq_len: int,
                noise: LogLinearNoise) -> torch.Tensor:
    """Continuous-time NELBO terms [M] of the masked positions: w(t) * -log p(x_0 | x_t).

    positions [M] are masked_positions(x_t) (flat indices into x_t [B, seq_len]), nll [M] masked_nll there, t [B].
    Every other position costs 0 under SUBS (carry-over), so the NELBO per token is
    terms.sum() / x0.numel(), and exp of it bounds the perplexity.
    """
    return noise.loss_weight(t).index_select(0, positions // seq_len) * nll  # the row's time weight


# ----------------------------------------------------------------------------- sampling


def unmask_probability(noise: LogLinearNoise, t: float, s: float) -> float:
    """P(a position masked at t is unmasked at s < t) = (alpha_s - alpha_t) / (1 - alpha_t).

    The ancestral update in two stages (REFERENCE.md section 2): this probability does not depend
    on the network, which is only needed to choose the token of a position that unmasks.
    """
    t64, s64 = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    return float((noise.alpha(s64) - noise.alpha(t64)) / (1 - noise.alpha(t64)))
