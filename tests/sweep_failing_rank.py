"""`mdlm-sched sweep SWEEP.yaml` with the sampling of one schedule failing on rank 1 only (for tests/test_ddp.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sweep_failing_rank.py SWEEP.yaml SCHEDULE

The failure is raised where a real one (out of memory) would be: inside rank 1's share of the sampler batches.
"""

import sys

import torch

import mdlm_sched.generate as generate
from mdlm_sched.cli import main
from mdlm_sched.ranks import launch_context

config, failing = sys.argv[1:]
real_sample = generate.sample


def sample(models, schedule, *args, **kwargs):
    if schedule.spec == failing and launch_context().rank == 1:
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in failure on rank 1 only)")
    return real_sample(models, schedule, *args, **kwargs)


generate.sample = sample
raise SystemExit(main(["sweep", "--no-progress", config]))
