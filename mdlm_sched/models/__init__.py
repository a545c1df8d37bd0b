"""Model construction from a RunConfig: the MLA denoiser (mdlm) or the GPT-2 judge (gpt2)."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from mdlm_sched.config import RunConfig
from mdlm_sched.errors import ConfigError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser


# ModelConfig fields that DenoiserConfig takes under the same name.
_SHARED_MDLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                       "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "dropout", "time_conditioning",
                       "cond_dim", "vocab_pad_multiple")


def model_vocab_size(cfg: RunConfig, tokenizer_len: int) -> int:
    """Vocabulary of the model: the tokenizer's, plus [MASK] for an mdlm; checked against model.vocab_size."""
    needed = tokenizer_len + 1 if cfg.model.arch == "mdlm" else tokenizer_len
    given = cfg.model.vocab_size
    if given is not None and given != needed:
        extra = " + 1 for [MASK]" if cfg.model.arch == "mdlm" else ""
        raise ConfigError(f"model.vocab_size={given} does not fit the tokenizer ({tokenizer_len} tokens{extra} "
                          f"= {needed}); set model.vocab_size={needed} or null")
    return needed


def build_model(cfg: RunConfig, tokenizer_len: int, eos_id: int, tok_hash: str) -> PreTrainedModel:
    """A freshly initialised model for cfg.model (float32 weights)."""
    m = cfg.model
    vocab = model_vocab_size(cfg, tokenizer_len)
    if m.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=m.max_seq_len, n_embd=m.hidden_size, n_layer=m.num_hidden_layers,
            n_head=m.num_attention_heads, n_inner=m.mlp_ratio * m.hidden_size, resid_pdrop=m.dropout,
            embd_pdrop=m.dropout, attn_pdrop=m.dropout, bos_token_id=eos_id, eos_token_id=eos_id,
            tokenizer_hash=tok_hash,
        )
        return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    config = DenoiserConfig(
        **{name: getattr(m, name) for name in _SHARED_MDLM_FIELDS},
        vocab_size=vocab,
        mask_token_id=tokenizer_len,  # [MASK] is appended after the tokenizer's vocabulary
        max_position_embeddings=m.max_seq_len,
        tokenizer_hash=tok_hash,
        intermediate_size=m.mlp_ratio * m.hidden_size,
        noise_schedule=cfg.noise.schedule,
        noise_eps=cfg.noise.eps,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return MDLMDenoiser(config)
