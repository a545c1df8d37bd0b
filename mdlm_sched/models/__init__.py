"""Model construction from a RunConfig: the MLA denoiser (mdlm) or the GPT-2 judge (gpt2)."""

from __future__ import annotations

from dataclasses import fields

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from mdlm_sched.architecture import Architecture
from mdlm_sched.config import RunConfig
from mdlm_sched.errors import ConfigError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser

# The model section's fields that DenoiserConfig takes under the same name: the architecture's.
_SHARED_MDLM_FIELDS = tuple(f.name for f in fields(Architecture))


def model_vocab_size(cfg: RunConfig, tokenizer_len: int) -> int:
    """Vocabulary of the model: the tokenizer's, plus [MASK] for an mdlm; checked against model.vocab_size."""
    needed = tokenizer_len + 1 if cfg.model.arch == "mdlm" else tokenizer_len
    given = cfg.model.vocab_size
    if given is not None and given != needed:
        extra = " + 1 for [MASK]" if cfg.model.arch == "mdlm" else ""
        raise ConfigError(f"model.vocab_size={given} does not fit the tokenizer ({tokenizer_len} tokens{extra} "
                          f"= {needed}); set model.vocab_size={needed} or null")
    return needed


def denoiser_config(cfg: RunConfig, tokenizer_len: int, eos_id: int, tok_hash: str) -> DenoiserConfig:
    """The DenoiserConfig of an mdlm run (its [MASK] appended after the tokenizer's vocabulary)."""
    m = cfg.model
    return DenoiserConfig(**{
        **{name: getattr(m, name) for name in _SHARED_MDLM_FIELDS},
        "vocab_size": model_vocab_size(cfg, tokenizer_len),  # from the tokenizer (model.vocab_size may be null)
        "mask_token_id": tokenizer_len,
        "max_position_embeddings": m.max_seq_len,
        "tokenizer_hash": tok_hash,
        "intermediate_size": m.mlp_ratio * m.hidden_size,
        "noise_schedule": cfg.noise.schedule,
        "noise_eps": cfg.noise.eps,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    })


def build_model(cfg: RunConfig, tokenizer_len: int, eos_id: int, tok_hash: str) -> PreTrainedModel:
    """A freshly initialised model for cfg.model (float32 weights)."""
    m = cfg.model
    if m.arch == "gpt2":
        config = GPT2Config(
            vocab_size=model_vocab_size(cfg, tokenizer_len), n_positions=m.max_seq_len, n_embd=m.hidden_size,
            n_layer=m.num_hidden_layers, n_head=m.num_attention_heads, n_inner=m.mlp_ratio * m.hidden_size,
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, bos_token_id=eos_id,
            eos_token_id=eos_id, tokenizer_hash=tok_hash,
        )
        return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    return MDLMDenoiser(denoiser_config(cfg, tokenizer_len, eos_id, tok_hash))
