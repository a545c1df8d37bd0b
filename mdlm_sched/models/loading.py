"""Loading denoisers from disk, strictly: every weight the model has must be in the file with its shape,
and the file may hold no weight the model lacks. The first key that breaks this is named in the error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mdlm_sched.artifacts import HF_CONFIG, HF_WEIGHTS, model_folder
from mdlm_sched.errors import CheckpointError
from mdlm_sched.hub import local_path
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first weight that is missing, unexpected or of another shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source} has no weight {missing[0]!r} (and {len(missing) - 1} more missing), which "
                              f"the model its config describes needs; the config and the weights do not match")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source} holds weight {unexpected[0]!r} ({len(unexpected)} unexpected in all), "
                              f"which the model its config describes lacks; the config and the weights do not match")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        raise CheckpointError(f"{source}: weight {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, the config "
                              f"asks for {tuple(expected[wrong[0]])}; the config and the weights do not match")


def load_denoiser(path: str | Path, device: torch.device | str = "cpu") -> MDLMDenoiser:
    """Load a denoiser saved by training (a model folder, a training run folder, or hf:REPO[@REVISION] of such a
    folder), eval mode, float32 weights."""
    folder = model_folder(local_path(str(path), f"model {path}"))
    config_file = folder / HF_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"no model at {path} (no {HF_CONFIG}); give a trained model folder or a training "
                              f"run folder (train.out_dir, which holds model/)")
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}); re-export the model") from None
    if raw.get("model_type") in ("mdlm", "bd3lm") or isinstance(raw.get("model"), dict):  # MDLM-family layouts
        raise CheckpointError(f"{path} is a checkpoint of MDLM's code, not a model folder of this project; import it "
                              f"first: mdlm-sched import-mdlm {path} OUT --tokenizer gpt2")
    if raw.get("model_type") != DenoiserConfig.model_type:
        raise CheckpointError(f"{folder} holds a {raw.get('model_type')!r} model, not a denoiser of this project "
                              f"({DenoiserConfig.model_type!r}); give the folder of a trained MDLM")
    weights = folder / HF_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {HF_WEIGHTS}; re-export or retrain the model")
    try:
        config = DenoiserConfig.from_dict(raw)
        state = load_file(weights)
    except (SafetensorError, OSError, TypeError, ValueError) as exc:
        raise CheckpointError(f"model {folder} cannot be loaded ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); re-export or retrain it") from None
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = MDLMDenoiser(config)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().to(device).eval()
