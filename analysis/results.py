"""Results files: crash-safe JSON-lines appends, and the statistics reports draw from them.

A results file gets one JSON object per line, appended and fsynced as each piece of work ends, so
that a crash loses at most the line being written. A torn last line (the process killed mid-write)
is ignored when reading and cut off before the next append.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdlm_sched.errors import DataError

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a results file ([] if there is no file); a torn last line is skipped."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:  # no newline after it: the write was cut short
                log.warning("%s: ignoring a torn last line (an interrupted write)", path)
                continue
            raise DataError(f"{path}:{n + 1} is not a JSON line (edited by hand?); repair or delete that line") \
                from None
    return out


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a line, durably (flush + fsync); a torn last line is cut off first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def pareto_front(points: Iterable[tuple[float, float, Any]]) -> list[Any]:
    """Items of (cost, loss, item) not dominated by another (cheaper or equal cost and lower loss), by cost."""
    front, best = [], math.inf
    for cost, loss, item in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append(item)
            best = loss
    return front
