"""Device, precision and per-step seeding."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mdlm_sched.config import RuntimeConfig
from mdlm_sched.errors import UserError

# Failures a stage records and moves past (a sweep point, the pipeline's analysis): the device ran out of
# memory, or the input was bad. Anything else is a bug and must surface with its traceback.
RECORDED_FAILURES = (torch.OutOfMemoryError, UserError)


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """runtime.device, with "auto" meaning the first CUDA GPU if there is one, else the CPU."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def autocast_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (bf16 on GPU by default) or None for plain float32."""
    if runtime.precision == "bf16" or (runtime.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> contextlib.AbstractContextManager:
    """torch.autocast for dtype, or a no-op context for float32; cache=False: no cache of the weights' casts."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def configure_backends(device: torch.device) -> None:
    """TF32 for float32 matmuls on GPU (the float32 output head and losses stay float32 tensors)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Independent random streams of a run (step_seed's `stream`, each < 8). Sampling seeds each batch
# from (seed, batch index) on STREAM_SAMPLE; the per-step analysis masks its validation batches on
# STREAM_ANALYSIS_MASK and samples its all-heavy trajectories on STREAM_ANALYSIS_TRAJECTORY.
STREAM_NOISE, STREAM_DROPOUT, STREAM_INIT, STREAM_VAL, STREAM_SAMPLE = 0, 1, 2, 3, 4
STREAM_ANALYSIS_MASK, STREAM_ANALYSIS_TRAJECTORY = 5, 6


def step_seed(seed: int, step: int, stream: int) -> int:
    """A seed for one (step, stream) of a run: any step replays after a resume without saved RNG state."""
    return (seed * 1_000_003 + step) * 8 + stream


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A torch.Generator on device, seeded for (seed, step, stream)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, stream))


def rank_seed(seed: int, rank: int) -> int:
    """A seed for one rank's share of randomness that differs by rank (dropout under torchrun).

    Rank 0 keeps `seed`, so a one-process run draws what it drew before multi-process training existed.
    """
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
