"""MDLM's own checkpoints (kuleshov-group/mdlm, Sahoo et al. 2024) as denoisers of this project.

MDLM's DiT is this project's denoiser with attention="mha", ada_ln=True (adaLN fed sigma = 0 when
not time-conditioned) and head_bias=True; only the weight names differ. Three layouts are read:

- a Hugging Face folder (kuleshov-group/mdlm-owt, the BD3-LM release of an MDLM): config.json with
  vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout, time_conditioning, and
  model.safetensors (or pytorch_model.bin) with the DiT's weights under `backbone.`;
- a folder saved by huggingface_hub's PyTorchModelHubMixin from MDLM-derived training code (the SDTT
  teachers and students, jdeschena/sdtt branches such as teacher_400k_sm_step_400000): config.json is
  the run's whole Hydra config (model settings in its `model` section, time_conditioning at the top),
  model.safetensors the training module's state dict, the DiT's weights under `backbone.`;
- a Lightning checkpoint (.ckpt) of MDLM's training code: the weights under `backbone.` in
  state_dict, the EMA of the parameters (used by default: MDLM evaluates with it) in
  ema.shadow_params, in the order of the backbone's parameters, and the Hydra config in
  hyper_parameters.config.

A source is a local folder or file, or hf:REPO[@REVISION] (downloaded where there is network).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mdlm_sched.errors import CheckpointError
from mdlm_sched.hub import local_path
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.loading import check_state_dict

# MDLM name (after `backbone.`) -> this project's name; {i} is a block index.
_RENAMES = [
    (r"vocab_embed\.embedding", "embed_tokens.weight"),
    (r"sigma_map\.mlp\.(\d)\.(weight|bias)", r"time_embed.mlp.\1.\2"),
    (r"blocks\.(\d+)\.attn_qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn_out\.weight", r"blocks.\1.attn.wo.weight"),
    (r"blocks\.(\d+)\.adaLN_modulation\.(weight|bias)", r"blocks.\1.ada_ln.\2"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"output_layer\.norm_final\.weight", "norm_final.weight"),
    (r"output_layer\.linear\.(weight|bias)", r"lm_head.\1"),
    (r"output_layer\.adaLN_modulation\.(weight|bias)", r"final_ada_ln.\1"),
]
_BUFFERS = ("rotary_emb.inv_freq",)  # recomputed here, not weights


def rename_state(state: Mapping[str, torch.Tensor], source: str, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """MDLM's DiT weights (names under `prefix`) with this project's names; other entries are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix) or key[len(prefix):] in _BUFFERS:
            continue
        name = key[len(prefix):]
        for pattern, repl in _RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = value
                break
        else:
            raise CheckpointError(f"{source}: weight {key!r} is not part of MDLM's DiT; is this an MDLM checkpoint "
                                  f"with the DiT backbone?")
    if not out:
        raise CheckpointError(f"{source} has no weights under {prefix!r}; give an MDLM checkpoint of the DiT backbone")
    return out


def dit_config(model: Mapping[str, Any], vocab_size: int, tokenizer_hash: str, source: str) -> DenoiserConfig:
    """The DenoiserConfig of an MDLM DiT from its settings: hidden_dim or hidden_size, n_blocks, n_heads,
    cond_dim, model_length or length, dropout, time_conditioning."""
    def get(*names: str, default: Any = None) -> Any:
        for name in names:
            if name in model:
                return model[name]
        if default is None:
            raise CheckpointError(f"{source}: the model settings have no {names[0]!r}; is this an MDLM DiT?")
        return default

    hidden = int(get("hidden_dim", "hidden_size"))
    return DenoiserConfig(
        vocab_size=vocab_size, mask_token_id=vocab_size - 1, max_position_embeddings=int(get("model_length", "length")),
        tokenizer_hash=tokenizer_hash, hidden_size=hidden, num_hidden_layers=int(get("n_blocks")),
        num_attention_heads=int(get("n_heads")), attention="mha", intermediate_size=4 * hidden,
        dropout=float(get("dropout", default=0.1)), time_conditioning=bool(get("time_conditioning", default=False)),
        cond_dim=int(get("cond_dim")), ada_ln=True, head_bias=True, layer_norm_eps=1e-5, rope_theta=10000.0,
        vocab_pad_multiple=1)


def _hydra_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model settings of an MDLM-style Hydra config: its `model` section, plus the top-level time_conditioning
    (MDLM keeps it outside the model section)."""
    return {**config["model"], "time_conditioning": config.get("time_conditioning", False)}


def _resolve(source: str) -> Path:
    path = local_path(source, f"MDLM checkpoint {source}")
    if not path.exists():
        raise CheckpointError(f"MDLM checkpoint {source} does not exist; give a folder, a .ckpt file or hf:REPO")
    return path


def _read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; give the folder of an MDLM Hugging Face model")
    weights = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    if not weights:
        raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    try:
        settings = json.loads(config_file.read_text())
        if weights[0].suffix == ".safetensors":
            state = load_file(weights[0])
        else:
            state = torch.load(weights[0], map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"MDLM model {folder} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    if isinstance(settings.get("model"), dict):  # a whole Hydra config (PyTorchModelHubMixin, SDTT)
        settings = _hydra_settings(settings)
    return settings, state


def _read_lightning(path: Path, ema: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    # The checkpoint pickles an OmegaConf config (hyper_parameters), which weights_only loading refuses:
    # read only checkpoints you trust.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        settings = _hydra_settings(ckpt["hyper_parameters"]["config"])
        state = dict(ckpt["state_dict"])
    except Exception as exc:  # pickle, zip and key errors of a file that is not such a checkpoint each have their type
        raise CheckpointError(f"{path} is not an MDLM Lightning checkpoint ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    if ema:
        shadow = (ckpt.get("ema") or {}).get("shadow_params")
        if shadow is None:
            raise CheckpointError(f"{path} holds no EMA weights (ema.shadow_params); pass --no-ema to use the "
                                  f"trained weights")
        # EMA covers the parameters in registration order: the backbone's (its state dict without buffers)
        # then the noise schedule's (none for the log-linear schedule).
        names = [k for k in state if k.startswith("backbone.") and k[len("backbone."):] not in _BUFFERS]
        if len(shadow) < len(names) or any(s.shape != state[n].shape for n, s in zip(names, shadow)):
            raise CheckpointError(f"{path}: the EMA weights do not line up with the backbone's parameters; "
                                  f"pass --no-ema to use the trained weights")
        state.update(zip(names, shadow))
    return settings, state


def load_mdlm(source: str, tokenizer: Any, tokenizer_hash: str, ema: bool = True) -> MDLMDenoiser:
    """An MDLM DiT checkpoint (HF folder, Lightning .ckpt or hf:REPO[@REV]) as a float32 MDLMDenoiser, eval mode.

    tokenizer: the tokenizer the model was trained with (GPT-2 for MDLM's OpenWebText models); its
    vocabulary plus [MASK] must be the model's vocabulary.
    ema: for a Lightning checkpoint, use its EMA weights (MDLM's evaluation does).
    """
    path = _resolve(source)
    settings, state = _read_lightning(path, ema) if path.is_file() else _read_hf_folder(path)
    weights = rename_state(state, source)
    vocab = weights["embed_tokens.weight"].shape[0]
    if vocab != len(tokenizer) + 1:
        raise CheckpointError(f"{source} has a vocabulary of {vocab}, the tokenizer {len(tokenizer)} tokens + [MASK] "
                              f"= {len(tokenizer) + 1}; give the tokenizer the model was trained with")
    config = dit_config(settings, vocab, tokenizer_hash, source)
    with torch.device("meta"):  # every weight comes from the checkpoint
        model = MDLMDenoiser(config)
    check_state_dict(model, weights, source)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.float().eval()
