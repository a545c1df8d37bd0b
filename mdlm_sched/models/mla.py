"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434), bidirectional, naive form.

Keys and values come from one compressed latent c_kv = RMSNorm(W_kv_a h) of rank kv_lora_rank (without the
RMSNorm in models converted from multi-head attention, as TransMLA's, where it would break the exact map);
each head up-projects it to a non-rotary key part k_nope and a value v. A separate rotary key
k_pe (qk_rope_head_dim) is computed from h directly and shared by all heads. Queries are either a
full projection (q_lora_rank = 0) or low-rank with their own RMSNorm.

The naive form (forward) decompresses K and V and runs ordinary attention: exact sampling recomputes every
position at every denoising step, and there the "absorbed" form (attention over the latent) would cost about
4x the attention FLOPs at this scale (REFERENCE.md section 4). The latent cache (latent_cache.py) keeps each
position's latent and rotary key across steps and recomputes only a few queries per step; for those,
`absorbed` folds the keys' up-projection into the queries and the values' into the output (DeepSeek-V2's
inference form), so the cached latents are never expanded to full keys and values.
Projections are named by role as in DeepSeek-V3: wq / wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MLADims:
    """Shapes of one MLA layer (HF / DeepSeek field names)."""

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int  # 0 = full-rank query projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def rotary_frequencies(rope_dim: int, theta: float) -> tuple[float, ...]:
    """The standard ladder of rotary frequencies theta^(-2i / rope_dim), i < rope_dim / 2 (radians per position),
    computed in float32 as the tables use them."""
    return tuple((1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))).tolist())


@torch.compiler.disable  # a graph input, not code: inductor would recompute sin/cos per element of q and k
def rotary_cos_sin(seq_len: int, frequencies: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each [seq_len, len(frequencies)], float32 (cached).

    Pair i of the rotated width turns by frequencies[i] radians per position (rotary_frequencies gives the
    standard ladder; a model converted from multi-head attention keeps the frequencies of the pairs it took).
    """
    return _rotary_table(seq_len, tuple(frequencies), torch.device(device))


@lru_cache(maxsize=16)
def _rotary_table(seq_len: int, frequencies: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = torch.tensor(frequencies, dtype=torch.float32, device=device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x [..., d] by position; cos/sin broadcast to x[..., :d/2].

    For x [B, L, H, d] pass cos/sin as [L, 1, d/2].
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # float32 at least
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """Bidirectional MLA over a full sequence: [B, L, hidden] -> [B, L, hidden].

    No dropout on the attention probabilities, as in MDLM's DiT: model.dropout acts on the block's outputs."""

    def __init__(self, dims: MLADims, rms_norm_eps: float = 1e-6, kv_norm: bool = True) -> None:
        super().__init__()
        self.dims = dims
        d, h = dims.hidden_size, dims.num_attention_heads
        if dims.q_lora_rank > 0:
            self.wq_a = nn.Linear(d, dims.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(dims.q_lora_rank, eps=rms_norm_eps)
            self.wq_b = nn.Linear(dims.q_lora_rank, h * dims.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d, h * dims.qk_head_dim, bias=False)
        # One projection gives the latent and the shared rotary key: [d] -> [kv_lora_rank + rope].
        self.wkv_a = nn.Linear(d, dims.kv_lora_rank + dims.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(dims.kv_lora_rank, eps=rms_norm_eps) if kv_norm else nn.Identity()
        self.wkv_b = nn.Linear(dims.kv_lora_rank, h * (dims.qk_nope_head_dim + dims.v_head_dim), bias=False)
        self.wo = nn.Linear(h * dims.v_head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dims = self.dims
        b, l, _ = x.shape
        h, nope, rope, dv = dims.num_attention_heads, dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim

        # Queries and keys are built in [B, L, H, D] layout, the projections' own, and handed to SDPA as
        # [B, H, L, D] views: building them head-major would add a strided copy (reports/h200-sampling).
        q = self.wq_b(self.q_norm(self.wq_a(x))) if dims.q_lora_rank > 0 else self.wq(x)
        q = q.view(b, l, h, dims.qk_head_dim)  # [B, L, H, nope + rope]
        kv_a = self.wkv_a(x)  # [B, L, kv_lora_rank + rope]
        c_kv, k_pe = kv_a.split([dims.kv_lora_rank, rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(b, l, h, nope + dv)  # [B, L, H, nope + dv]
        k_nope, v = kv.split([nope, dv], dim=-1)

        cos, sin = cos[:, None], sin[:, None]  # [L, 1, rope / 2]: the same rotation for every head
        q = torch.cat((q[..., :nope], apply_rotary(q[..., nope:], cos, sin)), dim=-1)
        k_pe = apply_rotary(k_pe[:, :, None], cos, sin)  # [B, L, 1, rope]: one rotary key for all heads
        k = torch.cat((k_nope, k_pe.expand(b, l, h, rope)), dim=-1)  # [B, L, H, nope + rope]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views

        # Bidirectional: no causal mask. SDPA scales by 1/sqrt(qk_head_dim) (q's last dim); the value
        # head dim may differ from it.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, l, h * dv))

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the latent cache keeps of positions x [..., A, d]: the normed latent and the rotated shared key,
        [..., A, kv_lora_rank + rope]; cos/sin [A, rope / 2] or [..., A, rope / 2] at those positions."""
        c_kv, k_pe = self.wkv_a(x).split([self.dims.kv_lora_rank, self.dims.qk_rope_head_dim], dim=-1)
        return torch.cat((self.kv_norm(c_kv), apply_rotary(k_pe, cos, sin)), dim=-1)

    def absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """Attention of the queries of x [n, A, d] over every position's cached latent, [n, A, d] out.

        cos/sin [n, A, rope / 2]: the rotary tables at the queries' positions; cached [n, L, r + rope]: the latent
        (r = kv_lora_rank) and rotated shared key of every position (the queries' own positions included).
        Per head, q_nope . (W_uk c) = (W_uk^T q_nope) . c and the output W_uv (sum_j p_j c_j), so the scores and
        the weighted sum run in the latent space, shared by all heads (one key/value "head" of width r + rope).
        Equal to forward's attention at those positions when the cache holds forward's own latents.
        """
        dims = self.dims
        n, a, _ = x.shape
        h, nope, rope, dv, r = (dims.num_attention_heads, dims.qk_nope_head_dim, dims.qk_rope_head_dim,
                                dims.v_head_dim, dims.kv_lora_rank)
        q = self.wq_b(self.q_norm(self.wq_a(x))) if dims.q_lora_rank > 0 else self.wq(x)
        q_nope, q_pe = q.view(n, a, h, dims.qk_head_dim).split([nope, rope], dim=-1)  # [n, A, H, nope], [.., rope]
        q_pe = apply_rotary(q_pe, cos[:, :, None], sin[:, :, None])
        w_uk, w_uv = self.wkv_b.weight.view(h, nope + dv, r).split([nope, dv], dim=1)  # [H, nope, r], [H, dv, r]
        q_latent = torch.einsum("nahd,hdr->nhar", q_nope, w_uk.to(q_nope.dtype))  # [n, H, A, r]
        query = torch.cat((q_latent, q_pe.transpose(1, 2).to(q_latent.dtype)), dim=-1)  # [n, H, A, r + rope]
        keys = cached.to(query.dtype)[:, None].expand(n, h, -1, -1)  # [n, H, L, r + rope], a view
        # The scale is the naive form's 1/sqrt(nope + rope): the scores are the same numbers.
        o_latent = F.scaled_dot_product_attention(query, keys, keys[..., :r], scale=dims.qk_head_dim ** -0.5)
        out = torch.einsum("nhar,hdr->nahd", o_latent, w_uv.to(o_latent.dtype))  # [n, A, H, dv]
        return self.wo(out.reshape(n, a, h * dv))
