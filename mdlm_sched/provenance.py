"""What every results file carries: git revision, library versions, hardware, time."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mdlm_sched.sweep_records import UTC_FORMAT

_PACKAGES = ("mdlm-sched", "torch", "transformers", "tokenizers", "safetensors", "numpy", "omegaconf")


def git_revision() -> str | None:
    """HEAD of the checkout this package runs from, with "-dirty" for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Python and the installed versions of the libraries results depend on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__  # the running torch, also where it is not pip-installed
    return out


def hardware(device: torch.device) -> dict[str, Any]:
    """The device results were measured on."""
    info: dict[str, Any] = {"device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def provenance(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """git, versions, hardware (device: rank 0's; world_size: processes under torchrun), command line and UTC time."""
    return {
        "git": git_revision(),
        "versions": versions(),
        "hardware": {**hardware(device), "world_size": world_size},
        "argv": sys.argv,
        "utc": time.strftime(UTC_FORMAT, time.gmtime()),
    }
