"""Training checkpoints: resumable states and Hugging Face model exports, never half-written.

A state is a folder written whole under a temporary name and renamed into place (fileio.atomic_dir);
the newest is named by the run's `latest` file, itself replaced atomically once the folder is
complete. Loading checks that every file a state needs is there before using any of it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mdlm_sched.artifacts import Checkpoint, TrainRun
from mdlm_sched.errors import CheckpointError, ConfigError
from mdlm_sched.fileio import atomic_dir, atomic_write_text, check_writable

TrainingState = tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]


def save_state(run: TrainRun, step: int, tensors: dict[str, dict[str, torch.Tensor]],
               optimizer: dict[str, Any], meta: dict[str, Any], keep: int) -> None:
    """Save a resumable training state for `step`, point `latest` at it, prune all but the newest `keep`.

    tensors maps a state dict's name ("model", "ema") to the state dict, saved with safetensors.
    """
    target = run.checkpoint(step)
    with atomic_dir(target.root) as tmp:
        written = Checkpoint(tmp)
        for stem, state in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, written.weights(stem))
        torch.save(optimizer, written.optimizer)
        written.state.write_text(json.dumps({"step": step, "tensors": sorted(tensors), **meta}, indent=1))
    atomic_write_text(run.latest, target.root.name)
    for old in run.checkpoint_folders()[:-keep]:
        shutil.rmtree(old)


def load_latest_state(run: TrainRun, stems: Sequence[str]) -> TrainingState | None:
    """(tensors by stem, optimizer state, state.json) of the newest complete checkpoint, or None if there is none.

    stems: the state dicts the run needs ("model", and "ema" when it keeps one); a checkpoint without one
    of them, or with a file that cannot be read, raises CheckpointError naming what is wrong.
    """
    if not run.latest.is_file():
        return None
    folder = run.checkpoints / run.latest.read_text().strip()
    state = Checkpoint(folder)
    fix = f"delete {folder} and the 'latest' file beside it to resume from an older state, or start a new " \
          f"train.out_dir"
    needed = [state.state, state.optimizer, *(state.weights(stem) for stem in stems)]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} has no {missing[0]}; {fix}")
    try:
        meta = json.loads(state.state.read_text())
        tensors = {stem: load_file(state.weights(stem)) for stem in stems}
        optimizer = torch.load(state.optimizer, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and JSON each raise their own types for a damaged file
        raise CheckpointError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); {fix}") from exc
    return tensors, optimizer, meta


def check_new_model_folder(folder: str, what: str) -> Path:
    """The folder a command is to export a model to (export_model), checked before any work: it must not exist
    yet, and its place must be writable. what: the model it will hold, for the message."""
    path = Path(folder)
    if path.exists():
        raise ConfigError(f"{folder} exists; give a new folder for the {what}")
    check_writable(path, "out")
    return path


def export_model(model: Any, tokenizer: Any, path: Path, records: Mapping[str, Any] | None = None) -> None:
    """Save a Hugging Face model and its tokenizer in the HF layout (safetensors) to `path`, atomically, with
    records: file name -> JSON-able record written beside them (e.g. what an import read)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, record in (records or {}).items():
            (tmp / name).write_text(json.dumps(record, indent=1) + "\n")
