"""Bootstrap intervals, the way every comparison in this project is made (numpy only, seeded).

A resample is drawn as counts: how often each unit (a sample, a validation block, a trajectory) is
taken, a multinomial [B, n] of n draws; a statistic that is a ratio of sums is then a ratio of
matrix products, so 10,000 resamples of thousands of units cost milliseconds. Intervals are
percentile intervals at 95%.

Paired comparisons: schedules sampled with the same seed share their random numbers, so sample i of
seed s is paired across schedules. A paired resample takes the same indices for both sides, within
each seed (stratified by seed), which is what makes the intervals narrow where the trajectories
share their early steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 20260401  # every interval is reproducible from its inputs


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] float64: how many times each of n units is drawn in each bootstrap resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def interval(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval (LEVEL) of bootstrap values along axis; resamples where the statistic is undefined
    (nan: a ratio whose resample drew no unit with a count) are left out, and all of them undefined gives nan."""
    tail = (1 - LEVEL) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan slice: its interval is nan
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=axis)
    return low, high


def paired_log_ratio(nll_a: Sequence[np.ndarray], tok_a: Sequence[np.ndarray], nll_b: Sequence[np.ndarray],
                     tok_b: Sequence[np.ndarray], resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[float, float, float]:
    """log(PPL_a / PPL_b) of pooled gen PPLs and its paired 95% interval.

    Each argument holds one array [n_s] per seed s (sample i of seed s is paired between a and b);
    PPL = exp(sum NLL / sum tokens) over every sample of every seed; resampling is within each seed.
    """
    rng = np.random.default_rng(seed)
    sums = np.zeros((4, resamples))  # resampled sum NLL a, tokens a, NLL b, tokens b
    for parts in zip(nll_a, tok_a, nll_b, tok_b):
        counts = resample_counts(len(parts[0]), resamples, rng)  # one draw of indices for both sides
        sums += np.stack([counts @ np.asarray(p, dtype=np.float64) for p in parts])
    point = (sum(np.sum(x) for x in nll_a) / sum(np.sum(x) for x in tok_a)
             - sum(np.sum(x) for x in nll_b) / sum(np.sum(x) for x in tok_b))
    low, high = interval(sums[0] / sums[1] - sums[2] / sums[3])
    return float(point), float(low), float(high)


def paired_mean_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], resamples: int = RESAMPLES,
                           seed: int = SEED) -> tuple[float, float, float]:
    """mean(a) - mean(b) over all paired samples of all seeds (e.g. entropy) and its paired 95% interval."""
    rng = np.random.default_rng(seed)
    diff_sum, n_sum = np.zeros(resamples), np.zeros(resamples)
    for xa, xb in zip(a, b):
        counts = resample_counts(len(xa), resamples, rng)
        diff_sum += counts @ (np.asarray(xa, dtype=np.float64) - np.asarray(xb, dtype=np.float64))
        n_sum += len(xa)
    point = float(np.mean(np.concatenate([np.asarray(x) - np.asarray(y) for x, y in zip(a, b)])))
    low, high = interval(diff_sum / n_sum)
    return point, float(low), float(high)


def mean_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """The mean of values [n] over units (e.g. the validation loss of each block) and its 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    counts = resample_counts(len(values), resamples, np.random.default_rng(seed))
    low, high = interval(counts @ values / len(values))
    return float(values.mean()), float(low), float(high)


def pooled_ppl_interval(nll: np.ndarray, tokens: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = SEED) -> tuple[float, float, float]:
    """Pooled gen PPL exp(sum NLL / sum tokens) of one set of samples and its 95% interval (unpaired)."""
    counts = resample_counts(len(nll), resamples, np.random.default_rng(seed))
    low, high = interval(np.exp(counts @ nll / (counts @ tokens)))
    return math.exp(float(np.sum(nll)) / float(np.sum(tokens))), float(low), float(high)


def ratio_curve(totals: np.ndarray, counts: np.ndarray, resamples: int,
                seed: int = SEED) -> dict[str, np.ndarray | tuple[int, int]]:
    """A curve of ratio estimates sum(totals) / sum(counts) over units, at S points, with bootstrap intervals.

    totals, counts: [n_units, S], the same units at every point (so the points are resampled together).
    Returns the estimate [S], its 95% band low/high [S] (nan where fewer than two units have a count), and the
    95% interval of the index where the curve peaks (argmax), each resample giving one argmax.
    """
    weights = resample_counts(totals.shape[0], resamples, np.random.default_rng(seed))
    with np.errstate(invalid="ignore", divide="ignore"):  # a point no resample can estimate stays nan
        curves = (weights @ totals) / (weights @ counts)  # [B, S]
        estimate = totals.sum(axis=0) / counts.sum(axis=0)
    low, high = interval(curves)
    few = (counts > 0).sum(axis=0) < 2  # one unit with a count (or none): no spread to estimate, no band
    low, high = np.where(few, np.nan, low), np.where(few, np.nan, high)
    peaks = np.nanargmax(np.where(np.isnan(curves), -np.inf, curves), axis=1)
    peak_low, peak_high = interval(peaks)
    return {"estimate": estimate, "low": low, "high": high, "peak": (int(round(peak_low)), int(round(peak_high)))}


def change_verdict(low: float, high: float, what: str = "gen PPL") -> str:
    """The verdict an interval of a relative change (ratio - 1) supports: worse, better, or the size not detectable.

    low, high: the interval of (ratio - 1), e.g. -0.03 and 0.05 for a ratio interval [0.97, 1.05].
    """
    if low > 0:
        return f"{what} measurably higher (95% CI {low:+.1%} to {high:+.1%})"
    if high < 0:
        return f"{what} measurably lower (95% CI {low:+.1%} to {high:+.1%})"
    return f"no difference in {what} detectable at ±{max(high, -low):.1%}"
