"""Checkpoints: atomic writes, training state for resume, Hugging Face model exports.

Nothing is ever half-written: files and folders are written under a temporary name in the same
folder, flushed to disk, then renamed into place. The newest training state is named by the
`latest` file, which is itself replaced atomically after the state folder is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mdlm_sched.errors import CheckpointError

if TYPE_CHECKING:  # the model module imports transformers, which this module otherwise does not need
    from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser

STATE_DIR = "checkpoints"
MODEL_DIR = "model"


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Yield a file open in `mode` that replaces `path` only once it is complete and on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as f:
        f.write(text)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_state(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
               optimizer: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Save a resumable training state as checkpoints/step-NNNNNNNN, point `latest` at it, prune old ones.

    tensors maps a file stem ("model", "ema") to a state dict saved with safetensors.
    """
    root = run_dir / STATE_DIR
    target = root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        for stem, state in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{stem}.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    atomic_write_text(root / "latest", target.name)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return target


TrainingState = tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]


def load_latest_state(run_dir: Path) -> TrainingState | None:
    """(tensors by stem, optimizer state, state.json) of the newest complete checkpoint, or None."""
    latest = run_dir / STATE_DIR / "latest"
    if not latest.is_file():
        return None
    folder = run_dir / STATE_DIR / latest.read_text().strip()
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = {p.stem: load_file(p) for p in sorted(folder.glob("*.safetensors"))}
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: {exc}); "
                              f"delete it and its 'latest' entry, or start a new train.out_dir") from exc
    return tensors, optimizer, meta


def export_model(model: Any, tokenizer: Any, path: Path) -> None:
    """Save a Hugging Face model and its tokenizer in the HF layout (safetensors), atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# Fields that models sharing a sampling schedule must agree on (DESIGN.md, Conventions).
COMPATIBILITY_FIELDS = ("tokenizer_hash", "vocab_size", "mask_token_id", "max_position_embeddings",
                        "noise_schedule", "noise_eps", "time_conditioning")


def model_folder(path: str | Path) -> Path:
    """The Hugging Face folder of a model: `path` itself, or `path/model` for a training run folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    return path


def load_denoiser(path: str | Path, device: torch.device | str = "cpu") -> MDLMDenoiser:
    """Load an MLA denoiser (MDLMDenoiser) saved by training, in eval mode, float32 weights."""
    from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser

    folder = model_folder(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no model at {path} (no config.json); give a trained model folder or a training "
                              f"run folder (train.out_dir, which holds model/)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except ValueError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({exc}); re-export the model") from exc
    if model_type != DenoiserConfig.model_type:
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not an MLA denoiser "
                              f"({DenoiserConfig.model_type!r}); give the folder of a trained MDLM")
    try:
        model = MDLMDenoiser.from_pretrained(folder)
    except Exception as exc:  # truncated or mismatched safetensors, missing weights file, ...
        raise CheckpointError(f"model {folder} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); re-export or retrain it") from exc
    return model.to(device).eval()


def check_compatible(configs: dict[str, DenoiserConfig]) -> None:
    """Raise CheckpointError if named denoiser configs differ in a field a shared schedule needs."""
    (first, ref), *others = configs.items()
    for name, config in others:
        for field_name in COMPATIBILITY_FIELDS:
            a, b = getattr(ref, field_name), getattr(config, field_name)
            if a != b:
                raise CheckpointError(f"models {first!r} and {name!r} differ in {field_name} ({a!r} vs {b!r}); "
                                      f"a schedule can only mix models trained with the same {field_name}")
