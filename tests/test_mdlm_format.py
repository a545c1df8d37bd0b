"""MDLM's DiT as a denoiser of the project: the backbone against a float64 reference written from MDLM's
published forward pass, the two checkpoint layouts MDLM ships, training, FLOPs and a mixed schedule."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import REPO, TOKENIZER
from mdlm_sched.data import load_tokenizer, tokenizer_hash
from mdlm_sched.errors import CheckpointError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.mdlm_format import load_mdlm
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule

DIM, HEADS, BLOCKS, COND, LENGTH = 32, 4, 2, 16, 24
VOCAB = 50258  # GPT-2 + [MASK]


def mdlm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in MDLM's DiT layout (names under backbone., the rotary buffer included), float64."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2

    state = {"backbone.vocab_embed.embedding": w(VOCAB, DIM),
             "backbone.sigma_map.mlp.0.weight": w(COND, 256), "backbone.sigma_map.mlp.0.bias": w(COND),
             "backbone.sigma_map.mlp.2.weight": w(COND, COND), "backbone.sigma_map.mlp.2.bias": w(COND),
             "backbone.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, DIM // HEADS, 2) / (DIM // HEADS))}
    for i in range(BLOCKS):
        p = f"backbone.blocks.{i}."
        state |= {p + "norm1.weight": 1 + w(DIM), p + "attn_qkv.weight": w(3 * DIM, DIM),
                  p + "attn_out.weight": w(DIM, DIM), p + "norm2.weight": 1 + w(DIM),
                  p + "mlp.0.weight": w(4 * DIM, DIM), p + "mlp.0.bias": w(4 * DIM),
                  p + "mlp.2.weight": w(DIM, 4 * DIM), p + "mlp.2.bias": w(DIM),
                  p + "adaLN_modulation.weight": w(6 * DIM, COND), p + "adaLN_modulation.bias": w(6 * DIM)}
    p = "backbone.output_layer."
    state |= {p + "norm_final.weight": 1 + w(DIM), p + "linear.weight": w(VOCAB, DIM), p + "linear.bias": w(VOCAB),
              p + "adaLN_modulation.weight": w(2 * DIM, COND), p + "adaLN_modulation.bias": w(2 * DIM)}
    return state


def reference_logits(state: dict[str, torch.Tensor], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """MDLM's DiT forward (models/dit.py), written out in float64: [B, L] ids, sigma [B] -> logits [B, L, V]."""
    s = {k[len("backbone."):]: v for k, v in state.items()}
    b, length = x.shape
    hd = DIM // HEADS

    def linear(h, name, bias=True):
        return h @ s[name + ".weight"].T + (s[name + ".bias"] if bias else 0)

    def norm(h, name):  # LayerNorm without bias, eps 1e-5
        return F.layer_norm(h, [DIM]) * s[name + ".weight"]

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.double()[:, None] * freqs[None]
    t_freq = torch.cat([args.cos(), args.sin()], dim=-1)
    c = F.silu(linear(F.silu(linear(t_freq, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # [B, COND]
    angles = torch.outer(torch.arange(length, dtype=torch.float64), s["rotary_emb.inv_freq"].double())
    emb = torch.cat([angles, angles], dim=-1)  # [L, hd]
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rotate_half(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([-t2, t1], dim=-1)

    h = s["vocab_embed.embedding"][x]
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        mods = linear(c, p + "adaLN_modulation")[:, None].chunk(6, dim=2)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        a = norm(h, p + "norm1") * (1 + scale1) + shift1
        q, k, v = linear(a, p + "attn_qkv", bias=False).view(b, length, 3, HEADS, hd).unbind(2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, DIM)
        h = h + gate1 * linear(out, p + "attn_out", bias=False)
        m = norm(h, p + "norm2") * (1 + scale2) + shift2
        h = h + gate2 * linear(F.gelu(linear(m, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=2)
    h = norm(h, "output_layer.norm_final") * (1 + scale) + shift
    return linear(h, "output_layer.linear")


def hf_folder(path, state, time_conditioning: bool):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "mdlm", "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": DIM, "cond_dim": COND,
        "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning}))
    save_file({k: v.float().contiguous() for k, v in state.items()}, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(str(TOKENIZER))
    return tok, tokenizer_hash(tok)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_an_imported_mdlm_dit_computes_mdlms_forward(tmp_path, tokenizer, time_conditioning):
    state = {k: v.float().double() for k, v in mdlm_state().items()}  # the weights as the file holds them
    model = load_mdlm(str(hf_folder(tmp_path / "m", state, time_conditioning)), *tokenizer).model.double()
    assert model.config.attention == "mha" and model.config.ada_ln and model.config.head_bias
    x = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(1))
    x[:, ::3] = VOCAB - 1  # [MASK]
    sigma = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    got = model(x, sigma=sigma if time_conditioning else None, head_fp32=False)  # float64 throughout
    # Without time conditioning MDLM feeds sigma = 0 to the adaLN layers, whatever t is.
    want = reference_logits(state, x, sigma if time_conditioning else torch.zeros(3, dtype=torch.float64))
    assert got.shape == (3, LENGTH, VOCAB)
    # float64 throughout but the rotary tables, which the model keeps in float32 (errors ~1e-7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_sdtt_hub_folder_loads_with_its_hydra_config(tmp_path, tokenizer):
    # jdeschena/sdtt's layout: PyTorchModelHubMixin's config.json is the run's Hydra config (model settings in
    # `model`, time_conditioning at the top) and model.safetensors the whole module's state dict.
    state = {k: v.float().double() for k, v in mdlm_state(seed=3).items()}
    folder = tmp_path / "sdtt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "mode": "train", "time_conditioning": True, "tokenizer": {"name": "gpt2"},
        "model": {"name": "small", "type": "ddit", "hidden_size": DIM, "cond_dim": COND, "length": LENGTH,
                  "n_blocks": BLOCKS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1},
        "parameterization": {"num_distill_steps": 2, "distill_mode": "kl-bwd"}}))
    save_file({**{k: v.float().contiguous() for k, v in state.items()}, "sampling_eps_tensor": torch.tensor(1e-3)},
              folder / "model.safetensors")
    model = load_mdlm(str(folder), *tokenizer).model.double()
    assert model.config.time_conditioning and model.config.max_position_embeddings == LENGTH
    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(model(x, sigma=sigma, head_fp32=False), reference_logits(state, x, sigma),
                               rtol=1e-5, atol=1e-5)


def test_a_lightning_checkpoint_loads_its_ema_weights_by_default(tmp_path, tokenizer):
    state = {k: v.float() for k, v in mdlm_state().items()}
    params = [k for k in state if not k.endswith("inv_freq")]
    shadow = [torch.full_like(state[k], 0.01) for k in params]
    torch.save({"state_dict": state, "ema": {"shadow_params": shadow},
                "hyper_parameters": {"config": {"model": {"hidden_size": DIM, "n_blocks": BLOCKS, "n_heads": HEADS,
                                                          "cond_dim": COND, "length": LENGTH, "dropout": 0.1}}}},
               tmp_path / "last.ckpt")
    ema = load_mdlm(str(tmp_path / "last.ckpt"), *tokenizer).model
    trained = load_mdlm(str(tmp_path / "last.ckpt"), *tokenizer, ema=False).model
    assert torch.equal(ema.blocks[1].attn.qkv.weight, torch.full((3 * DIM, DIM), 0.01))
    assert torch.equal(trained.blocks[1].attn.qkv.weight, state["backbone.blocks.1.attn_qkv.weight"])
    assert torch.equal(trained.lm_head.bias, state["backbone.output_layer.linear.bias"])
    assert not trained.config.time_conditioning
    # MDLM's time_conditioning sits at the top of its Hydra config, beside the model section.
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["config"]["time_conditioning"] = True
    torch.save(ckpt, tmp_path / "conditioned.ckpt")
    assert load_mdlm(str(tmp_path / "conditioned.ckpt"), *tokenizer).model.config.time_conditioning


def test_bad_mdlm_checkpoints_are_named(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mdlm(str(tmp_path / "nothing"), *tokenizer)
    state = mdlm_state()
    state["backbone.blocks.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="'backbone.blocks.0.extra.weight' is not part of MDLM's DiT"):
        load_mdlm(str(hf_folder(tmp_path / "extra", state, False)), *tokenizer)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not an MDLM Lightning checkpoint"):
        load_mdlm(str(tmp_path / "junk.ckpt"), *tokenizer)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_mdlm(str(tmp_path / "broken"), *tokenizer)
    state = mdlm_state()
    del state["backbone.blocks.1.mlp.2.bias"]
    with pytest.raises(CheckpointError, match="no weight 'blocks.1.mlp.2.bias'"):
        load_mdlm(str(hf_folder(tmp_path / "missing", state, False)), *tokenizer)


def test_import_mdlm_command_writes_a_model_that_samples(tmp_path, capsys):
    from mdlm_sched.cli import main

    hf_folder(tmp_path / "src", mdlm_state(), False)
    imported = subprocess.run([sys.executable, "-m", "mdlm_sched", "import-mdlm", str(tmp_path / "src"),
                               str(tmp_path / "dit"), "--tokenizer", str(TOKENIZER)], cwd=REPO, capture_output=True,
                              text=True)
    assert imported.returncode == 0, imported.stderr
    assert main(["import-mdlm", str(tmp_path / "src"), str(tmp_path / "dit"), "--tokenizer", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err
    assert main(["import-mdlm", str(tmp_path / "src"), str(tmp_path / "dit2"), "--tokenizer",
                 str(tmp_path / "no-tokenizer")]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "dit2").exists()
    assert main(["sample", "--model", f"dit={tmp_path / 'dit'}", "--steps", "8", "--num-samples", "2", "--device",
                 "cpu", "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    assert len((tmp_path / "samples" / "samples.jsonl").read_text().splitlines()) == 2


def test_a_gqa_dit_trains_and_loads(tmp_path, shared_data):
    from mdlm_sched.config_load import load
    from mdlm_sched.models.loading import load_denoiser
    from mdlm_sched.train import train

    out = tmp_path / "dit"
    train(load(["model=tiny", "model.attention=mha", "model.num_key_value_heads=2", "model.ada_ln=true",
                "model.head_bias=true", "data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={shared_data}",
                f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=64", "train.steps=4", "train.warmup_steps=2",
                "train.val_every=4", "train.ckpt_every=4", "train.val_batches=1", f"train.out_dir={out}"]),
          progress=False)
    model = load_denoiser(out)
    assert model.config.attention == "mha" and model.config.num_key_value_heads == 2
    assert model.blocks[0].attn.qkv.weight.shape == (64 + 2 * 2 * 16, 64)  # 4 query heads, 2 kv heads of 16


def test_a_dit_and_an_mla_model_share_a_schedule():
    # One interface (vocabulary, [MASK], length, noise, no time conditioning): a GQA DiT as the light model
    # and an MLA model as the heavy one.
    common = dict(vocab_size=300, mask_token_id=299, max_position_embeddings=32, hidden_size=64, num_attention_heads=4,
                  intermediate_size=256, dropout=0.0)
    torch.manual_seed(0)
    models = {"dit": MDLMDenoiser(DenoiserConfig(num_hidden_layers=1, attention="mha", num_key_value_heads=2,
                                                 ada_ln=True, head_bias=True, **common)).eval(),
              "mla": MDLMDenoiser(DenoiserConfig(num_hidden_layers=3, kv_lora_rank=24, qk_nope_head_dim=8,
                                                 qk_rope_head_dim=8, v_head_dim=12, **common)).eval()}
    schedule = parse_schedule("sandwich", 40, ["dit", "mla"])
    result = sample(models, schedule, LogLinearNoise(1e-3), SamplerSettings(), torch.Generator().manual_seed(0), 4, 32)
    assert not (result.tokens == 299).any()
    assert {r.model for r in result.trace} == {"dit", "mla"}


def test_models_named_on_the_hub_load_from_its_cache(tmp_path, saved_models, monkeypatch, capsys):
    # hf:REPO[@REV] in --model: a folder of this project's layout in the Hugging Face cache samples; MDLM's own
    # layout is refused with the import command to run (a name the cache lacks: tests/test_bad_input.py).
    import shutil

    from huggingface_hub import constants

    from mdlm_sched.cli import main

    cache = tmp_path / "hub"

    def cached(repo: str, files_from) -> None:
        root = cache / f"models--me--{repo}"
        shutil.copytree(files_from, root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)

    cached("tiny", saved_models["small"])
    cached("dit", hf_folder(tmp_path / "dit", mdlm_state(), False))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = ["sample", "--steps", "4", "--num-samples", "1", "--device", "cpu", "--no-progress"]
    assert main([*run, "--model", "m=hf:me/tiny", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.jsonl").is_file()
    capsys.readouterr()
    assert main([*run, "--model", "m=hf:me/dit", "--out", str(tmp_path / "dit-samples")]) == 2
    assert "mdlm-sched import-mdlm hf:me/dit OUT" in capsys.readouterr().err.strip().splitlines()[-1]
