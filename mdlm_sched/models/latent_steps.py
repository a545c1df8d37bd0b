"""The latent cache's network steps (MDLMDenoiser's, through this mixin): a refresh, which runs every position
and stores each layer's KV latent and rope key, and a partial step, which runs a few columns and lets their
queries attend over the stored latents in MLA's absorbed form. The sampler's side (which positions to run when)
is mdlm_sched/latent_cache.py.
"""

from __future__ import annotations

import torch

from mdlm_sched.models.mla import MultiHeadLatentAttention, rotary_cos_sin


class LatentCacheSteps:
    """The latent cache's calls of an MLA denoiser; the model supplies config, blocks, embed_tokens, device,
    _conditioning and _final_norm (MDLMDenoiser)."""

    def new_latent_cache(self, batch_size: int, seq_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An empty latent cache [layers, batch_size, seq_len, kv_lora_rank + rope] (MLA models only)."""
        if self.config.attention != "mla":
            raise ValueError("the latent cache needs MLA attention; this model has multi-head attention")
        return torch.zeros((self.config.num_hidden_layers, batch_size, seq_len, self.config.kv_cache_elements),
                           dtype=dtype or self.embed_tokens.weight.dtype, device=self.device)

    def latent_hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor,
                      rows: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states through the latent cache (latent_cache.py), of sequences input_ids [n, L], which are
        rows `rows` [n] of cache [layers, B, L, r + rope].

        positions None: a refresh; every position runs as in `hidden` (the same hidden states [n, L, d]), and the
        cache rows take every layer's latents. positions [n, A]: only those columns run ([n, A, d] out); their
        latents are written into the cache first, then their queries attend over the rows' cached latents
        (MultiHeadLatentAttention.absorbed). A column given twice in a row computes the same values twice.
        The two cases are latent_refresh and latent_partial, which take tensors only, so that torch.compile traces
        each whole (the rotary tables come from a cache of host values that it cannot trace).
        """
        cos, sin = rotary_cos_sin(input_ids.shape[1], self.config.rotary_frequencies, input_ids.device)
        if positions is None:
            return self.latent_refresh(input_ids, sigma, cache, rows, cos, sin)
        return self.latent_partial(input_ids, sigma, cache, rows, positions, cos, sin)

    def latent_refresh(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor,
                       rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """latent_hidden's refresh, given the rotary tables [L, rope / 2]: tensors in, tensors out (compilable)."""
        cond = self._conditioning(input_ids.shape[0], sigma, input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer, block in enumerate(self.blocks):
            def attend(h: torch.Tensor, attn: MultiHeadLatentAttention = block.attn, k: int = layer) -> torch.Tensor:
                cache[k].index_copy_(0, rows, attn.latents(h, cos, sin).to(cache.dtype))
                return attn(h, cos, sin)
            x = block(x, cos, sin, cond, attend)
        return self._final_norm(x, cond)

    def latent_partial(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor,
                       rows: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        """latent_hidden at columns `positions` [n, A], given the rotary tables [L, rope / 2] (compilable)."""
        cond = self._conditioning(input_ids.shape[0], sigma, input_ids.device)
        x = self.embed_tokens(input_ids.gather(1, positions))  # [n, A, d]
        cos, sin = cos[positions], sin[positions]  # [n, A, rope / 2]
        for layer, block in enumerate(self.blocks):
            def attend(h: torch.Tensor, attn: MultiHeadLatentAttention = block.attn, k: int = layer) -> torch.Tensor:
                cache[k][rows[:, None], positions] = attn.latents(h, cos, sin).to(cache.dtype)
                return attn.absorbed(h, cos, sin, cache[k].index_select(0, rows))
            x = block(x, cos, sin, cond, attend)
        return self._final_norm(x, cond)
