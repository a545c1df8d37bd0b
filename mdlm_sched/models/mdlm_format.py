"""MDLM's own checkpoints (kuleshov-group/mdlm, Sahoo et al. 2024) as denoisers of this project.

MDLM's DiT is this project's denoiser with attention="mha", ada_ln=True (adaLN fed sigma = 0 when
not time-conditioned) and head_bias=True; only the weight names differ. Three layouts are read:

- a Hugging Face folder (kuleshov-group/mdlm-owt; BD3-LM's `bd3lm` model_type): config.json with
  vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout, time_conditioning, and
  model.safetensors, a sharded model.safetensors.index.json or pytorch_model.bin with the DiT's weights;
- a folder saved by huggingface_hub's PyTorchModelHubMixin from MDLM-derived training code (the SDTT
  teachers and students, jdeschena/sdtt branches such as teacher_400k_sm_step_400000): config.json is
  the run's whole Hydra config (model settings in its `model` section), model.safetensors the training
  module's state dict;
- a Lightning checkpoint (.ckpt) of MDLM's, BD3-LM's or Duo's training code: the weights in state_dict,
  the EMA of the parameters (used by default: MDLM evaluates with it) in ema.shadow_params, in the order
  of the backbone's parameters, and the Hydra config in hyper_parameters.config.

The DiT's weights sit under `backbone.` or, in SDTT's students distilled from the hub model,
`backbone.backbone.`; torch.compile's `_orig_mod.` is taken out of any key. time_conditioning is read
from `algo.time_conditioning` where the Hydra config has an algo section (BD3-LM, Duo), else from its top
level (MDLM, SDTT). Refused, each with one line: models that are not MDLMs (another algo.name or
model_type, e.g. Duo's uniform-state models; a parameterization other than subs; causal attention; a
backbone other than the DiT), BD3-LM block models (block_size below the length, or cross attention), and
configs whose geometry disagrees with the weights (the saved rotary table gives the head width).

A source is a local folder or file, or hf:REPO[@REVISION] (downloaded where there is network).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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


# Where the DiT's weights sit in a state dict: MDLM's Lightning module and hub model keep it under
# `backbone.`; SDTT's students distilled from the hub model hold that hub model as their backbone, hence
# `backbone.backbone.` (jdeschena/sdtt, multi_round_sdtt.py). Tried in this order.
_PREFIXES = ("backbone.backbone.", "backbone.")
_COMPILED = "_orig_mod."  # torch.compile's wrapper in a key, wherever the compiled module sat


def strip_compiled(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict with torch.compile's `_orig_mod.` taken out of every key, and whether there was one."""
    out = {key.replace(_COMPILED, ""): value for key, value in state.items()}
    if len(out) != len(state):
        raise CheckpointError(f"{source} holds some weights twice, with and without torch.compile's {_COMPILED!r}; "
                              f"save the state dict of one module")
    return out, any(_COMPILED in key for key in state)


def dit_prefix(state: Mapping[str, torch.Tensor], source: str) -> str:
    """The prefix under which the state dict holds MDLM's DiT (see _PREFIXES)."""
    for prefix in _PREFIXES:
        if f"{prefix}vocab_embed.embedding" in state:
            return prefix
    raise CheckpointError(f"{source} has no weights of MDLM's DiT (no backbone.vocab_embed.embedding); give an MDLM "
                          f"checkpoint of the DiT backbone")


def rename_state(state: Mapping[str, torch.Tensor], source: str, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """MDLM's DiT weights (names under `prefix`) with this project's names. Entries outside `backbone.` (a noise
    schedule's buffers, SDTT's sampling_eps_tensor) are left out; anything else under it is refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("backbone."):
            continue
        name = key[len(prefix):] if key.startswith(prefix) else ""  # "" matches no rename: refused below
        if name in _BUFFERS:
            continue
        for pattern, repl in _RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = value
                break
        else:
            raise CheckpointError(f"{source}: weight {key!r} is not part of MDLM's DiT; is this an MDLM checkpoint "
                                  f"with the DiT backbone?")
    return out


def setting(settings: Mapping[str, Any], source: str, *names: str, kind: type = int, default: Any = None) -> Any:
    """The first of `names` the settings hold, as `kind` (an int must be >= 1); `default` if none is there.
    A missing setting without a default, or a value that is not a `kind`, is a one-line CheckpointError."""
    name = next((n for n in names if n in settings), None)
    if name is None:
        if default is None:
            raise CheckpointError(f"{source}: the model settings have no {names[0]!r}; is this an MDLM DiT?")
        return default
    try:
        value = kind(settings[name])
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is int and value < 1):
        raise CheckpointError(f"{source}: its config gives {name}={settings[name]!r}, which is not "
                              f"{'an int >= 1' if kind is int else f'a {kind.__name__}'}; the config is damaged")
    return value


def dit_config(model: Mapping[str, Any], vocab_size: int, tokenizer_hash: str, source: str) -> DenoiserConfig:
    """The DenoiserConfig of an MDLM DiT from its settings: hidden_dim or hidden_size, n_blocks, n_heads,
    cond_dim, model_length or length, dropout, time_conditioning."""
    hidden = setting(model, source, "hidden_dim", "hidden_size")
    return DenoiserConfig(
        vocab_size=vocab_size, mask_token_id=vocab_size - 1,
        max_position_embeddings=setting(model, source, "model_length", "length"), tokenizer_hash=tokenizer_hash,
        hidden_size=hidden, num_hidden_layers=setting(model, source, "n_blocks"),
        num_attention_heads=setting(model, source, "n_heads"), attention="mha", intermediate_size=4 * hidden,
        dropout=setting(model, source, "dropout", kind=float, default=0.1),
        time_conditioning=bool(model.get("time_conditioning", False)), cond_dim=setting(model, source, "cond_dim"),
        ada_ln=True, head_bias=True, layer_norm_eps=1e-5, rope_theta=10000.0, vocab_pad_multiple=1)


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source} {what}; import-mdlm reads MDLMs only (absorbing-state masked diffusion with a "
                           f"bidirectional DiT)")


def _check_one_block(settings: Mapping[str, Any], length: int, cross_attn: bool, default_block: int, source: str,
                     length_name: str = "length") -> None:
    """Refuse a BD3-LM block diffusion model: only one block of the whole length without cross attention is an MDLM.
    Its default config writes block_size as `${model.length}` (one block)."""
    block = length if settings.get("block_size") == "${model.length}" else setting(
        settings, source, "block_size", default=default_block)
    if block < length or cross_attn:
        raise _refuse(source, f"is a BD3-LM block diffusion model (block_size {block} of {length_name} {length}, "
                      f"cross_attn {cross_attn}); only one block of the whole length without cross attention is an "
                      f"MDLM")


def hydra_settings(config: Mapping[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The model settings of an MDLM-style Hydra config (MDLM, SDTT, BD3-LM, Duo) and where time_conditioning was
    read: `algo.time_conditioning` where the config has an algo section (BD3-LM, Duo), else the top level (MDLM,
    SDTT). Configs of models that are not MDLMs are refused."""
    if not isinstance(config.get("model"), Mapping):
        raise CheckpointError(f"{source}: its config has no model section; give a checkpoint of MDLM-family code")
    model = dict(config["model"])
    algo = config.get("algo")
    algo = algo if isinstance(algo, Mapping) else {}
    name = algo.get("name", "mdlm")
    # parameterization is a section of its own in SDTT's config (its distillation settings), a word elsewhere.
    param = algo.get("parameterization", config.get("parameterization", "subs"))
    if name not in ("mdlm", "bd3lm"):
        raise _refuse(source, f"is a {name!r} model (algo.name), not an MDLM")
    if isinstance(param, str) and param != "subs":
        raise _refuse(source, f"has parameterization {param!r}, not MDLM's 'subs'")
    if config.get("diffusion", "absorbing_state") != "absorbing_state":
        raise _refuse(source, f"is a {config['diffusion']!r} diffusion model, not absorbing-state (masked)")
    backbone = algo.get("backbone", config.get("backbone", "dit"))
    if backbone not in ("dit", "hf_dit"):
        raise _refuse(source, f"has a {backbone!r} backbone, not MDLM's DiT")
    if algo.get("causal_attention") or model.get("causal_attention"):
        raise _refuse(source, "uses causal attention (an autoregressive model)")
    if name == "bd3lm":
        length = setting(model, source, "length", "model_length")
        _check_one_block(config, length, bool(algo.get("cross_attn", False)), length, source)
    if "time_conditioning" in algo:
        return {**model, "time_conditioning": bool(algo["time_conditioning"])}, "algo.time_conditioning"
    return {**model, "time_conditioning": bool(config.get("time_conditioning", False))}, "time_conditioning"


def hub_settings(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A flat hub config.json (MDLM's `mdlm`, BD3-LM's `bd3lm` model_type), checked to describe an MDLM."""
    kind = settings.get("model_type", "mdlm")
    if kind not in ("mdlm", "bd3lm"):
        raise _refuse(source, f"holds a {kind!r} model (model_type), not an MDLM")
    if kind == "bd3lm":
        # BD3LMConfig's defaults: block_size 1, cross_attn on
        _check_one_block(settings, setting(settings, source, "model_length"), bool(settings.get("cross_attn", True)),
                         1, source, "model_length")
        if settings.get("causal", False) or not settings.get("adaln", True):
            raise _refuse(source, "has causal attention or no adaLN layers, unlike MDLM's DiT")
    return dict(settings)


def check_geometry(config: DenoiserConfig, weights: Mapping[str, torch.Tensor], inv_freq: torch.Tensor | None,
                   source: str) -> None:
    """CheckpointError where the config's geometry disagrees with the weights'. The head count changes no weight's
    shape; the saved rotary table (head width / 2 frequencies) tells it."""
    blocks = sum(1 for k in weights if k.endswith(".attn.qkv.weight"))
    found = {"hidden size": weights["embed_tokens.weight"].shape[1], "blocks": blocks,
             "cond_dim": weights["blocks.0.ada_ln.weight"].shape[1] if "blocks.0.ada_ln.weight" in weights else None}
    said = {"hidden size": config.hidden_size, "blocks": config.num_hidden_layers, "cond_dim": config.cond_dim}
    if inv_freq is not None:
        found["head width"] = 2 * inv_freq.numel()
        said["head width"] = config.hidden_size // config.num_attention_heads
    for what, value in found.items():
        if value is not None and value != said[what]:
            raise CheckpointError(f"{source}: its config gives {what} {said[what]}"
                                  f"{f' ({config.num_attention_heads} heads)' if what == 'head width' else ''}, its "
                                  f"weights {value}; the config and the weights do not match")


def _resolve(source: str) -> Path:
    path = local_path(source, f"MDLM checkpoint {source}")
    if not path.exists():
        raise CheckpointError(f"MDLM checkpoint {source} does not exist; give a folder, a .ckpt file or hf:REPO")
    return path


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """A folder's weights (model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin) and the
    number of files they came from."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors"), 1
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]  # weight name -> shard file
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        if missing := sorted(set(weight_map) - set(state)):
            raise CheckpointError(f"{index} names weight {missing[0]!r} ({len(missing)} in all), which its shards "
                                  f"do not hold; download the folder again")
        return state, len(set(weight_map.values()))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True), 1
    raise CheckpointError(f"{folder} has neither model.safetensors (or its sharded index) nor pytorch_model.bin")


def _read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; give the folder of an MDLM Hugging Face model")
    try:
        settings = json.loads(config_file.read_text())
        state, files = _read_weights(folder)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"MDLM model {folder} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    state, compiled = strip_compiled(state, str(folder))
    record = {"weight_files": files, "compiled": compiled,
              "weights": "the folder's weights (a hub folder holds one set: no EMA choice)"}
    if isinstance(settings.get("model"), dict):  # a whole Hydra config (PyTorchModelHubMixin: SDTT, BD3-LM, Duo)
        settings, record["time_conditioning_from"] = hydra_settings(settings, str(folder))
        record["layout"] = "hub folder with its run's Hydra config (PyTorchModelHubMixin)"
    else:
        settings = hub_settings(settings, str(folder))
        record["time_conditioning_from"] = "config.json time_conditioning"
        record["layout"] = f"hub folder ({settings.get('model_type', 'mdlm')} config.json)"
    return settings, state, record


def _read_lightning(path: Path, ema: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    # The checkpoint pickles an OmegaConf config (hyper_parameters), which weights_only loading refuses:
    # read only checkpoints you trust.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        config = ckpt["hyper_parameters"]["config"]
        state = dict(ckpt["state_dict"])
    except Exception as exc:  # pickle, zip and key errors of a file that is not such a checkpoint each have their type
        raise CheckpointError(f"{path} is not an MDLM Lightning checkpoint ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    settings, where = hydra_settings(config, str(path))
    state, compiled = strip_compiled(state, str(path))
    record = {"layout": "Lightning checkpoint", "time_conditioning_from": where, "weight_files": 1,
              "compiled": compiled, "weights": "trained weights (state_dict; --no-ema)"}
    if ema:
        shadow = (ckpt.get("ema") or {}).get("shadow_params")
        if shadow is None:
            raise CheckpointError(f"{path} holds no EMA weights (ema.shadow_params); pass --no-ema to use the "
                                  f"trained weights")
        # EMA covers the parameters in registration order: the backbone's (its state dict without buffers)
        # then the noise schedule's (none for the log-linear schedule).
        prefix = dit_prefix(state, str(path))
        names = [k for k in state if k.startswith(prefix) and k[len(prefix):] not in _BUFFERS]
        if len(shadow) < len(names) or any(s.shape != state[n].shape for n, s in zip(names, shadow)):
            raise CheckpointError(f"{path}: the EMA weights do not line up with the backbone's parameters; "
                                  f"pass --no-ema to use the trained weights")
        state.update(zip(names, shadow))
        record["weights"] = "EMA weights (ema.shadow_params)"
    return settings, state, record


@dataclass(frozen=True)
class ImportedMDLM:
    """An imported MDLM and what was read to make it (the record import-mdlm saves and prints)."""

    model: MDLMDenoiser
    record: dict[str, Any]  # source, layout, weights (EMA or not), time conditioning and where it was read, ...

    def describe(self) -> str:
        """One line: the model, its weights and where its settings came from."""
        c, r = self.model.config, self.record
        return (f"DiT {c.num_hidden_layers} x {c.hidden_size}, {c.num_attention_heads} heads, length "
                f"{c.max_position_embeddings}; {r['weights']}; time conditioning "
                f"{'on' if c.time_conditioning else 'off'} (from {r['time_conditioning_from']}); {r['layout']}, "
                f"weights under {r['prefix']!r}" + (", saved from a torch.compile'd module" if r["compiled"] else ""))


def load_mdlm(source: str, tokenizer: Any, tokenizer_hash: str, ema: bool = True) -> ImportedMDLM:
    """An MDLM DiT checkpoint (HF folder, Lightning .ckpt or hf:REPO[@REV]) as a float32 MDLMDenoiser, eval mode,
    with the record of what was read.

    tokenizer: the tokenizer the model was trained with (GPT-2 for MDLM's OpenWebText models); its
    vocabulary plus [MASK] must be the model's vocabulary.
    ema: for a Lightning checkpoint, use its EMA weights (MDLM's evaluation does).
    """
    path = _resolve(source)
    settings, state, record = _read_lightning(path, ema) if path.is_file() else _read_hf_folder(path)
    prefix = dit_prefix(state, source)
    weights = rename_state(state, source, prefix)
    vocab = weights["embed_tokens.weight"].shape[0]
    if vocab != len(tokenizer) + 1:
        raise CheckpointError(f"{source} has a vocabulary of {vocab}, the tokenizer {len(tokenizer)} tokens + [MASK] "
                              f"= {len(tokenizer) + 1}; give the tokenizer the model was trained with")
    config = dit_config(settings, vocab, tokenizer_hash, source)
    check_geometry(config, weights, state.get(f"{prefix}rotary_emb.inv_freq"), source)
    with torch.device("meta"):  # every weight comes from the checkpoint
        model = MDLMDenoiser(config)
    check_state_dict(model, weights, source)
    model.load_state_dict(weights, strict=True, assign=True)
    record = {"source": source, **record, "prefix": prefix, "time_conditioning": config.time_conditioning}
    return ImportedMDLM(model.float().eval(), record)
