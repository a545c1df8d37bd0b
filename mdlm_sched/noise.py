"""Noise schedules of the absorbing-state forward process.

Convention: t in [0, 1], t = 1 fully masked, t = 0 clean. alpha(t) is the probability that a token
is still clean at time t; sigma(t) = -log alpha(t) is the total noise (what a time-conditioned
network sees).

The schedules take and give tensors but never import torch, so that config checks can name them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mdlm_sched.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LogLinearNoise:
    """MDLM's log-linear schedule: sigma(t) = -log(1 - (1 - eps) t), so P(masked) = (1 - eps) t."""

    eps: float = 1e-3
    name: str = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability a token is still clean at time t."""
        return 1 - (1 - self.eps) * t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log alpha(t)."""
        return -(-(1 - self.eps) * t).log1p()

    def masked_fraction(self, sampling_eps: float) -> float:
        """Expected fraction of tokens masked in training, E[(1 - eps) t] over t ~ U[sampling_eps, 1]."""
        return (1 - self.eps) * (1 + sampling_eps) / 2

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight -alpha'(t) / (1 - alpha(t)) of a masked token's -log p(x_0 | x_t); = 1/t here."""
        return (1 - self.eps) / ((1 - self.eps) * t)


NOISE_SCHEDULES = {"loglinear": LogLinearNoise}


def make_noise(name: str, eps: float) -> LogLinearNoise:
    """The schedule called `name` (only "loglinear" so far) with its eps."""
    if name not in NOISE_SCHEDULES:
        raise ConfigError(f"noise schedule {name!r} is unknown; use one of {', '.join(NOISE_SCHEDULES)}")
    return NOISE_SCHEDULES[name](eps=eps)
