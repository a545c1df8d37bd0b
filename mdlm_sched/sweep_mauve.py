"""MAUVE of a sweep's points computed afterwards, from the judge features the sweep saved.

A sweep with `save_features: true` writes features/<point>.npy and features/reference.npy (the judge's
features, metrics.judge_features). `mdlm-sched mauve SWEEP_DIR` computes each point's MAUVE from them on
any machine that has mauve-text, exactly as `mauve: true` would have during the sweep (the same features
and k-means seeds), and writes mauve.json beside the results; SweepDir.read gives the points that MAUVE.
This is for GPU machines that lack mauve-text: the features travel, the package need not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mdlm_sched.artifacts import SweepDir
from mdlm_sched.errors import DataError
from mdlm_sched.fileio import atomic_write_json
from mdlm_sched.metrics import mauve_scores
from mdlm_sched.sweep_records import MauveSummary


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing: {what}; run the sweep with save_features: true")
    return np.load(path)


def mauve_from_features(out: SweepDir, seeds: Sequence[int], progress: bool = True,
                        echo: Callable[[str], None] = print) -> dict[str, MauveSummary]:
    """Every point's MAUVE against the saved reference features, once per k-means seed; written to mauve.json."""
    if not out.results.is_file():
        raise DataError(f"{out.root} holds no sweep results ({out.results.name}); give the out folder of a mdlm-sched "
                        f"sweep")
    results = out.read()
    reference = _load(out.reference_features, "the reference's judge features")
    scores: dict[str, MauveSummary] = {}
    for point in tqdm(results.points, desc="mauve", disable=not progress):
        features = _load(out.feature_file(point.slug), f"the judge features of point {point.key}")
        scores[point.key] = MauveSummary(**mauve_scores(features, reference, seeds))
        echo(f"  {point.label} T={point.steps} seed={point.seed}: MAUVE {scores[point.key].mean:.3f}")
    atomic_write_json(out.mauve, {key: asdict(s) for key, s in scores.items()})
    return scores
