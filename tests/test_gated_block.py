"""The gated (adaLN-Zero) block that the MLA presets default to, and per-block validation losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mdlm_sched.config_load import load
from mdlm_sched.errors import CheckpointError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.models.mla import rotary_cos_sin
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.objectives import MDLMObjective, evaluate


def _gated(kwargs: dict, **extra) -> MDLMDenoiser:
    torch.manual_seed(0)
    return MDLMDenoiser(DenoiserConfig(**{**kwargs, "ada_ln": True, **extra})).eval()


def test_gated_block_is_the_identity_at_init(tiny_denoiser_kwargs: dict) -> None:
    """Zero-initialised gates: every block maps the residual stream to itself; a plain block does not."""
    model = _gated(tiny_denoiser_kwargs)
    x = torch.randn(2, 16, 64)
    cos, sin = rotary_cos_sin(16, model.config.rotary_frequencies, x.device)
    cond = torch.nn.functional.silu(model.time_embed(torch.zeros(2)))
    for block in model.blocks:
        assert torch.equal(block(x, cos, sin, cond), x)
    # the final modulation starts at shift = scale = 0: the hidden states are the plain final norm of the embedding
    ids = torch.randint(0, 299, (2, 16))
    torch.testing.assert_close(model.hidden(ids), model.norm_final(model.embed_tokens(ids)), rtol=0, atol=0)
    plain = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs)).eval()
    assert not torch.allclose(plain.blocks[0](x, cos, sin, None), x)


def test_gated_model_shapes_and_gradients_reach_the_gates(tiny_denoiser_kwargs: dict) -> None:
    model = _gated(tiny_denoiser_kwargs).train()
    assert model.blocks[0].ada_ln.weight.shape == (6 * 64, 128) and model.final_ada_ln.weight.shape == (2 * 64, 128)
    ids = torch.randint(0, 299, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 300)
    logits.square().mean().backward()
    # At init only the gates' layers and what comes after them get a gradient through the blocks: the gates start
    # at zero, so a branch's own weights learn only once its gate has moved.
    assert model.blocks[0].ada_ln.bias.grad.abs().sum() > 0


def test_zero_head_starts_every_logit_at_zero(tiny_denoiser_kwargs: dict) -> None:
    model = _gated(tiny_denoiser_kwargs, head_bias=True, zero_head=True)
    assert torch.equal(model(torch.randint(0, 299, (2, 16))), torch.zeros(2, 16, 300))
    assert model(torch.randint(0, 299, (1, 16))).shape == (1, 16, 300)
    assert _gated(tiny_denoiser_kwargs).lm_head.weight.abs().sum() > 0  # the default head is not zero


@pytest.mark.parametrize("preset", ["tiny", "tiny_large", "small", "medium", "large"])
def test_mla_presets_default_to_the_gated_block(preset: str) -> None:
    m = load([f"model={preset}", "data.seq_len=128"]).model
    assert m.attention == "mla" and m.ada_ln and not m.time_conditioning
    assert m.kv_lora_rank + m.qk_rope_head_dim <= 1536 // 4  # at least 4x smaller than the DiT's K and V


def test_gated_save_load_round_trip(tmp_path, tiny_denoiser_kwargs: dict) -> None:
    model = _gated(tiny_denoiser_kwargs, tokenizer_hash="abc")
    for p in model.parameters():  # away from the zero init, so that every tensor must round-trip
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 299, (2, 16))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ada_ln"] is True
    loaded = load_denoiser(tmp_path)
    assert loaded.blocks[0].ada_ln is not None
    assert torch.equal(loaded(ids), model(ids))


def test_plain_folders_load_as_plain_blocks_never_as_gated(tmp_path, tiny_denoiser_kwargs: dict) -> None:
    """A folder saved before the gated block existed has no ada_ln in its config.json: it loads as plain blocks,
    with its own weights. A gated folder whose config lost the field is refused, not loaded half-initialised."""
    torch.manual_seed(0)
    plain = MDLMDenoiser(DenoiserConfig(**tiny_denoiser_kwargs, ada_ln=False)).eval()
    ids = torch.randint(0, 299, (2, 16))
    for folder, model in ((tmp_path / "plain", plain), (tmp_path / "gated", _gated(tiny_denoiser_kwargs))):
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        del config["ada_ln"]  # as written by the versions before the field
        (folder / "config.json").write_text(json.dumps(config))
    loaded = load_denoiser(tmp_path / "plain")
    assert not loaded.config.ada_ln and loaded.blocks[0].ada_ln is None and loaded.time_embed is None
    assert torch.equal(loaded(ids), plain(ids))
    with pytest.raises(CheckpointError, match="ada_ln"):
        load_denoiser(tmp_path / "gated")


def test_block_losses_are_the_per_block_nelbo(tiny_denoiser_kwargs: dict) -> None:
    """Each block's loss is the NELBO of that block alone (same x_t and t); evaluate's mean is the batch loss."""
    model = _gated(tiny_denoiser_kwargs)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    objective = MDLMObjective(LogLinearNoise(1e-3), mask_id=299, sampling_eps=1e-3)
    x0, xt, t = objective.prepare(torch.randint(0, 299, (5, 32)), torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_block = objective.block_losses(model, x0, xt, t)
        alone = torch.stack([objective.loss(model, x0[i:i + 1], xt[i:i + 1], t[i:i + 1], training=False)
                             for i in range(5)])
        batch = objective.loss(model, x0, xt, t, training=False)
    torch.testing.assert_close(per_block, alone, rtol=1e-5, atol=1e-6)
    assert len(set(per_block.tolist())) == 5  # blocks at different t: different losses
    blocks = np.random.default_rng(0).integers(0, 299, (10, 32))
    losses = evaluate(model, objective, blocks, micro_batch_size=5, device=torch.device("cpu"), amp=None, seed=3)
    assert losses.shape == (10,) and losses.dtype == np.float64
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        first = objective.loss(model, *objective.prepare(torch.from_numpy(blocks[:5]), gen), training=False)
    assert losses[:5].mean() == pytest.approx(float(first), rel=1e-5)
    assert float(batch) == pytest.approx(float(per_block.mean()), rel=1e-5)
