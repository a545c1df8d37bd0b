"""Analytic forward FLOPs of the denoiser, in the conventions a reader compares.

Counted: every matrix product, 2 FLOPs per multiply-add (what torch.utils.flop_counter counts).
  blocks-only (Kaplan; the seed paper's 16.7%): the transformer blocks, attention scores included.
  full (Chinchilla): blocks + the output head (2 d V per token, V as executed, i.e. padded)
                     + the per-sequence time embedding and final adaLN when the model has adaLN
                     (time-conditioned, or MDLM's DiT with sigma = 0).
For sampling runs (trace_flops) "full" counts the head where it ran: this sampler runs it only on
the positions it decodes, so "full" is close to blocks-only there; "head everywhere" counts the
head at every position of every sequence run, as MDLM's sampler runs it (the sandwich then saves
about 12% rather than 16.7%, because the head is the same for both models).
Training runs the head only at the masked positions (objectives.MDLMObjective): training_flops_per_token
prices it at the expected masked fraction (noise.masked_fraction), about half.
The embedding lookup costs no FLOPs; norms, activations and softmax are not matrix products and
are left out (well under 1% at every size here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mdlm_sched.models.denoiser import DenoiserConfig

if TYPE_CHECKING:
    from mdlm_sched.sampler import StepRecord

TIME_FREQ_DIM = 256  # width of the sinusoidal features of TimestepEmbedding


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward pass over `batch` sequences of `seq_len` tokens."""

    blocks: int
    head: int
    other: int  # time embedding + final adaLN (0 without time conditioning)

    @property
    def blocks_only(self) -> int:
        return self.blocks

    @property
    def full(self) -> int:
        return self.blocks + self.head + self.other


def forward_flops(config: DenoiserConfig, seq_len: int, batch: int = 1, head_tokens: int | None = None) -> ForwardFlops:
    """Matmul FLOPs of MDLMDenoiser.forward on [batch, seq_len] tokens.

    head_tokens: positions the output head runs on (default: all batch * seq_len, as in forward);
    the sampler runs the blocks on whole sequences but the head only where it decodes a token.
    """
    d, h, n = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    if config.attention == "mla":
        qk, nope, rope, dv = (config.qk_nope_head_dim + config.qk_rope_head_dim, config.qk_nope_head_dim,
                              config.qk_rope_head_dim, config.v_head_dim)
        r_q, r_kv = config.q_lora_rank, config.kv_lora_rank
        q_proj = d * h * qk if r_q == 0 else d * r_q + r_q * h * qk
        attention = (
            q_proj
            + d * (r_kv + rope)  # wkv_a: latent + shared rotary key
            + r_kv * h * (nope + dv)  # wkv_b: per-head k_nope and v
            + h * dv * d  # wo
        )
    else:  # "mha": fused qkv for h query and kv key/value heads of width d / h, then the output projection
        qk = dv = d // h
        attention = d * (h + 2 * config.num_key_value_heads) * qk + h * dv * d
    per_token = (
        attention
        + 2 * d * config.intermediate_size  # MLP
        + seq_len * h * (qk + dv)  # attention scores q.k and weighted sum of v, over seq_len keys
    )
    per_seq_block = 6 * d * config.cond_dim if config.modulated else 0  # adaLN modulation
    blocks = 2 * n * (per_token * seq_len + per_seq_block) * batch
    head = 2 * d * config.padded_vocab_size * (seq_len * batch if head_tokens is None else head_tokens)
    other = 0
    if config.modulated:
        c = config.cond_dim
        other = 2 * (TIME_FREQ_DIM * c + c * c + 2 * d * c) * batch
    return ForwardFlops(blocks=blocks, head=head, other=other)


def latent_cached_flops(config: DenoiserConfig, seq_len: int, refreshed: int, partial: int, positions: int,
                        head_tokens: int | None = None) -> ForwardFlops:
    """Matmul FLOPs of a latent-cached step (MDLMDenoiser.latent_hidden) of an MLA model.

    refreshed: sequences recomputed whole (a forward, plus each position's latent computed again for the cache);
    partial: sequences recomputed at `positions` positions in all (padding included), whose queries attend in the
    absorbed form over seq_len cached latents. head_tokens: positions the head runs on (default: every position
    recomputed).
    """
    d, h, n = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    nope, rope, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    r_q, r_kv = config.q_lora_rank, config.kv_lora_rank
    full = forward_flops(config, seq_len, refreshed, head_tokens=0)
    q_proj = d * h * (nope + rope) if r_q == 0 else d * r_q + r_q * h * (nope + rope)
    per_position = (
        q_proj
        + d * (r_kv + rope)  # wkv_a: the position's own latent, written to the cache
        + h * nope * r_kv  # the keys' up-projection folded into the query
        + seq_len * h * (r_kv + rope)  # scores over the cached latents and rotary keys
        + seq_len * h * r_kv  # the weighted sum of the latents
        + h * r_kv * dv + h * dv * d  # the values' up-projection, then wo
        + 2 * d * config.intermediate_size  # MLP
    )
    per_seq_block = 6 * d * config.cond_dim if config.modulated else 0
    blocks = full.blocks + 2 * n * d * (r_kv + rope) * seq_len * refreshed  # the refresh's second wkv_a
    blocks += 2 * n * (per_position * positions + per_seq_block * partial)
    head_positions = refreshed * seq_len + positions if head_tokens is None else head_tokens
    head = 2 * d * config.padded_vocab_size * head_positions
    other = forward_flops(config, seq_len, refreshed + partial).other  # time embedding, final adaLN
    return ForwardFlops(blocks=blocks, head=head, other=other)


def training_flops_per_token(config: DenoiserConfig, seq_len: int, masked_fraction: float) -> float:
    """FLOPs a training step executes per token: 3 x forward, the head at the masked fraction of positions."""
    fwd = forward_flops(config, seq_len)  # one sequence, the head at every position
    return 3 * (fwd.full - fwd.head * (1 - masked_fraction)) / seq_len


@dataclass
class FlopsTotal:
    """FLOPs of the network calls a sampling run made, in both conventions, with calls per model."""

    blocks_only: int = 0
    full: int = 0  # the head at the positions decoded
    head_everywhere: int = 0  # full, with the head at every position (MDLM's sampler)
    calls: dict[str, int] = field(default_factory=dict)  # model -> batched network calls
    sequences: dict[str, int] = field(default_factory=dict)  # model -> sequences run through it

    def add(self, model: str, flops: ForwardFlops, everywhere: ForwardFlops, sequences: int) -> None:
        self.blocks_only += flops.blocks_only
        self.full += flops.full
        self.head_everywhere += everywhere.full
        self.calls[model] = self.calls.get(model, 0) + 1
        self.sequences[model] = self.sequences.get(model, 0) + sequences


def trace_flops(trace: Iterable[StepRecord], configs: Mapping[str, DenoiserConfig], seq_len: int,
                as_model: str | None = None) -> FlopsTotal:
    """FLOPs of the network calls recorded in a sampler trace (steps served without a call cost nothing).

    as_model: price every call as if that model had made it (e.g. the all-large cost of the same
    run: which sequences need the network at a step does not depend on the model, see sampler.py).
    """
    total = FlopsTotal()
    for record in trace:
        if record.run == 0:
            continue
        name, config = as_model or record.model, configs[as_model or record.model]
        if record.positions_run is None:
            total.add(name, forward_flops(config, seq_len, record.run, head_tokens=record.unmasked),
                      forward_flops(config, seq_len, record.run), record.run)
        else:  # latent-cached: what the step executed
            partial = record.positions_run - record.refreshed * seq_len  # positions of the partial sequences
            counts = (record.refreshed, record.run - record.refreshed, partial)
            total.add(name, latent_cached_flops(config, seq_len, *counts, head_tokens=record.unmasked),
                      latent_cached_flops(config, seq_len, *counts), record.run)
    return total


def names_light_to_heavy(configs: Mapping[str, DenoiserConfig], seq_len: int) -> list[str]:
    """Model names ordered by blocks FLOPs per forward, lightest first (ties keep the given order)."""
    return sorted(configs, key=lambda name: forward_flops(configs[name], seq_len).blocks_only)
