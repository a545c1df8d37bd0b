"""The MLA layer against a float64 reference, the denoiser's HF round trip, and analytic FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from mdlm_sched.flops import forward_flops, training_flops_per_token
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.mla import MLADims, MultiHeadLatentAttention, rotary_cos_sin, rotary_frequencies
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.objectives import MDLMObjective


def reference_mla(layer: MultiHeadLatentAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """The same maths written out in float64 with einsum and an explicit softmax."""
    dims = layer.dims
    h, nope, rope, dv = dims.num_attention_heads, dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim
    W = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    b, l, _ = x.shape

    def rms(v, w, eps=1e-6):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w

    def rotate(v):  # v [..., l, rope]: pair i of (first half, second half) turns by pos * theta^(-2i/rope)
        pos = torch.arange(l, dtype=torch.float64)[:, None]
        ang = pos * theta ** (-torch.arange(0, rope, 2, dtype=torch.float64) / rope)[None]
        a, c = v[..., : rope // 2], v[..., rope // 2:]
        return torch.cat([a * ang.cos() - c * ang.sin(), a * ang.sin() + c * ang.cos()], -1)

    if dims.q_lora_rank > 0:
        q = torch.einsum("blr,qr->blq", rms(torch.einsum("bld,rd->blr", x, W["wq_a.weight"]), W["q_norm.weight"]),
                         W["wq_b.weight"])
    else:
        q = torch.einsum("bld,qd->blq", x, W["wq.weight"])
    q = q.view(b, l, h, nope + rope)
    kv_a = torch.einsum("bld,kd->blk", x, W["wkv_a.weight"])
    c_kv, k_pe = kv_a[..., : dims.kv_lora_rank], kv_a[..., dims.kv_lora_rank:]
    kv = torch.einsum("blr,kr->blk", rms(c_kv, W["kv_norm.weight"]), W["wkv_b.weight"]).view(b, l, h, nope + dv)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_full = torch.cat([q[..., :nope], rotate(q[..., nope:].transpose(1, 2)).transpose(1, 2)], -1)
    k_rot = rotate(k_pe)[:, :, None, :].expand(b, l, h, rope)
    k_full = torch.cat([k_nope, k_rot], -1)
    scores = torch.einsum("bihd,bjhd->bhij", q_full, k_full) / math.sqrt(nope + rope)
    att = torch.exp(scores - scores.amax(-1, keepdim=True))
    att = att / att.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bjhd->bihd", att, v).reshape(b, l, h * dv)
    return torch.einsum("blv,dv->bld", out, W["wo.weight"])


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_matches_float64_reference(q_lora_rank: int) -> None:
    torch.manual_seed(0)
    dims = MLADims(hidden_size=48, num_attention_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=20,
                   qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14)  # qk head dim 16 != value dim 14
    layer = MultiHeadLatentAttention(dims)
    for p in layer.parameters():  # norms away from 1 so that their weights matter
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 11, 48)
    cos, sin = rotary_cos_sin(11, rotary_frequencies(6, 10000.0), x.device)
    out = layer(x, cos, sin)
    ref = reference_mla(layer, x, 10000.0)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


def test_denoiser_is_bidirectional_and_cuts_padding(tiny_denoiser_kwargs: dict) -> None:
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs)).eval()
    assert model.lm_head.out_features == 384  # 300 padded to a multiple of 128
    x = torch.randint(0, 299, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 299
    a, b = model(x), model(y)
    assert a.shape == (1, 16, 300) and a.dtype == torch.float32
    assert not torch.allclose(a[0, 0], b[0, 0])  # a later token changes the first position's prediction


def test_time_conditioning(tiny_denoiser_kwargs: dict) -> None:
    torch.manual_seed(0)
    plain = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs)).eval()
    x = torch.randint(0, 299, (2, 16))
    assert torch.equal(plain(x, sigma=torch.tensor([0.1, 0.1])), plain(x, sigma=torch.tensor([3.0, 3.0])))
    cond = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs, time_conditioning=True)).eval()
    assert torch.equal(cond.blocks[0].ada_ln.weight, torch.zeros_like(cond.blocks[0].ada_ln.weight))  # DiT init
    torch.nn.init.normal_(cond.blocks[0].ada_ln.weight, std=0.1)
    assert not torch.allclose(cond(x, sigma=torch.tensor([0.1, 0.1])), cond(x, sigma=torch.tensor([3.0, 3.0])))
    with pytest.raises(ValueError, match="sigma"):
        cond(x)


def test_nelbo_with_the_head_at_masked_positions_equals_the_full_head_nelbo(tiny_denoiser_kwargs: dict) -> None:
    """The objective runs the head only where x_t is masked; value and gradients match the NELBO written out
    over every position (float64 log-softmax without the [MASK] column, weight 1/t, 0 where unmasked)."""
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs, time_conditioning=True)).double()
    for block in model.blocks:  # adaLN away from its zero init, so that sigma matters
        torch.nn.init.normal_(block.ada_ln.weight, std=0.05)
    objective = MDLMObjective(LogLinearNoise(1e-3), mask_id=299, sampling_eps=1e-3)
    x0 = torch.randint(0, 299, (6, 32))
    x0, xt, t = objective.prepare(x0, torch.Generator().manual_seed(3))
    masked = xt == 299
    assert 0 < masked.sum() < masked.numel()

    loss = objective.loss(model, x0, xt, t, training=True)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    logits = model(xt, sigma=objective.noise.sigma(t), head_fp32=False)  # [B, L, V] float64: the head everywhere
    log_p = logits[..., :299].log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # [MASK] column left out
    ref = torch.where(masked, -log_p / t[:, None], torch.zeros_like(log_p)).mean()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    # the objective's cross-entropy runs in float32 (forbid_mask), hence float32 tolerances
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_save_load_identical_logits_and_auto_classes(tmp_path, tiny_denoiser_kwargs: dict,
                                                     time_conditioning: bool) -> None:
    torch.manual_seed(0)
    config = DenoiserConfig(**tiny_denoiser_kwargs, time_conditioning=time_conditioning, tokenizer_hash="abc123")
    model = MDLMDenoiser(config).eval()
    for p in model.parameters():  # no zero-initialised weights left, so every tensor must round-trip
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 299, (2, 32))
    sigma = torch.tensor([0.5, 2.0])
    before = model(x, sigma=sigma)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    assert AutoConfig.from_pretrained(tmp_path).tokenizer_hash == "abc123"
    for auto in (AutoModelForMaskedLM, AutoModel):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MDLMDenoiser)
        assert loaded.config.mask_token_id == 299 and loaded.config.max_position_embeddings == 32
        assert torch.equal(loaded(x, sigma=sigma), before)


def _counted_flops(model: MDLMDenoiser, x: torch.Tensor, sigma: torch.Tensor) -> int:
    # The math SDPA backend runs attention as matrix products, which the flop counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, sigma=sigma)
    return counter.get_total_flops()


def test_flops_with_the_head_at_some_positions_match_flop_counter(tiny_denoiser_kwargs: dict) -> None:
    """forward(positions=...) runs the head at M positions only; training_flops_per_token prices it there."""
    config = DenoiserConfig(**tiny_denoiser_kwargs)
    model = MDLMDenoiser(config).eval()
    x = torch.randint(0, 299, (3, 32))
    positions = torch.tensor([0, 5, 40, 95])  # 4 of the 96 positions
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(x, positions=positions)
    assert logits.shape == (4, 300)
    analytic = forward_flops(config, 32, 3, head_tokens=4)
    assert abs(analytic.full - counter.get_total_flops()) / counter.get_total_flops() < 0.01
    assert forward_flops(config, 32, 3).full - analytic.full == 2 * 64 * 384 * 92  # d x padded V, 92 positions fewer
    per_token = training_flops_per_token(config, 32, masked_fraction=4 / 96)
    assert per_token * 96 == pytest.approx(3 * analytic.full, rel=1e-12)


@pytest.mark.parametrize("overrides", [
    {},
    {"q_lora_rank": 16},
    {"time_conditioning": True},
    {"num_hidden_layers": 3, "num_attention_heads": 2, "kv_lora_rank": 40, "v_head_dim": 20, "qk_rope_head_dim": 4},
    {"attention": "mha"},  # MDLM's DiT: multi-head, adaLN from sigma = 0, head bias
    {"attention": "mha", "num_key_value_heads": 2, "ada_ln": True, "head_bias": True},
    {"attention": "mha", "num_key_value_heads": 1, "time_conditioning": True},
])
def test_analytic_flops_match_flop_counter(tiny_denoiser_kwargs: dict, overrides: dict) -> None:
    config = DenoiserConfig(**{**tiny_denoiser_kwargs, **overrides})
    model = MDLMDenoiser(config).eval()
    for seq_len, batch in ((32, 2), (17, 3)):
        x = torch.randint(0, 299, (batch, seq_len))
        counted = _counted_flops(model, x, torch.rand(batch))
        analytic = forward_flops(config, seq_len, batch)
        assert abs(analytic.full - counted) / counted < 0.01, (analytic, counted)
        assert analytic.blocks_only < analytic.full


def test_every_architecture_field_of_the_model_section_reaches_the_saved_config() -> None:
    """The architecture is declared once (architecture.Architecture): each of its fields, set in a run's model
    section to a value other than its default, is what the built model's config.json says."""
    from dataclasses import fields

    from mdlm_sched.architecture import Architecture
    from mdlm_sched.config import RunConfig
    from mdlm_sched.models import denoiser_config

    cfg = RunConfig()
    other = {bool: lambda v: not v, int: lambda v: v + 3, float: lambda v: v / 2, str: lambda v: "mha"}
    want = {f.name: other[type(f.default)](f.default) for f in fields(Architecture)}
    for name, value in want.items():
        setattr(cfg.model, name, value)
    saved = DenoiserConfig.from_dict(denoiser_config(cfg, 299, 0, "hash").to_dict())
    assert {name: getattr(saved, name) for name in want} == want
    assert DenoiserConfig.from_dict({}).ada_ln is False  # a config.json from before the gated block: plain blocks
