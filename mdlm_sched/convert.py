"""`mdlm-sched convert-mla`: a multi-head / grouped-query attention MDLM converted to MLA (TransMLA), with its
calibration on noised data and the validation bound of source and result on the same draws."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mdlm_sched.artifacts import model_folder
from mdlm_sched.checkpoint import check_new_model_folder, export_model
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.data import load_sources, load_tokenizer
from mdlm_sched.errors import ConfigError
from mdlm_sched.hub import local_path
from mdlm_sched.models.denoiser import MDLMDenoiser
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.models.transmla import check_conversion, convert_to_mla
from mdlm_sched.objectives import denoiser_objective, evaluate
from mdlm_sched.runtime import autocast, autocast_dtype, configure_backends, resolve_device

CALIBRATION_SEED = 0  # noise draws of the calibration pass and of both bounds
CALIBRATION_BATCH = 8  # sequences per forward: bounded memory on a CPU and a GPU alike


@dataclass(frozen=True)
class Conversion:
    """What convert-mla did: KV elements per token of both models, and the bounds on the calibration blocks."""

    kv_source: int
    kv_converted: int
    blocks: int
    bound_source: float | None
    bound_converted: float | None


@torch.no_grad()
def attention_input_moments(model: MDLMDenoiser, blocks: np.ndarray, batch_size: int, device: torch.device,
                            amp: torch.dtype | None, progress: bool = True) -> list[torch.Tensor]:
    """E[x x^T] [d, d] (float64) of every block's attention input over the tokens of blocks [N, L], each block
    masked at a random time as in training (the denoiser sees noised inputs, so the statistics must too)."""
    objective = denoiser_objective(model.config)
    sums = [torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64, device=device)
            for _ in model.blocks]

    def hook(n: int):
        def accumulate(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # [B * L, d]
            sums[n].add_(x.t() @ x)
        return accumulate

    handles = [block.attn.register_forward_pre_hook(hook(n)) for n, block in enumerate(model.blocks)]
    generator = torch.Generator(device=device).manual_seed(CALIBRATION_SEED)
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibration", disable=not progress):
            x0 = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64)).to(device)
            with autocast(device, amp):
                objective.loss(model, *objective.prepare(x0, generator), training=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = blocks.shape[0] * blocks.shape[1]
    return [s.cpu() / tokens for s in sums]


def convert_command(source: str, out: str, kv_lora_rank: int, rope_dim: int, calibration: str | None,
                    calibration_blocks: int, cache_dir: str, runtime: RuntimeConfig,
                    progress: bool = True) -> Conversion:
    """Convert the model at `source` and export it to the new folder `out` (written only once finished)."""
    out_path = check_new_model_folder(out, "converted model")
    if calibration_blocks < 1:
        raise ConfigError(f"--calibration-blocks {calibration_blocks} must be at least 1")
    device = resolve_device(runtime)
    configure_backends(device)
    model = load_denoiser(source, device)
    check_conversion(model.config, kv_lora_rank, rope_dim)  # before any data is read
    tokenizer = load_tokenizer(str(model_folder(local_path(source, f"model {source}"))),
                               fix="the source model must be saved with its tokenizer (import-mdlm and training do)")
    amp = autocast_dtype(runtime, device)
    moments, bounds, blocks = None, (None, None), np.zeros((0, 0), dtype=np.int64)
    if calibration is not None:
        blocks = load_sources([calibration], tokenizer, model.config.max_position_embeddings, cache_dir,
                              short_fix="give --calibration more text (blocks have the model's length)")
        blocks = blocks[:calibration_blocks]
        moments = attention_input_moments(model, blocks, CALIBRATION_BATCH, device, amp, progress)
    converted = convert_to_mla(model, kv_lora_rank, rope_dim, moments).to(device)
    if calibration is not None:
        bounds = tuple(math.exp(evaluate(m, denoiser_objective(m.config), blocks, CALIBRATION_BATCH, device, amp,
                                         seed=CALIBRATION_SEED).mean()) for m in (model, converted))
    export_model(converted, tokenizer, out_path)
    return Conversion(model.config.kv_cache_elements, converted.config.kv_cache_elements, len(blocks), *bounds)
