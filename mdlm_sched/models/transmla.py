"""TransMLA (arXiv 2502.07864) for masked diffusion LMs: a multi-head / grouped-query attention denoiser
(attention="mha") rewritten as Multi-head Latent Attention, the rest of the network kept as it was.

Per block, with H query heads, G key/value heads of width hd, rotary on every pair (i, i + hd/2) of a head at
frequency f_i, and the attention input's second moment S = E[x x^T] (identity without calibration data):

1. RoRoPE. For each frequency i, the G heads' 2-vectors k_g[pair i] are mixed by an orthogonal G x G matrix U_i,
   the principal axes of their second moment, largest first. A mix across heads commutes with the rotation of a
   pair, so the mixed key k'_c = sum_g U_i[g, c] k_g is still rotated at f_i, and query head j (kv head g(j))
   reaches it with weight U_i[g(j), c]: nothing changes yet.
2. Partial RoPE. rope_dim / 2 (axis c, frequency i) pairs become the shared rotary key k_pe, at their own
   frequencies, chosen by MHA2MLA's 2-norm score ||q|| ||k|| (arXiv 2502.14837): the model has one rotary table,
   so the blocks' scores are summed into one count per frequency, and each block keeps, for frequency i, its
   counts[i] axes of largest score. The rest of each kv head's key, k_nope_g[pair i] = sum over the axes c not
   kept of U_i[g, c] k'_c, loses its rotation: the lossy step, unless every pair is kept (rope_dim = G * hd).
3. Latent. z = [k_nope of every kv head (G*hd); values (G*hd)] = W_z x is compressed to kv_lora_rank by PCA of
   W_z S W_z^T, keys first scaled to the values' energy (TransMLA's balanced KV PCA). Each query head
   up-projects its kv head's k_nope and v from the latent. At rank 2 * G * hd the PCA basis is complete: exact.

The converted layer has no latent RMSNorm (kv_norm=False): it would rescale the source's keys and values.
Queries are full rank: head j's query is [q_j (hd, against k_nope); the kept pairs of q_j, weighted by
U_i[g(j), c] (rope_dim, against k_pe)], scaled by sqrt((hd + rope_dim) / hd) because attention divides by the
square root of the query-key width, which grows from hd to hd + rope_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mdlm_sched.errors import ConfigError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser


@dataclass(frozen=True)
class ConvertedLayer:
    """The MLA attention weights of one block (float64)."""

    wq: torch.Tensor  # [H * (hd + rope), d]
    wkv_a: torch.Tensor  # [rank + rope, d]
    wkv_b: torch.Tensor  # [H * (hd + hd), rank]


def check_conversion(config: DenoiserConfig, kv_lora_rank: int, rope_dim: int) -> None:
    """Raise ConfigError (one line, with the fix) unless `config` can be converted at these settings."""
    if config.attention == "mla":
        raise ConfigError("the source model already uses Multi-head Latent Attention; convert-mla takes a model "
                          "with attention=mha (MDLM's DiT, multi-head or grouped-query)")
    hd = config.hidden_size // config.num_attention_heads
    width = config.num_key_value_heads * hd  # per token, of the keys and of the values each
    if rope_dim <= 0 or rope_dim % 2:
        raise ConfigError(f"--qk-rope-head-dim {rope_dim} must be a positive even number (rotary dims come in "
                          f"pairs); e.g. {min(32, width)}")
    if rope_dim > width:
        raise ConfigError(f"--qk-rope-head-dim {rope_dim} is above the source's key width "
                          f"({config.num_key_value_heads} key/value heads x {hd} = {width}); give at most {width}")
    if not 0 < kv_lora_rank <= 2 * width:
        raise ConfigError(f"--kv-lora-rank {kv_lora_rank} must be in 1..{2 * width}, the source's key + value width "
                          f"per token ({2 * width} is exact at --qk-rope-head-dim {width})")


def _split_qkv(weight: torch.Tensor, heads: int, kv_heads: int, hd: int) -> tuple[torch.Tensor, ...]:
    """The fused projection [(H + 2G) hd, d] -> q [H, hd, d], k [G, hd, d], v [G, hd, d]."""
    q, k, v = weight.split([heads * hd, kv_heads * hd, kv_heads * hd])
    return q.view(heads, hd, -1), k.view(kv_heads, hd, -1), v.view(kv_heads, hd, -1)


def _energy(rows: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E[(r . x)^2] for every row r of rows [..., d] under the input moment [d, d]: [...]."""
    return torch.einsum("...d,de,...e->...", rows, moment, rows)


def _rorope(k: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoRoPE of the keys k [G, hd, d]: per frequency i, the principal axes U_i of the kv heads' key pairs.

    Returns eigenvalues [half, G] and axes [half, G (g), G (c)], largest first, and the mixed keys
    [G (c), 2, half, d] (pair p of frequency i of axis c).
    """
    kv_heads, hd, _ = k.shape
    kp = k.view(kv_heads, 2, hd // 2, -1)  # [G, 2, half, d]: row p * half + i of a head is component p of pair i
    eigval, axes = torch.linalg.eigh(torch.einsum("gpid,de,hpie->igh", kp, moment, kp))  # ascending
    eigval, axes = eigval.flip(-1).clamp_min(0), axes.flip(-1)
    return eigval, axes, torch.einsum("igc,gpid->cpid", axes, kp)


def pair_scores(qkv: torch.Tensor, heads: int, kv_heads: int, moment: torch.Tensor) -> torch.Tensor:
    """MHA2MLA's 2-norm score of each RoRoPE pair of one block: sqrt(E k'^2) * sum_j |U_i[g(j), c]| sqrt(E q_j^2),
    [half, G (c)], from the fused qkv weight [(H + 2G) hd, d] and the input moment [d, d]."""
    hd = qkv.shape[0] // (heads + 2 * kv_heads)
    q, k, _ = _split_qkv(qkv, heads, kv_heads, hd)
    eigval, axes, _ = _rorope(k, moment)
    q_energy = _energy(q.view(heads, 2, hd // 2, -1), moment).sum(1)  # [H, half]
    weight = axes[:, torch.arange(heads) // (heads // kv_heads), :]  # [half, H, G (c)]: U_i[g(j), c]
    return eigval.sqrt() * (weight.abs() * q_energy.t().sqrt()[:, :, None]).sum(1)


def rope_counts(scores: list[torch.Tensor], rope_dim: int) -> torch.Tensor:
    """How many RoRoPE axes each frequency keeps rotary [half], the same in every block (the model has one
    rotary table): the rope_dim / 2 pairs of largest score summed over the blocks, each block's scores
    normalised to sum 1 so that every block counts alike."""
    total = sum(s / s.sum().clamp_min(1e-300) for s in scores)  # [half, G]
    kept = torch.zeros(total.numel(), dtype=torch.long)
    kept[total.flatten().topk(rope_dim // 2).indices] = 1
    return kept.view(total.shape).sum(1)


def convert_layer(qkv: torch.Tensor, heads: int, kv_heads: int, counts: torch.Tensor, scores: torch.Tensor,
                  kv_lora_rank: int, moment: torch.Tensor) -> ConvertedLayer:
    """One block's fused qkv weight [(H + 2G) hd, d] (float64) -> its MLA weights.

    counts [half]: rotary axes kept per frequency (rope_counts); in this block, the counts[i] axes of largest
    score (scores [half, G]: this block's pair_scores) of frequency i are kept. moment: E[x x^T] [d, d] of the
    attention input.
    """
    hd = qkv.shape[0] // (heads + 2 * kv_heads)
    half, rope_dim = hd // 2, 2 * int(counts.sum())
    kv_of = torch.arange(heads) // (heads // kv_heads)  # [H]: the kv head each query head reads
    q, k, v = _split_qkv(qkv, heads, kv_heads, hd)
    qp = q.view(heads, 2, half, -1)  # [H, 2, half, d]
    _, axes, mixed = _rorope(k, moment)
    order = scores.argsort(dim=1, descending=True)  # [half, G]
    kept = torch.arange(kv_heads)[None, :] < counts[:, None]  # [half, G] in score order
    kept = torch.zeros_like(kept).scatter(1, order, kept)  # [half, G (c)]
    fi, fc = kept.nonzero(as_tuple=True)  # kept pairs, by frequency then axis: [rope / 2] each

    # Shared rotary key and its queries, laid out [first halves of the kept pairs; second halves].
    k_pe = mixed[fc, :, fi].transpose(0, 1).reshape(rope_dim, -1)  # [rope, d]
    q_pe = axes[fi, :, fc][:, kv_of]  # [rope / 2, H]: U_i[g(j), c] of each kept pair (i, c) for each head j
    q_pe = (q_pe.t()[:, None, :, None] * qp[:, :, fi]).reshape(heads, rope_dim, -1)  # [H, rope, d]
    dropped = axes * ~kept[:, None, :]  # [half, G, G (c)]: U_i with the kept axes zeroed
    k_nope = torch.einsum("igc,cpid->gpid", dropped, mixed).reshape(kv_heads, hd, -1)  # [G, hd, d]

    # Latent: balanced PCA of z = [k_nope; v] under the input moment.
    k_energy, v_energy = _energy(k_nope, moment).sum(), _energy(v, moment).sum()
    balance = math.sqrt(v_energy / k_energy) if k_energy > 0 else 1.0
    w_z = torch.cat((balance * k_nope.reshape(kv_heads * hd, -1), v.reshape(kv_heads * hd, -1)))  # [2 G hd, d]
    _, basis = torch.linalg.eigh(w_z @ moment @ w_z.t())
    basis = basis.flip(-1)[:, :kv_lora_rank]  # [2 G hd, rank]: principal directions, largest first
    up_k = (basis[: kv_heads * hd] / balance).view(kv_heads, hd, kv_lora_rank)
    up_v = basis[kv_heads * hd:].view(kv_heads, hd, kv_lora_rank)
    wkv_b = torch.cat((up_k[kv_of], up_v[kv_of]), dim=1)  # [H, hd + hd, rank]: per head [k_nope; v]

    scale = math.sqrt((hd + rope_dim) / hd)  # SDPA divides by sqrt(hd + rope), the source by sqrt(hd)
    wq = torch.cat((q, q_pe), dim=1) * scale  # [H, hd + rope, d]
    return ConvertedLayer(wq=wq.reshape(heads * (hd + rope_dim), -1), wkv_a=torch.cat((basis.t() @ w_z, k_pe)),
                          wkv_b=wkv_b.reshape(heads * 2 * hd, kv_lora_rank))


def convert_to_mla(source: MDLMDenoiser, kv_lora_rank: int, rope_dim: int,
                   moments: list[torch.Tensor] | None = None) -> MDLMDenoiser:
    """The MLA denoiser converted from `source` (attention="mha"); moments: per block, E[x x^T] [d, d] of the
    attention input on calibration data (None: identity, the weights alone). Everything but attention is copied."""
    config = source.config
    check_conversion(config, kv_lora_rank, rope_dim)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd, d = config.hidden_size // heads, config.hidden_size
    weights = [block.attn.qkv.weight.detach().double().cpu() for block in source.blocks]
    if moments is None:
        moments = [torch.eye(d, dtype=torch.float64)] * len(weights)
    moments = [m.double().cpu() for m in moments]
    scores = [pair_scores(w, heads, kv_heads, m) for w, m in zip(weights, moments)]
    counts = rope_counts(scores, rope_dim)
    layers = [convert_layer(w, heads, kv_heads, counts, sc, kv_lora_rank, m)
              for w, sc, m in zip(weights, scores, moments)]
    frequencies = [f for f, n in zip(config.rotary_frequencies, counts.tolist()) for _ in range(n)]
    target = DenoiserConfig(**{
        **config.to_dict(), "attention": "mla", "q_lora_rank": 0, "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": hd, "qk_rope_head_dim": rope_dim, "v_head_dim": hd, "kv_norm": False,
        "num_key_value_heads": heads, "rope_frequencies": frequencies})
    with torch.device("meta"):
        model = MDLMDenoiser(target)
    state = {name: t for name, t in source.state_dict().items() if ".attn.qkv." not in name}
    for n, layer in enumerate(layers):
        prefix = f"blocks.{n}.attn."
        state.update({prefix + "wq.weight": layer.wq, prefix + "wkv_a.weight": layer.wkv_a,
                      prefix + "wkv_b.weight": layer.wkv_b})
    dtype = source.lm_head.weight.dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()
