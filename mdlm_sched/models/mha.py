"""Multi-head and grouped-query attention with a fused qkv projection, bidirectional: MDLM's DiT attention.

The fused projection's output is laid out [q of every head, k of every kv head, v of every kv head]
(MDLM's `attn_qkv`, 'b s (three h d)' for multi-head). Rotary embeddings act on the whole head
width of q and k, rotating the pairs (x[..., i], x[..., i + d/2]) (flash-attn's non-interleaved
rotary, which MDLM uses). With fewer key/value heads than query heads, query head i reads kv head
i // (heads / kv_heads), as in Llama-style GQA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdlm_sched.models.mla import apply_rotary


class GroupedQueryAttention(nn.Module):
    """[B, L, hidden] -> [B, L, hidden]; num_key_value_heads = num_attention_heads is multi-head attention.

    No dropout on the attention probabilities, as in MDLM's DiT: model.dropout acts on the block's outputs."""

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = num_attention_heads, num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.qkv = nn.Linear(hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden]; cos, sin [L, head_dim / 2]."""
        b, l, _ = x.shape
        h, kvh, hd = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * hd, kvh * hd, kvh * hd], dim=-1)
        cos, sin = cos[:, None], sin[:, None]  # [L, 1, hd / 2]: the same rotation for every head
        q = apply_rotary(q.view(b, l, h, hd), cos, sin).transpose(1, 2)  # [B, H, L, hd]
        k = apply_rotary(k.view(b, l, kvh, hd), cos, sin).transpose(1, 2)  # [B, KVH, L, hd]
        v = v.view(b, l, kvh, hd).transpose(1, 2)  # [B, KVH, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=kvh != h)  # [B, H, L, hd]
        return self.wo(out.transpose(1, 2).reshape(b, l, h * hd))
