"""The denoising loop: MDLM ancestral sampling with a model schedule (REFERENCE.md section 2).

`sample` is a pure function of (models, schedule, noise, settings, generator, prompts): it starts
from all-[MASK] sequences (prompt tokens fixed) and runs T steps from t = 1 down to t_min, the
model of step i being schedule[i]. Each step is the ancestral update in its two-stage form:

1. every masked position unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t), a draw
   that does not involve the network;
2. only the positions that unmask draw a token, from p_theta(x_0 | x_t) of the step's model
   (float64 inverse-CDF draw from a float32 head; optional nucleus / top-p).

The prediction cache, exactly: a sequence's prediction is used only at a step where one of its
positions unmasks. So the sampler runs the network only on those sequences, after stage 1, with the
model scheduled for that step and on the sequence as it is then. This is what MDLM's cache (reuse
p(x_0 | x_t) while x_t has not changed, invalidate when the model changes) computes, with the same
distribution of outputs, and it never serves a prediction from another model or another x_t.
A step where no position of a sequence unmasks costs that sequence nothing (`skipped` in the trace),
whether or not the model is time-conditioned. With `cache=False` every sequence runs at every step
(the uncached sampler, for comparison); the tokens are the same for the same generator state.

The output head runs only on the positions that decode a token (a few per sequence per step at
T ~ L), so a step costs the transformer blocks plus a sliver of the head.

After the last step, masks that remain (probability ~t_min per position) are filled by the argmax
of the last scheduled model (MDLM's noise-removal step).

Randomness: per step, two [B, L] float64 uniform draws from the generator (unmask decisions, token
draws), whatever the content of the sequences: sequence b's outcome depends only on row b of them,
so sequences of a batch are independent of one another, and two schedules run with the same seed
share their random numbers (the same positions unmask at the same steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mdlm_sched.diffusion import forbid_mask, unmask_probability
from mdlm_sched.errors import SamplingError
from mdlm_sched.models.denoiser import DenoiserConfig
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import ModelSchedule, time_grid


class Denoiser(Protocol):
    """What the sampler needs of a model (MDLMDenoiser and modelset.PreparedDenoiser have it)."""

    config: DenoiserConfig
    device: torch.device

    def hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d] of x_t [B, L]."""

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of hidden [..., d]."""


@dataclass(frozen=True)
class StepRecord:
    """What one step of one batch did."""

    step: int  # 0..T-1; T is the noise-removal step
    t: float
    s: float  # the step goes from t to s
    model: str
    run: int  # sequences run through the network
    skipped: int  # sequences that needed no prediction and skipped the network (MDLM's cache)
    unmasked: int  # tokens decided (positions the output head ran on)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, L] long, on the sampling device
    trace: list[StepRecord]


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """One categorical draw per row of logits [K, V] by inverse CDF in float64; u [K] uniform in [0, 1).

    Float64 keeps the tail exact: a token of probability 1e-6 is drawn at that rate, where float32
    noise truncates the tail (Zheng et al. 2024). top_p < 1 keeps the smallest set of most likely
    tokens whose mass reaches top_p, renormalised.
    """
    probs = logits.double().softmax(dim=-1)  # [K, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # [K, V]
    target = (u.double() * cdf[:, -1])[:, None]  # scaled by the total, which rounding keeps near 1
    idx = torch.searchsorted(cdf, target, right=True)  # [K, 1] first cdf > target; V if rounding put it past the end
    # Past the end, the draw is the last token of nonzero probability (never the [MASK] id, whose probability is 0).
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1, keepdim=True)  # [K, 1]
    idx = torch.minimum(idx, last)
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)


def check_prompts(prompts: Sequence[Sequence[int]], config: DenoiserConfig, seq_len: int) -> None:
    """Raise SamplingError unless every prompt fits the sequence and the vocabulary."""
    for i, prompt in enumerate(prompts):
        if len(prompt) >= seq_len:
            raise SamplingError(f"prompt {i} has {len(prompt)} tokens but sequences have {seq_len}: nothing is "
                                f"left to generate; shorten the prompt below {seq_len} tokens")
        bad = [tok for tok in prompt if not 0 <= tok < config.vocab_size or tok == config.mask_token_id]
        if bad:
            raise SamplingError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size}) "
                                f"or equal to [MASK]={config.mask_token_id}; give ids of the model's tokenizer")


def check_length(seq_len: int, config: DenoiserConfig) -> None:
    """Raise SamplingError unless sequences of seq_len tokens fit the models."""
    if not 1 <= seq_len <= config.max_position_embeddings:
        raise SamplingError(f"sequence length {seq_len} must be in [1, {config.max_position_embeddings}] "
                            f"(the models' max_position_embeddings)")


def _decode(model: Denoiser, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
            sigma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run model on sequences x[rows] and return (logits [K, V] at positions, their rows, their columns).

    positions [n, L] bool marks, per run sequence, the positions to decode.
    """
    hidden = model.hidden(x[rows], sigma)  # [n, L, d]
    r, col = positions.nonzero(as_tuple=True)  # [K], [K]
    logits = forbid_mask(model.logits_from_hidden(hidden[r, col]), model.config.mask_token_id)  # [K, V] float32
    return logits, rows[r], col


@torch.no_grad()
def sample(models: Mapping[str, Denoiser], schedule: ModelSchedule, noise: LogLinearNoise,
           settings: SamplerSettings, generator: torch.Generator, batch_size: int, seq_len: int,
           prompts: Sequence[Sequence[int]] | None = None,
           on_step: Callable[[StepRecord], None] | None = None,
           on_state: Callable[[int, torch.Tensor], None] | None = None) -> SampleResult:
    """Sample batch_size sequences of seq_len tokens with `schedule` (T = len(schedule) steps).

    models: name -> denoiser; every name in the schedule must be there (check_compatible first).
    generator: the only source of randomness; draws are made on its device.
    prompts: None (unconditional) or one token-id list per sequence, kept fixed at the start.
    on_step: called with each step's record (progress bars).
    on_state: called with (step i, x_t [B, L]) at the start of each step, before its draws (the
        states the step's model sees; per-step analysis). The tensor is the sampler's own: clone it to keep it.
    """
    missing = sorted(set(schedule.names) - set(models))
    if missing:
        raise SamplingError(f"the schedule uses model {missing[0]!r}, which was not given; pass it by name")
    config = models[schedule[0]].config
    check_length(seq_len, config)
    if batch_size < 1:
        raise SamplingError(f"batch size {batch_size} must be >= 1")
    b, l, mask_id = batch_size, seq_len, config.mask_token_id
    device = models[schedule[0]].device
    x = torch.full((b, l), mask_id, dtype=torch.long, device=device)  # [B, L]
    if prompts is not None:
        if len(prompts) != b:
            raise SamplingError(f"{len(prompts)} prompts for a batch of {b}; give one per sequence")
        check_prompts(prompts, config, l)
        for row, prompt in enumerate(prompts):
            x[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    times = time_grid(len(schedule), settings.t_min).tolist()
    p_unmask = [unmask_probability(noise, t, s) for t, s in zip(times, times[1:])]  # per step, off the loop
    all_rows = torch.arange(b, device=device)
    trace: list[StepRecord] = []

    def record(step: int, t: float, s: float, name: str, run: int, skipped: int, unmasked: int) -> None:
        trace.append(StepRecord(step, t, s, name, run, skipped, unmasked))
        if on_step is not None:
            on_step(trace[-1])

    def sigma_of(model: Denoiser, t: float, n: int) -> torch.Tensor | None:
        if not model.config.time_conditioning:
            return None
        return noise.sigma(torch.full((n,), t, device=device))

    for i, name in enumerate(schedule.names):
        t, s = times[i], times[i + 1]
        model = models[name]
        if on_state is not None:
            on_state(i, x)
        u_unmask = torch.rand((b, l), generator=generator, device=generator.device, dtype=torch.float64).to(device)
        u_token = torch.rand((b, l), generator=generator, device=generator.device, dtype=torch.float64).to(device)
        unmask = (x == mask_id) & (u_unmask < p_unmask[i])  # [B, L]
        rows = unmask.any(dim=1).nonzero().squeeze(1) if settings.cache else all_rows  # [n]
        decided = 0
        if rows.numel():
            logits, r, col = _decode(model, x, rows, unmask[rows], sigma_of(model, t, rows.numel()))
            x[r, col] = draw_tokens(logits, u_token[r, col], settings.top_p)
            decided = r.numel()
        record(i, t, s, name, rows.numel(), b - rows.numel(), decided)

    remaining = x == mask_id
    if settings.noise_removal and bool(remaining.any()):
        name, t = schedule[-1], times[-1]
        model = models[name]
        rows = remaining.any(dim=1).nonzero().squeeze(1)
        logits, r, col = _decode(model, x, rows, remaining[rows], sigma_of(model, t, rows.numel()))
        x[r, col] = logits.argmax(dim=-1)
        record(len(schedule), t, 0.0, name, rows.numel(), b - rows.numel(), r.numel())
    return SampleResult(tokens=x, trace=trace)
