"""The MDLM denoiser: a bidirectional transformer, as a Hugging Face model, with the attention kind as
configuration: Multi-head Latent Attention (attention="mla", the project's models) or multi-head /
grouped-query attention with a fused qkv projection (attention="mha", MDLM's DiT).

Backbone features follow MDLM's DiT (REFERENCE.md section 2): rotary positions, pre-norm blocks
without norm biases, MLP ratio 4 and GELU-tanh, dropout, and adaLN modulation.

Two blocks (docs/models.md):
- gated (ada_ln=True or time_conditioning; the presets' default): DiT's adaLN-Zero block. A per-block
  Linear(cond_dim, 6 d) gives a shift, a scale and a gate for each residual branch,
  h + gate * branch(norm(h) * (1 + scale) + shift); it is zero-initialised, so every block starts as the
  identity and each branch's contribution is learned from zero. The final norm is modulated the same way
  (shift and scale). The conditioning comes from the noise level when time_conditioning is on; MDLM's DiT
  keeps the layers when it is off and feeds them sigma = 0, so the gates are learned constants.
- plain (ada_ln=False, no time conditioning): h + branch(norm(h)), kept for ablations and for models
  saved before the gated block became the default.
Without time conditioning the network ignores t, which is what lets a sampler reuse a prediction when a
step unmasks nothing.

Input: token ids x_t [B, L] (with [MASK] = mask_token_id). Output: logits [B, L, vocab_size] of
p(x_0 | x_t); the SUBS parameterisation (no [MASK] predictions, carry-over) lives in diffusion.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from mdlm_sched.architecture import Architecture
from mdlm_sched.diffusion import masked_nll
from mdlm_sched.models.head_loss import fused_head_nll
from mdlm_sched.models.latent_steps import LatentCacheSteps
from mdlm_sched.models.mha import GroupedQueryAttention
from mdlm_sched.models.mla import MLADims, MultiHeadLatentAttention, rotary_cos_sin, rotary_frequencies


@dataclass(frozen=True)
class Interface:
    """What denoisers sharing a sampling schedule must agree on: one field per requirement.

    The same tokenizer (hash of its vocabulary), vocabulary and [MASK] id, so that tokens mean the same;
    the same length; the same forward process; and the same time conditioning, so that a cached
    prediction is valid for every model or for none.
    """

    tokenizer_hash: str
    vocab_size: int
    mask_token_id: int
    max_position_embeddings: int
    noise_schedule: str
    noise_eps: float
    time_conditioning: bool


class DenoiserConfig(PreTrainedConfig):
    """Config of the denoiser. Every field is saved in config.json.

    The architecture's fields (architecture.Architecture: width, depth, attention, MLA widths, dropout, time
    conditioning, the block) are taken by name with its defaults, but for ada_ln, whose default here is False:
    a config.json without the field was written before the gated block existed and describes plain blocks;
    every model saved now writes it. The other fields:

    Args:
        vocab_size: tokenizer vocabulary + 1 ([MASK] is the last id): 50258 for GPT-2.
        mask_token_id: id of [MASK] (50257 for GPT-2).
        max_position_embeddings: the sequence length the model is trained and sampled at.
        tokenizer_hash: sha256 of the tokenizer's vocabulary (data.tokenizer_hash); models that
            disagree on it cannot share a sampling schedule.
        intermediate_size: MLP hidden width (MDLM: 4 x hidden_size).
        rope_theta: rotary base.
        rope_frequencies: the rotary pairs' frequencies (radians per position), one per pair; None = the
            standard ladder from rope_theta. Set by convert-mla, which keeps the source's frequencies.
        noise_schedule, noise_eps: the forward process the model was trained with.
    """

    model_type = "mdlm_mla"
    _SAVED_DEFAULTS = {"ada_ln": False}  # defaults that differ from Architecture's for configs saved earlier

    def __init__(
        self,
        vocab_size: int = 50258,
        mask_token_id: int = 50257,
        max_position_embeddings: int = 1024,
        tokenizer_hash: str = "",
        intermediate_size: int = 3072,
        rope_theta: float = 10000.0,
        rope_frequencies: list[float] | None = None,
        rms_norm_eps: float = 1e-6,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        noise_schedule: str = "loglinear",
        noise_eps: float = 1e-3,
        **kwargs,
    ) -> None:
        for f in fields(Architecture):
            setattr(self, f.name, kwargs.pop(f.name, self._SAVED_DEFAULTS.get(f.name, f.default)))
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.max_position_embeddings = max_position_embeddings
        self.tokenizer_hash = tokenizer_hash
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rope_frequencies = rope_frequencies
        self.rms_norm_eps = rms_norm_eps
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.noise_schedule = noise_schedule
        self.noise_eps = noise_eps
        super().__init__(**kwargs)

    @property
    def mla_dims(self) -> MLADims:
        return MLADims(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )

    @property
    def modulated(self) -> bool:
        """Whether the blocks and the final norm have adaLN layers (from sigma, or from sigma = 0)."""
        return self.time_conditioning or self.ada_ln

    @property
    def rope_dim(self) -> int:
        """Width that rotary embeddings act on: MLA's rotary key part, or the whole head of "mha"."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.hidden_size // self.num_attention_heads

    @property
    def rotary_frequencies(self) -> tuple[float, ...]:
        """One frequency per rotated pair (rope_dim / 2): rope_frequencies, else the ladder from rope_theta."""
        if self.rope_frequencies is not None:
            return tuple(self.rope_frequencies)
        return rotary_frequencies(self.rope_dim, self.rope_theta)

    @property
    def kv_cache_elements(self) -> int:
        """Key/value elements per token and block that a KV cache would hold: K and V of every kv head (MHA/GQA),
        or the latent plus the shared rotary key (MLA; REFERENCE.md section 4)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)

    @property
    def interface(self) -> Interface:
        """The fields a schedule's models must share (modelset.check_compatible compares them)."""
        return Interface(**{f.name: getattr(self, f.name) for f in fields(Interface)})

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m


class TimestepEmbedding(nn.Module):
    """sigma [B] -> conditioning vector [B, cond_dim] (sinusoidal features, then an MLP)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        dtype = torch.promote_types(torch.float32, self.mlp[0].weight.dtype)  # float32, or float64 for a float64 model
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=dtype) / half)
        args = sigma.to(dtype)[:, None] * freqs[None]
        return self.mlp(torch.cat((args.cos(), args.sin()), dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, d] scaled and shifted per sequence by shift, scale [B, d]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DenoiserBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); gated (adaLN-Zero) when config.modulated."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)
        if config.attention == "mla":
            self.attn = MultiHeadLatentAttention(config.mla_dims, rms_norm_eps=config.rms_norm_eps,
                                                 kv_norm=config.kv_norm)
        else:
            self.attn = GroupedQueryAttention(d, config.num_attention_heads, config.num_key_value_heads)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.intermediate_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.intermediate_size, d),
        )
        self.dropout = nn.Dropout(config.dropout)
        # Shift, scale and gate for the attention and the MLP branch, from the time embedding.
        self.ada_ln = nn.Linear(config.cond_dim, 6 * d) if config.modulated else None
        self.fixed_modulation: torch.Tensor | None = None  # [1, 6d] in place of ada_ln (MDLMDenoiser.fold_modulation)
        self.attn.wo.init_role = self.mlp[2].init_role = "residual"
        if self.ada_ln is not None:
            self.ada_ln.init_role = "zero"

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on x [B, L, d]. Without autograd on a GPU (sampling, evaluation), the first linear, its
        bias and the GELU run as one cuBLASLt matmul with a GELU epilogue: the [B, L, 4d] activations
        are written once instead of being read back for the GELU (reports/h200-sampling)."""
        if not x.is_cuda or torch.is_grad_enabled():  # the fused op has no backward
            return self.mlp(x)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        h = torch._addmm_activation(fc1.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype),
                                    fc1.weight.to(dtype).t(), use_gelu=True)  # [B * L, 4d]
        return fc2(h.view(*x.shape[:-1], -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cond: torch.Tensor | None,
                attend: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d]. attend: the attention branch on its normed input, in place of self.attn over x's
        own positions (the latent cache's, whose queries attend over cached latents)."""
        if self.ada_ln is None:
            h = self.norm1(x)
            x = x + self.dropout(self.attn(h, cos, sin) if attend is None else attend(h))
            return x + self.dropout(self._mlp(self.norm2(x)))
        modulation = self.ada_ln(cond) if self.fixed_modulation is None else self.fixed_modulation  # [B or 1, 6d]
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.dropout(self.attn(h, cos, sin) if attend is None else attend(h))
        return x + gate2[:, None] * self.dropout(self._mlp(modulate(self.norm2(x), shift2, scale2)))


class DenoiserPreTrainedModel(PreTrainedModel):
    config_class = DenoiserConfig
    base_model_prefix = "denoiser"
    _no_split_modules = ["DenoiserBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Roles are marked on the Linear itself: transformers initialises each parameter once, at
        # the innermost module, so a parent cannot re-initialise its children afterwards.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init_role = getattr(module, "init_role", "default")
            if init_role == "zero":  # DiT: adaLN modulation starts at identity (and the head at zero logits)
                init.zeros_(module.weight)
            elif init_role == "residual":  # GPT-2 / nanoGPT: residual outputs scaled by 1/sqrt(2 n_layer)
                init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)


class MDLMDenoiser(DenoiserPreTrainedModel, LatentCacheSteps):
    """Bidirectional MLA transformer: x_t [B, L] (+ sigma [B] if time-conditioned) -> logits [B, L, V]."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.time_embed = TimestepEmbedding(config.cond_dim) if config.modulated else None
        self.blocks = nn.ModuleList(DenoiserBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_final = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)
        self.final_ada_ln = nn.Linear(config.cond_dim, 2 * d) if config.modulated else None
        self.fixed_final_modulation: torch.Tensor | None = None  # [1, 2d] (fold_modulation)
        if self.final_ada_ln is not None:
            self.final_ada_ln.init_role = "zero"
        # Padded rows of the head are real parameters but their logits are cut off before returning.
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=config.head_bias)
        if config.zero_head:
            self.lm_head.init_role = "zero"
        self.post_init()

    def hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d] (after the last norm and adaLN), before the output head.

        sigma [B] is the noise level sigma(t), used only when config.time_conditioning is on.
        Samplers call this and then the head on the few positions they decode.
        """
        b, l = input_ids.shape
        if l > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {l} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        cond = self._conditioning(b, sigma, input_ids.device)
        cos, sin = rotary_cos_sin(l, self.config.rotary_frequencies, input_ids.device)
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, cond)
        return self._final_norm(x, cond)

    def _conditioning(self, b: int, sigma: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The adaLN conditioning [b, cond_dim] (None without adaLN layers)."""
        if self.config.time_conditioning and sigma is None:
            raise ValueError("this model is time-conditioned: pass sigma [B]")
        if self.time_embed is None or self.fixed_final_modulation is not None:  # no adaLN, or folded
            return None
        if not self.config.time_conditioning:  # MDLM's DiT without time conditioning: sigma = 0, a constant
            sigma = torch.zeros((), device=device)
        return F.silu(self.time_embed(sigma.expand(b)))

    def _final_norm(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_final(x)
        if self.final_ada_ln is not None:
            modulation = self.final_ada_ln(cond) if self.fixed_final_modulation is None else self.fixed_final_modulation
            shift, scale = modulation.chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return x

    def fold_modulation(self) -> bool:
        """Compute every block's and the final norm's adaLN shifts, scales and gates once, for sampling.

        Without time conditioning the conditioning is that of sigma = 0, so these are constants of the weights; a
        forward then skips the time embedding and the adaLN matmuls, one per block and one for the final norm (at
        batch 1 a small kernel each). Call it under the autocast that the forwards run in, so that the folded
        values are those a forward computes. For frozen weights only: nothing recomputes them when the weights change.
        Returns False (and folds nothing) for a time-conditioned model or one without adaLN.
        """
        if self.time_embed is None or self.config.time_conditioning:
            return False
        with torch.no_grad():
            cond = self._conditioning(1, None, self.device)  # [1, cond_dim]
            for block in self.blocks:
                block.fixed_modulation = block.ada_ln(cond)
            self.fixed_final_modulation = self.final_ada_ln(cond)
        return True

    def logits_from_hidden(self, hidden: torch.Tensor, head_fp32: bool = True) -> torch.Tensor:
        """Output head: hidden [..., d] -> logits [..., vocab_size], float32 when head_fp32."""
        if head_fp32:
            bias = self.lm_head.bias.float() if self.lm_head.bias is not None else None
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                logits = F.linear(hidden.float(), self.lm_head.weight.float(), bias)
        else:
            logits = self.lm_head(hidden)
        return logits[..., : self.config.vocab_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        sigma: torch.Tensor | None = None,
        head_fp32: bool = True,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_kernel: str = "torch",
    ) -> torch.Tensor:
        """Logits of p(x_0 | x_t) [B, L, vocab_size], float32 when head_fp32 (the default).

        head_fp32=False keeps the output head in the autocast dtype (training throughput);
        sampling and evaluation keep the default float32 head (REFERENCE.md section 3).
        positions: flat indices [M] into the B * L positions; the head then runs only there and the
        logits are [M, vocab_size] (the NELBO needs them at the masked positions only).
        targets [M] (with positions): the clean tokens there; the output is then -log p(targets) [M] under SUBS,
        float32, from the head and cross-entropy of loss_kernel (config.LOSS_KERNELS; the fused ones never
        write out the logits, and take the autocast dtype whatever head_fp32 says).
        """
        hidden = self.hidden(input_ids, sigma)  # [B, L, d]
        if positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, positions)  # [M, d]
        if targets is None:
            return self.logits_from_hidden(hidden, head_fp32)
        if loss_kernel == "torch":
            return masked_nll(self.logits_from_hidden(hidden, head_fp32), targets, self.config.mask_token_id)
        return fused_head_nll(hidden, self.lm_head.weight, self.lm_head.bias, targets, self.config.vocab_size,
                              self.config.mask_token_id, loss_kernel)


AutoConfig.register(DenoiserConfig.model_type, DenoiserConfig, exist_ok=True)
AutoModel.register(DenoiserConfig, MDLMDenoiser, exist_ok=True)
AutoModelForMaskedLM.register(DenoiserConfig, MDLMDenoiser, exist_ok=True)
