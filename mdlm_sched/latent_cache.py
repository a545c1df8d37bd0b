"""The latent cache: which positions each denoising step recomputes when MLA's latents are kept across steps.

An MLA layer's keys and values come from one latent per position (kv_lora_rank + the shared rotary key:
DenoiserConfig.kv_cache_elements numbers per token and layer). With `latent_cache: true` the sampler keeps, per
model, every layer's latent of every position of the batch, and a step runs through the network only
- the positions that unmask at the step (their logits are needed), and
- the positions whose token changed since the model last computed them (those that unmasked since);
the other positions are not run: the recomputed queries attend over their cached latents (absorbed attention,
MDLMDenoiser.latent_hidden). Their latents were computed on an older x_t, so the sampler is approximate, as
dKV-Cache and Fast-dLLM are for MHA/GQA diffusion LMs.

A sequence is refreshed (every position recomputed and recached, exactly as the exact sampler runs it) when
- the model has not run it since another model did (a model's cache is refreshed when it takes over; each model
  keeps its own cache),
- `latent_refresh_every` = R > 0 steps have passed since the model last refreshed it, or
- more than `latent_refresh_share` of its positions changed since they were cached.
With R = 1 every step is a refresh and the tokens are those of exact sampling.

The plan is made on the host before the loop from the unmask steps, which the sampler draws before any network
call (sampler.unmask_steps), so the loop never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CachedStep:
    """How one step runs its sequences through the latent cache."""

    refresh: torch.Tensor  # [nF] long: sequences recomputed at every position
    partial: torch.Tensor  # [nP] long: sequences recomputed at `positions` only
    positions: torch.Tensor  # [nP, A] long: the columns recomputed (a row with fewer repeats its last one)
    take: torch.Tensor  # [K]: each decoded position (in the plan's order) in cat(refresh [nF * L], partial [nP * A])
    positions_run: int  # nF * L + nP * A: positions through the network (padding included)

    @property
    def sequences(self) -> int:
        return len(self.refresh) + len(self.partial)


def plan_latent_steps(steps: np.ndarray, names: list[str], refresh_every: int, refresh_share: float,
                      device: torch.device) -> list[CachedStep]:
    """The CachedStep of every step i < len(names) (names[i]: the model of step i; the last entry is the noise
    removal's model) from each position's unmask step `steps` [B, L] (host; a prompt position never unmasks)."""
    b, l = steps.shape
    order = np.argsort(steps, axis=None, kind="stable")  # flat positions by step, row-major within a step
    bounds = np.searchsorted(steps.ravel()[order], np.arange(len(names) + 1))
    owner = np.full(b, -1)  # index of the model that ran each sequence last
    models = sorted(set(names))
    stale = {m: np.zeros((b, l), dtype=bool) for m in models}  # token changed since m cached the position
    refreshed = {m: np.full(b, -(10**9)) for m in models}  # step of m's last refresh of each sequence
    out = []
    for i, name in enumerate(names):
        rows, cols = np.divmod(order[bounds[i]:bounds[i + 1]], l)  # the positions decoded at step i
        run = np.unique(rows)
        m, mine = models.index(name), stale[name]
        due = (owner[run] != m) | (mine[run].mean(axis=1) > refresh_share)
        if refresh_every > 0:
            due |= i - refreshed[name][run] >= refresh_every
        full, part = run[due], run[~due]
        active = [np.concatenate((cols[rows == r], np.flatnonzero(mine[r] & (steps[r] != i)))) for r in part]
        width = max((len(a) for a in active), default=0)
        positions = np.array([np.pad(a, (0, width - len(a)), mode="edge") for a in active], dtype=np.int64)
        # Where each decoded position's hidden state lands: row-major in the refresh block, else its slot
        # (decoded columns come first in a partial row's list, in the plan's order).
        slot = {int(r): k for k, r in enumerate(full)}
        slot_p = {int(r): k for k, r in enumerate(part)}
        seen: dict[int, int] = {}
        take = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            if r in slot:
                take.append(slot[r] * l + c)
            else:
                take.append(len(full) * l + slot_p[r] * width + seen.get(r, 0))
                seen[r] = seen.get(r, 0) + 1
        mine[full] = False
        refreshed[name][full] = i
        for r, a in zip(part, active):
            mine[r, a] = False
        owner[run] = m
        for m_stale in stale.values():
            m_stale[rows, cols] = True
        out.append(CachedStep(refresh=torch.from_numpy(full).to(device), partial=torch.from_numpy(part).to(device),
                              positions=torch.from_numpy(positions.reshape(len(part), width)).to(device),
                              take=torch.tensor(take, dtype=torch.long, device=device),
                              positions_run=len(full) * l + len(part) * width))
    return out
