"""The denoiser's architecture, declared once: the run config's model section (config.ModelConfig) extends it, and
the saved model config (models.denoiser.DenoiserConfig) takes each of its fields by name with these defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Architecture:
    """Width, depth and attention of the denoiser's transformer, and its block (docs/models.md)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    attention: str = "mla"  # "mla" (Multi-head Latent Attention) or "mha" (MHA/GQA, fused qkv: MDLM's DiT)
    num_key_value_heads: int = 0  # "mha": key/value heads (0 = num_attention_heads)
    q_lora_rank: int = 0  # 0 = full-rank query (attention "mla" only, as are the MLA fields below)
    kv_lora_rank: int = 256  # rank of the joint key/value latent
    qk_nope_head_dim: int = 64  # per-head key part without rotary
    qk_rope_head_dim: int = 32  # rotary key part, shared by all heads
    v_head_dim: int = 64
    kv_norm: bool = True  # RMSNorm on the key/value latent (off in models converted by convert-mla)
    dropout: float = 0.1  # on the attention and MLP outputs (MDLM: 0.1)
    time_conditioning: bool = False  # adaLN modulation from the noise level sigma(t) (MDLM default: off)
    cond_dim: int = 128  # width of the time embedding of the adaLN layers
    # The gated (adaLN-Zero) block of MDLM's DiT, its adaLN layers fed sigma = 0 when not time-conditioned;
    # false = plain pre-norm blocks (ablations).
    ada_ln: bool = True
    head_bias: bool = False  # a bias on the output head (MDLM's DiT)
    zero_head: bool = False  # the output head initialised at zero (MDLM's DiT's final layer; init only)
    vocab_pad_multiple: int = 128  # the output head is padded to a multiple of this; padded logits never leave
