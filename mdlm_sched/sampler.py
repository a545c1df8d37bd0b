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

With `latent_cache` on (latent_cache.py; MLA models), each model also keeps its latents across steps and a step
recomputes only the positions that unmask or changed since cached: approximate, off by default.

The output head runs only on the positions that decode a token (a few per sequence per step at
T ~ L), so a step costs the transformer blocks plus a sliver of the head.

After the last step, masks that remain (probability ~t_min per position) are filled by the argmax
of the last scheduled model (MDLM's noise-removal step).

Randomness: two [B, L] float64 uniform draws from the generator before the first step, whatever
the content of the sequences. The first fixes when each position unmasks: it stays masked through
step i with probability S_i = prod_{j <= i} (1 - p_j), so it unmasks at the first step with
S_i <= u (the first success of the per-step Bernoulli(p_j) decisions, drawn by inverse CDF). The
second is the uniform of the position's token draw. Sequence b's outcome depends only on row b of
them, so sequences of a batch are independent of one another, and two schedules run with the same
seed share their random numbers (the same positions unmask at the same steps, with the same
uniforms).

No host synchronisation inside the step loop: the unmask steps are copied to the host once, and
every step's sequences and positions are then known there before the step runs, so the GPU never
waits for the host to learn a count (and small batches can replay captured CUDA graphs, see
modelset.PreparedDenoiser).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mdlm_sched.diffusion import forbid_mask, unmask_probability
from mdlm_sched.errors import SamplingError
from mdlm_sched.latent_cache import plan_latent_steps
from mdlm_sched.models.denoiser import DenoiserConfig
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import ModelSchedule, time_grid

# Which draws a seed stands for. Results made under another layout hold other samples for the same seed,
# so a sweep refuses to mix them: paired intervals need schedules that share their draws. (1: per-step
# draws, the first round; 2: two per-position draws before the loop.)
RANDOMNESS_LAYOUT = 2


class Denoiser(Protocol):
    """What the sampler needs of a model (MDLMDenoiser and modelset.PreparedDenoiser have it)."""

    config: DenoiserConfig
    device: torch.device

    def hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d] of x_t [B, L]."""

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of hidden [..., d]."""

    def new_latent_cache(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """An empty latent cache [layers, B, L, kv_cache_elements] (MLA models; latent_cache.py)."""

    def latent_hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor,
                      rows: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states through the latent cache (MDLMDenoiser.latent_hidden)."""


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
    # With the latent cache (latent_cache.py): positions through the network, padding included, and the sequences
    # refreshed whole among them (None, None: exact sampling, every position of the sequences run).
    positions_run: int | None = None
    refreshed: int | None = None


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, L] long, on the sampling device
    trace: list[StepRecord]


def _float64_uniforms(u: torch.Tensor) -> torch.Tensor:
    """u itself, refused unless it is float64: a float32 uniform has 2^24 levels, so upcasting it would pass the
    checks while the draws it makes lose the tail (tokens below 6e-8 could never be drawn)."""
    if u.dtype != torch.float64:
        raise TypeError(f"sampling uniforms must be drawn in float64, got {u.dtype}")
    return u


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """One categorical draw per row of logits [K, V] by inverse CDF in float64; u [K] float64 uniform in [0, 1).

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
    target = (_float64_uniforms(u) * cdf[:, -1])[:, None]  # scaled by the total, which rounding keeps near 1
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


def unmask_steps(u: torch.Tensor, p_unmask: Sequence[float]) -> torch.Tensor:
    """The step at which each position unmasks, [B, L] long (T = len(p_unmask): masked through all T steps).

    u [B, L] float64 uniform in [0, 1); p_unmask [T] the per-step unmask probabilities of a masked position.
    A position is still masked after step i with probability S_i = prod_{j <= i} (1 - p_j); it unmasks at
    the first step with S_i <= u, which is the number of steps with S_i > u (S is non-increasing).
    """
    survival = torch.tensor(np.cumprod(1.0 - np.asarray(p_unmask, dtype=np.float64)), dtype=torch.float64)  # [T]
    return len(p_unmask) - torch.searchsorted(survival.flip(0).to(u.device), _float64_uniforms(u), right=True)


@dataclass(frozen=True)
class _Plan:
    """Every step's sequences and positions, known on the host before the loop; index tensors on the device.

    Step i (i = T: the noise removal) runs sequences rows[row_bounds[i]:row_bounds[i + 1]] and decodes the
    positions pos[:, bounds[i]:bounds[i + 1]] (pos rows: sequence, column, index of the sequence among those run).
    """

    bounds: list[int]  # [T + 2]
    row_bounds: list[int]  # [T + 2]
    rows: torch.Tensor  # [sum of sequences run] long, device
    pos: torch.Tensor  # [3, positions decoded] long, device
    u_token: torch.Tensor  # [positions decoded] float64, device: each position's token uniform, in pos order

    def positions(self, i: int) -> torch.Tensor:
        """[3, K]: sequence, column and index among the sequences run of the K positions step i decodes."""
        return self.pos[:, self.bounds[i]:self.bounds[i + 1]]


def _plan(steps: np.ndarray, t: int, u_token: torch.Tensor, cache: bool, device: torch.device) -> _Plan:
    """The plan of a T-step run from each position's unmask step [B, L] (host; T: never, T + 1: a prompt position)."""
    b, l = steps.shape
    order = np.argsort(steps, axis=None, kind="stable")  # flat positions by step, row-major within a step
    bounds = np.searchsorted(steps.ravel()[order], np.arange(t + 2)).tolist()  # noise removal = step T
    pos_rows, pos_cols = np.divmod(order, l)
    rows, row_bounds, local = [], [0], np.empty_like(order)
    for i in range(len(bounds) - 1):
        sl = slice(bounds[i], bounds[i + 1])
        # With the cache, only the sequences with a position to decode run; without it, all of them (not at the
        # noise removal, which never ran them all).
        run = np.unique(pos_rows[sl]) if cache or i == len(bounds) - 2 else np.arange(b)
        local[sl] = np.searchsorted(run, pos_rows[sl])
        rows.append(run)
        row_bounds.append(row_bounds[-1] + len(run))
    # One host-to-device copy of each index tensor: a copy from pageable memory inside the loop would wait for the GPU.
    pos = torch.from_numpy(np.stack([pos_rows, pos_cols, local])).to(device)
    return _Plan(bounds=bounds, row_bounds=row_bounds, rows=torch.from_numpy(np.concatenate(rows)).to(device),
                 pos=pos, u_token=u_token.reshape(-1)[torch.from_numpy(order).to(u_token.device)].to(device))


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
    on_state: called with (step i, x_t [B, L]) at the start of each step (the states the step's
        model sees; per-step analysis). The tensor is the sampler's own: clone it to keep it.
    """
    missing = sorted(set(schedule.names) - set(models))
    if missing:
        raise SamplingError(f"the schedule uses model {missing[0]!r}, which was not given; pass it by name")
    if settings.latent_cache and any(models[n].config.attention != "mla" for n in schedule.names):
        raise SamplingError("latent_cache: true needs MLA models (it keeps MLA's latents); a model of the schedule "
                            "has multi-head attention: sample it with latent_cache: false")
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
    t_steps = len(schedule)
    times = time_grid(t_steps, settings.t_min).tolist()
    p_unmask = [unmask_probability(noise, t, s) for t, s in zip(times, times[1:])]  # [T]
    u_time = torch.rand((b, l), generator=generator, device=generator.device, dtype=torch.float64)
    u_token = torch.rand((b, l), generator=generator, device=generator.device, dtype=torch.float64)
    prompt = (x != mask_id).to(u_time.device)  # [B, L]
    # [B, L] on the host (the one host synchronisation); prompt positions (T + 1) never unmask
    steps = unmask_steps(u_time, p_unmask).masked_fill(prompt, t_steps + 1).cpu().numpy()
    plan = _plan(steps, t_steps, u_token, settings.cache, device)
    cached = None
    if settings.latent_cache:
        last = [schedule[-1]] if settings.noise_removal else []
        cached = plan_latent_steps(steps, list(schedule.names) + last, settings.latent_refresh_every,
                                   settings.latent_refresh_share, device)
    caches: dict[str, torch.Tensor] = {}  # model -> its latent cache [layers, B, L, r + rope]
    trace: list[StepRecord] = []

    def sigma_of(model: Denoiser, n: int, t: float) -> torch.Tensor | None:
        return noise.sigma(torch.full((n,), t, device=device)) if model.config.time_conditioning else None

    def run_cached(i: int, name: str, t: float) -> torch.Tensor | None:
        """Step i through the model's latent cache: float32 logits [K, V] of the K positions it decodes."""
        model, step = models[name], cached[i]
        if name not in caches:
            caches[name] = model.new_latent_cache(b, l)
        hidden = []
        for rows, positions in ((step.refresh, None), (step.partial, step.positions)):
            if len(rows):
                out = model.latent_hidden(x.index_select(0, rows), sigma_of(model, len(rows), t), caches[name],
                                          rows, positions)  # [n, L or A, d]
                hidden.append(out.flatten(0, 1))
        trace.append(StepRecord(i, t, times[i + 1] if i < t_steps else 0.0, name, step.sequences,
                                b - step.sequences, len(step.take), step.positions_run, len(step.refresh)))
        if on_step is not None:
            on_step(trace[-1])
        if not len(step.take):
            return None
        return forbid_mask(model.logits_from_hidden(torch.cat(hidden).index_select(0, step.take)), mask_id)

    def run_step(i: int, name: str, t: float) -> torch.Tensor | None:
        """Run step i's model on its sequences; float32 logits [K, V] of the K positions it decodes (None if K = 0)."""
        if cached is not None:
            return run_cached(i, name, t)
        model = models[name]
        n = plan.row_bounds[i + 1] - plan.row_bounds[i]
        rows = plan.rows[plan.row_bounds[i]:plan.row_bounds[i + 1]]  # [n]
        _, col, local = plan.positions(i)
        if n > 0:
            hidden = model.hidden(x.index_select(0, rows), sigma_of(model, n, t))  # [n, L, d]
        trace.append(StepRecord(i, t, times[i + 1] if i < t_steps else 0.0, name, n, b - n, len(col)))
        if on_step is not None:
            on_step(trace[-1])
        return forbid_mask(model.logits_from_hidden(hidden[local, col]), mask_id) if len(col) else None

    for i, name in enumerate(schedule.names):
        if on_state is not None:
            on_state(i, x)
        logits = run_step(i, name, times[i])
        if logits is not None:
            r, col, _ = plan.positions(i)
            x[r, col] = draw_tokens(logits, plan.u_token[plan.bounds[i]:plan.bounds[i + 1]], settings.top_p)

    if settings.noise_removal and plan.bounds[t_steps + 1] > plan.bounds[t_steps]:
        # Masks that remain after the last step take the last model's most likely token.
        logits = run_step(t_steps, schedule[-1], times[-1])
        r, col, _ = plan.positions(t_steps)
        x[r, col] = logits.argmax(dim=-1)
    return SampleResult(tokens=x, trace=trace)
