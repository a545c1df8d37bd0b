"""Multi-process runs under torchrun: each rank on its own GPU, in the process group for the run.

`distributed(runtime)` reads the rank (ranks.launch_context), puts each rank on its own GPU
(cuda:LOCAL_RANK), joins the process group (NCCL on GPUs, gloo on the CPU) and leaves it at the end,
also on an error. Without torchrun it gives the one-process context and the configured device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mdlm_sched.config import RuntimeConfig
from mdlm_sched.errors import ConfigError
from mdlm_sched.ranks import DistContext, launch_context
from mdlm_sched.runtime import resolve_device


@contextmanager
def distributed(runtime: RuntimeConfig) -> Iterator[tuple[DistContext, torch.device]]:
    """This process's context and device for one run; under torchrun, in the process group for its duration.

    Each rank takes its own GPU, cuda:LOCAL_RANK. A process group that the caller has set up already (a
    benchmark running several commands in one job) is used and left in place.
    """
    ctx = launch_context()
    device = resolve_device(runtime)
    if ctx.world_size == 1:
        yield ctx, device
        return
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"runtime.device={runtime.device} names one GPU, but under torchrun every rank takes "
                              f"its own (cuda:LOCAL_RANK); set runtime.device=cuda or auto")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        yield ctx, device
    finally:
        if owner:
            dist.destroy_process_group()
