"""`mdlm-sched convert-mla`: a multi-head / grouped-query attention MDLM converted to MLA (TransMLA), with its
calibration on noised data and the validation bound of source and result on the same draws.

The calibration sums and the source's bound are saved as they progress (artifacts.ConversionWork), so a killed
run resumes where it stopped and ends with the same model as an uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm import tqdm

from mdlm_sched.artifacts import ConversionWork, model_folder
from mdlm_sched.checkpoint import check_new_model_folder, export_model
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.data import load_sources, load_tokenizer
from mdlm_sched.errors import CheckpointError, ConfigError
from mdlm_sched.fileio import atomic_file, atomic_write_json, read_json
from mdlm_sched.hub import local_path
from mdlm_sched.models.denoiser import MDLMDenoiser
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.models.transmla import check_conversion, convert_to_mla
from mdlm_sched.objectives import denoiser_objective, evaluate
from mdlm_sched.runtime import autocast, autocast_dtype, configure_backends, resolve_device

CALIBRATION_SEED = 0  # noise draws of the calibration pass and of both bounds
CALIBRATION_BATCH = 8  # sequences per forward: bounded memory on a CPU and a GPU alike
SAVE_EVERY_S = 60.0  # default seconds between saves of the calibration sums (12 x 768^2 float64: 57 MB)


@dataclass(frozen=True)
class Conversion:
    """What convert-mla did: KV elements per token of both models, the bounds on the calibration blocks, and how
    many calibration blocks an earlier, killed run had done."""

    kv_source: int
    kv_converted: int
    blocks: int
    bound_source: float | None
    bound_converted: float | None
    resumed_blocks: int = 0


@dataclass(frozen=True)
class ConversionStore:
    """Reads and writes an unfinished conversion's work (artifacts.ConversionWork), each file with the settings
    that made it. Nothing is written before the first save, so a run refused on the way leaves nothing."""

    work: ConversionWork
    settings: dict[str, Any]  # what the work depends on

    def check(self) -> None:
        """ConfigError if the folder holds the work of a run with other settings."""
        if self.work.settings.is_file() and read_json(self.work.settings, "the settings of an unfinished "
                                                      "conversion") != json.loads(json.dumps(self.settings)):
            raise ConfigError(f"{self.work.root} holds an unfinished conversion with other settings; rerun it with "
                              f"the same settings to resume it, or delete that folder")

    def load_moments(self) -> tuple[int, list[torch.Tensor], torch.Tensor] | None:
        """(blocks done, per-block sums [d, d] float64, noise generator state) saved earlier, or None."""
        if not self.work.moments.is_file():
            return None
        try:
            saved = load_tensors(self.work.moments.read_bytes())
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise self._damaged(exc) from None
        n = sum(k.startswith("sum.") for k in saved)
        return int(saved["blocks_done"]), [saved[f"sum.{i}"] for i in range(n)], saved["generator"]

    def _damaged(self, exc: Exception) -> CheckpointError:
        return CheckpointError(f"{self.work.moments} cannot be read ({type(exc).__name__}); delete it to calibrate "
                               f"again")

    def save_moments(self, done: int, sums: list[torch.Tensor], generator: torch.Generator) -> None:
        self._write_settings()
        tensors = {f"sum.{i}": s.cpu() for i, s in enumerate(sums)}
        tensors.update(blocks_done=torch.tensor(done), generator=generator.get_state())
        with atomic_file(self.work.moments, "wb") as f:
            f.write(save_tensors(tensors))

    def load_source_bound(self) -> float | None:
        if not self.work.source_bound.is_file():
            return None
        return float(read_json(self.work.source_bound, "the source bound of an unfinished conversion")["bound"])

    def save_source_bound(self, bound: float) -> None:
        self._write_settings()
        atomic_write_json(self.work.source_bound, {"bound": bound})

    def _write_settings(self) -> None:
        if not self.work.settings.is_file():
            atomic_write_json(self.work.settings, self.settings)

    def close(self) -> None:
        """The converted model is written: the work is no longer needed."""
        shutil.rmtree(self.work.root, ignore_errors=True)


@torch.no_grad()
def attention_input_moments(model: MDLMDenoiser, blocks: np.ndarray, batch_size: int, device: torch.device,
                            amp: torch.dtype | None, progress: bool = True, store: ConversionStore | None = None,
                            save_every_s: float = SAVE_EVERY_S,
                            saved: tuple[int, list[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """E[x x^T] [d, d] (float64) of every block's attention input over the tokens of blocks [N, L], each block
    masked at a random time as in training (the denoiser sees noised inputs, so the statistics must too).

    With a store, the sums so far (and the noise generator's state) are saved every save_every_s seconds and
    once at the end; `saved` (the store's load_moments()) resumes from them: the sums are the same as an
    uninterrupted run's."""
    objective = denoiser_objective(model.config)
    d = model.config.hidden_size
    sums = [torch.zeros(d, d, dtype=torch.float64, device=device) for _ in model.blocks]

    def hook(n: int):
        def accumulate(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # [B * L, d]
            sums[n].add_(x.t() @ x)
        return accumulate

    generator = torch.Generator(device=device).manual_seed(CALIBRATION_SEED)
    first = 0
    if saved is not None:
        first, done_sums, state = saved
        for total, done in zip(sums, done_sums, strict=True):
            total.copy_(done)
        generator.set_state(state)
    handles = [block.attn.register_forward_pre_hook(hook(n)) for n, block in enumerate(model.blocks)]
    starts = range(first, len(blocks), batch_size)
    last_save = time.monotonic()
    try:
        for start in tqdm(starts, desc="calibration", disable=not progress):
            x0 = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64)).to(device)
            with autocast(device, amp):
                objective.loss(model, *objective.prepare(x0, generator), training=False)
            end = min(start + batch_size, len(blocks))
            if store is not None and (end == len(blocks) or time.monotonic() - last_save >= save_every_s):
                store.save_moments(end, sums, generator)
                last_save = time.monotonic()
    finally:
        for handle in handles:
            handle.remove()
    tokens = blocks.shape[0] * blocks.shape[1]
    return [s.cpu() / tokens for s in sums]


def convert_command(source: str, out: str, kv_lora_rank: int, rope_dim: int, calibration: str | None,
                    calibration_blocks: int, cache_dir: str, runtime: RuntimeConfig, progress: bool = True,
                    save_every_s: float = SAVE_EVERY_S) -> Conversion:
    """Convert the model at `source` and export it to the new folder `out` (written only once finished).

    The calibration's work is saved beside `out` as it goes (every save_every_s seconds) and a rerun with the same
    settings resumes it."""
    out_path = check_new_model_folder(out, "converted model")
    if calibration_blocks < 1:
        raise ConfigError(f"--calibration-blocks {calibration_blocks} must be at least 1")
    if not save_every_s >= 0:  # also refuses nan
        raise ConfigError(f"--save-every {save_every_s} must be a number of seconds >= 0")
    device = resolve_device(runtime)
    configure_backends(device)
    model = load_denoiser(source, device)
    check_conversion(model.config, kv_lora_rank, rope_dim)  # before any data is read
    tokenizer = load_tokenizer(str(model_folder(local_path(source, f"model {source}"))),
                               fix="the source model must be saved with its tokenizer (import-mdlm and training do)")
    amp = autocast_dtype(runtime, device)
    # Everything the saved work depends on: a rerun that differs in any of it is refused, not mixed in.
    store = ConversionStore(ConversionWork.beside(out_path), {
        "source": source, "source_config": json.loads(model.config.to_json_string()), "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": rope_dim, "calibration": calibration, "calibration_blocks": calibration_blocks,
        "device": device.type, "autocast": str(amp)})
    store.check()

    def bound(m: MDLMDenoiser) -> float:
        return math.exp(evaluate(m, denoiser_objective(m.config), blocks, CALIBRATION_BATCH, device, amp,
                                 seed=CALIBRATION_SEED).mean())

    moments, bounds, blocks, resumed = None, (None, None), np.zeros((0, 0), dtype=np.int64), 0
    if calibration is not None:
        blocks = load_sources([calibration], tokenizer, model.config.max_position_embeddings, cache_dir,
                              short_fix="give --calibration more text (blocks have the model's length)")
        blocks = blocks[:calibration_blocks]
        saved = store.load_moments()
        resumed = saved[0] if saved is not None else 0
        moments = attention_input_moments(model, blocks, CALIBRATION_BATCH, device, amp, progress, store,
                                          save_every_s, saved)
        if (source_bound := store.load_source_bound()) is None:
            source_bound = bound(model)
            store.save_source_bound(source_bound)
    converted = convert_to_mla(model, kv_lora_rank, rope_dim, moments).to(device)
    if calibration is not None:
        bounds = source_bound, bound(converted)
    export_model(converted, tokenizer, out_path)
    store.close()
    return Conversion(model.config.kv_cache_elements, converted.config.kv_cache_elements, len(blocks), *bounds,
                      resumed_blocks=resumed)
