"""import-mdlm on the layouts the public MDLM-family repos really write, with tiny random weights: each fixture
repeats the repo's key names, config fields and their nesting (facts from the repos' code, named per fixture), and
"loads" is checked as "computes MDLM's forward" against the float64 reference of test_mdlm_format."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import TOKENIZER
from mdlm_sched.cli import main
from mdlm_sched.data import load_tokenizer, tokenizer_hash
from mdlm_sched.errors import CheckpointError
from mdlm_sched.models.mdlm_format import load_mdlm
from test_mdlm_format import BLOCKS, COND, DIM, HEADS, LENGTH, VOCAB, hf_folder, mdlm_state, reference_logits

# The model section of the repos' Hydra configs (configs/model/*.yaml of mdlm, bd3lms, duo, sdtt), at tiny sizes.
MODEL = {"name": "tiny", "type": "ddit", "hidden_size": DIM, "cond_dim": COND, "length": LENGTH, "n_blocks": BLOCKS,
         "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1}


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(str(TOKENIZER))
    return tok, tokenizer_hash(tok)


def computes_mdlm(imported, state: dict[str, torch.Tensor], time_conditioning: bool) -> None:
    """The imported model's logits are MDLM's forward of `state` (names under backbone.)."""
    model = imported.model.double()
    assert model.config.time_conditioning is time_conditioning
    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    x[:, ::2] = VOCAB - 1
    sigma = torch.tensor([0.4, 2.5], dtype=torch.float64)
    want = reference_logits(state, x, sigma if time_conditioning else torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(model(x, sigma=sigma if time_conditioning else None, head_fp32=False), want,
                               rtol=1e-5, atol=1e-5)


def lightning(path, state: dict, config: dict, shadow: list | None = None):
    """A Lightning checkpoint as MDLM-family trainers write it: state_dict, ema (models/ema.py's state_dict:
    decay, num_updates, shadow_params) and hyper_parameters.config (the Hydra config)."""
    ckpt = {"state_dict": state, "hyper_parameters": {"config": config}}
    if shadow is not None:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow}
    torch.save(ckpt, path)
    return path


def _floats(state: dict) -> dict:
    return {k: v.float().double() for k, v in state.items()}  # the weights as a float32 file holds them


@pytest.mark.parametrize("compiled", ["backbone._orig_mod.", "_orig_mod.backbone."])
def test_a_compiled_lightning_checkpoint_loads_its_ema(tmp_path, tokenizer, compiled):
    """torch.compile'd modules save `_orig_mod.` into each key (SDTT strips it, multi_round_sdtt.py); the EMA's
    shadow_params follow the backbone's parameters in order, then the noise schedule's (none here)."""
    trained = _floats(mdlm_state(seed=1))
    ema = _floats(mdlm_state(seed=2))
    params = [k for k in trained if not k.endswith("inv_freq")]
    state = {compiled + k[len("backbone."):]: v.float() for k, v in trained.items()}
    path = lightning(tmp_path / "last.ckpt", state, {"model": MODEL, "time_conditioning": False},
                     shadow=[ema[k].float() for k in params])
    imported = load_mdlm(str(path), *tokenizer)
    assert imported.record["compiled"] and imported.record["weights"].startswith("EMA")
    computes_mdlm(imported, ema, time_conditioning=False)
    computes_mdlm(load_mdlm(str(path), *tokenizer, ema=False), trained, time_conditioning=False)


def test_an_sdtt_student_distilled_from_the_hub_model_loads(tmp_path, tokenizer, capsys):
    """SDTT's students hold the hub MDLM as their backbone: keys `backbone.backbone.*` (multi_round_sdtt.py), saved
    by PyTorchModelHubMixin with the run's Hydra config (time_conditioning at its top, parameterization a section)."""
    state = _floats(mdlm_state(seed=4))
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "mode": "train", "time_conditioning": False, "compile": False, "model": MODEL, "tokenizer": {"name": "gpt2"},
        "parameterization": {"name": "multi-round-sdtt", "num_distill_steps": 2}}))
    save_file({"backbone." + k: v.float().contiguous() for k, v in state.items()}, folder / "model.safetensors")
    imported = load_mdlm(str(folder), *tokenizer)
    assert imported.record["prefix"] == "backbone.backbone." and "no EMA" in imported.record["weights"]
    computes_mdlm(imported, state, time_conditioning=False)
    assert main(["import-mdlm", str(folder), str(tmp_path / "out"), "--tokenizer", str(TOKENIZER)]) == 0
    line = capsys.readouterr().out
    assert "no EMA" in line and "backbone.backbone." in line
    assert "time conditioning off (from time_conditioning)" in line
    record = json.loads((tmp_path / "out" / "import.json").read_text())
    assert record["layout"].startswith("hub folder with its run's Hydra config") and record["source"] == str(folder)


def test_a_sharded_hub_folder_loads(tmp_path, tokenizer):
    """save_pretrained's sharded layout: model.safetensors.index.json's weight_map names each weight's shard."""
    state = _floats(mdlm_state(seed=6))
    folder = hf_folder(tmp_path / "sharded", state, time_conditioning=True)
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].float().contiguous() for k in keys}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    imported = load_mdlm(str(folder), *tokenizer)
    assert imported.record["weight_files"] == 2
    computes_mdlm(imported, state, time_conditioning=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["backbone.blocks.9.norm1.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="which its shards do not hold"):
        load_mdlm(str(folder), *tokenizer)


@pytest.mark.parametrize("repo,config,conditioned", [
    # Duo's trainer reads algo.time_conditioning (trainer_base.py); configs/algo/mdlm.yaml sets it false, a run
    # may override it, and the top level has none.
    ("duo", {"algo": {"name": "mdlm", "backbone": "dit", "parameterization": "subs", "time_conditioning": True,
                      "causal_attention": False}}, True),
    # BD3-LM: block_size is `${model.length}` in configs/config.yaml, cross_attn in the algo section.
    ("bd3lms", {"block_size": "${model.length}", "diffusion": "absorbing_state",
                "algo": {"name": "bd3lm", "backbone": "dit", "parameterization": "subs", "time_conditioning": False,
                         "cross_attn": False}}, False),
    # MDLM: parameterization, backbone and time_conditioning at the top of configs/config.yaml.
    ("mdlm", {"diffusion": "absorbing_state", "backbone": "dit", "parameterization": "subs",
              "time_conditioning": True}, True),
])
def test_lightning_configs_of_each_repo_give_their_time_conditioning(tmp_path, tokenizer, repo, config, conditioned):
    state = _floats(mdlm_state(seed=7))
    # Lightning pickles the Hydra config as an OmegaConf DictConfig (interpolations resolve on reading).
    path = lightning(tmp_path / f"{repo}.ckpt", {k: v.float() for k, v in state.items()},
                     OmegaConf.create({"model": MODEL, **config}))
    imported = load_mdlm(str(path), *tokenizer, ema=False)
    assert imported.record["time_conditioning_from"] == ("time_conditioning" if repo == "mdlm"
                                                         else "algo.time_conditioning")
    computes_mdlm(imported, state, time_conditioning=conditioned)


def test_a_bd3lm_hub_folder_of_one_whole_block_is_an_mdlm(tmp_path, tokenizer):
    """BD3LMConfig (models/hf/configuration_bd3lm.py): model_type bd3lm, block_size, cross_attn, adaln, causal;
    BD3LM registers sampling_eps_min / max buffers beside its backbone."""
    state = _floats(mdlm_state(seed=8))
    folder = hf_folder(tmp_path / "bd3lm", state, time_conditioning=False)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="bd3lm", block_size=LENGTH, cross_attn=False, adaln=True, causal=False, var_min=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({**{k: v.float().contiguous() for k, v in state.items()}, "sampling_eps_min": torch.tensor(1e-3),
               "sampling_eps_max": torch.tensor(1.0)}, folder / "model.safetensors")
    computes_mdlm(load_mdlm(str(folder), *tokenizer), state, time_conditioning=False)


def _hub_config(**fields):
    return {"model_type": "mdlm", "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": DIM, "cond_dim": COND,
            "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1, "time_conditioning": False, **fields}


REFUSED = {
    "bd3lm block model (Lightning)": ({"model": MODEL, "block_size": 4, "algo": {"name": "bd3lm", "cross_attn": True}},
                                      "BD3-LM block diffusion model (block_size 4 of length 24, cross_attn True)"),
    "bd3lm whole block with cross attention": ({"model": MODEL, "block_size": LENGTH,
                                                "algo": {"name": "bd3lm", "cross_attn": True}}, "cross_attn True"),
    "duo uniform-state model": ({"model": MODEL, "algo": {"name": "duo", "parameterization": "mean",
                                                          "time_conditioning": True}}, "is a 'duo' model (algo.name)"),
    "sedd score model": ({"model": MODEL, "parameterization": "sedd"}, "parameterization 'sedd'"),
    "autoregressive model": ({"model": MODEL, "algo": {"name": "mdlm", "causal_attention": True}}, "causal attention"),
    "bd3lm block hub folder": (_hub_config(model_type="bd3lm", block_size=4, cross_attn=True), "block_size 4 of "
                               "model_length 24"),
    "a count that is not a number": (_hub_config(n_heads="twelve"), "n_heads='twelve', which is not an int >= 1"),
    "a count of zero": (_hub_config(n_heads=0), "n_heads=0, which is not an int >= 1"),
    "another model_type": (_hub_config(model_type="udlm"), "holds a 'udlm' model (model_type)"),
    "heads disagree with the rotary table": (_hub_config(n_heads=2), "head width 16 (2 heads), its weights 8"),
    "blocks disagree with the weights": (_hub_config(n_blocks=3), "blocks 3, its weights 2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_checkpoints_that_are_not_mdlms_are_refused_with_one_line(tmp_path, capsys, case):
    config, message = REFUSED[case]
    state = {k: v.float() for k, v in mdlm_state().items()}
    if "model" in config:
        source = lightning(tmp_path / "model.ckpt", state, config)
    else:
        source = hf_folder(tmp_path / "hub", state, False)
        (source / "config.json").write_text(json.dumps(config))
    assert main(["import-mdlm", str(source), str(tmp_path / "out"), "--tokenizer", str(TOKENIZER), "--no-ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "out").exists()
