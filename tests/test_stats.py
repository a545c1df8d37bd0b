"""Bootstrap intervals: exact where the answer is known, stratified by seed, honest coverage, and the verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mdlm_sched.errors import ConfigError
from mdlm_sched.stats import (change_verdict, paired_log_ratio, paired_mean_difference, pooled_ppl_interval,
                              ratio_curve, resample_counts)
from mdlm_sched.summary import best_placement, paired, pareto_front, summarize, wall_spread
from mdlm_sched.sweep_compare import check_pairable, compare_points
from mdlm_sched.sweep_records import CacheUse, EntropySummary, PerSample, PPLSummary, SamplingFlops, SweepPoint, Timing


def test_resample_counts_draw_n_units_with_replacement():
    counts = resample_counts(7, 1000, np.random.default_rng(0))
    assert counts.shape == (1000, 7) and (counts.sum(axis=1) == 7).all()
    assert 0.9 < counts.mean() < 1.1 and (counts == 0).any()  # some units left out of some resamples


def test_a_constant_per_token_shift_has_a_degenerate_interval_at_the_shift():
    rng = np.random.default_rng(1)
    tokens = [rng.integers(50, 200, 64).astype(float) for _ in range(2)]
    base = [rng.gamma(5.0, 1.0, 64) * t for t in tokens]
    shifted = [b + 0.25 * t for b, t in zip(base, tokens)]  # every token 0.25 nats worse, in every sample
    point, low, high = paired_log_ratio(shifted, tokens, base, tokens, resamples=2000)
    assert point == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_resampling_is_within_each_seed():
    # Seed 0's samples are all 0.1 nats/token worse, seed 1's all 0.5: pooled, 0.3 whatever the resample, as long as
    # each seed keeps its share of samples; mixing the seeds in one resample would move it.
    tokens = [np.full(40, 100.0), np.full(40, 100.0)]
    base = [np.full(40, 300.0), np.full(40, 300.0)]
    worse = [base[0] + 10.0, base[1] + 50.0]
    point, low, high = paired_log_ratio(worse, tokens, base, tokens, resamples=2000)
    assert point == pytest.approx(0.3) and high - low == pytest.approx(0.0, abs=1e-12)


def test_pairing_is_what_makes_the_interval_narrow():
    # b = a + small noise per sample: the paired interval is far narrower than the spread of either side.
    rng = np.random.default_rng(2)
    tokens = [np.full(128, 500.0)]
    a = [rng.normal(3.0, 0.5, 128) * 500]
    b = [a[0] + rng.normal(0.0, 0.01, 128) * 500]
    _, low, high = paired_log_ratio(b, tokens, a, tokens, resamples=2000)
    _, alone_low, alone_high = (math.log(x) for x in pooled_ppl_interval(a[0], tokens[0], resamples=2000))
    assert high - low < (alone_high - alone_low) / 20


def test_paired_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    truth, covered, runs = 0.05, 0, 120
    for _ in range(runs):
        tokens = [rng.integers(80, 120, 60).astype(float)]
        per_token = rng.normal(3.0, 0.3, 60)  # the sample's own difficulty, shared by both schedules
        b = [per_token * tokens[0]]
        a = [(per_token + truth + rng.normal(0.0, 0.1, 60)) * tokens[0]]
        _, low, high = paired_log_ratio(a, tokens, b, tokens, resamples=1000, seed=int(rng.integers(1 << 30)))
        covered += low <= truth <= high
    assert 0.88 <= covered / runs <= 0.995, covered


def test_entropy_difference_and_verdicts():
    point, low, high = paired_mean_difference([np.array([5.0, 5.2, 5.1])], [np.array([5.0, 5.0, 5.0])], 2000)
    assert point == pytest.approx(0.1) and low <= point <= high
    assert change_verdict(0.01, 0.09) == "gen PPL measurably higher (95% CI +1.0% to +9.0%)"
    assert change_verdict(-0.09, -0.01).startswith("gen PPL measurably lower")
    assert change_verdict(-0.03, 0.05) == "no difference in gen PPL detectable at ±5.0%"


def test_ratio_curve_bands_and_the_interval_of_the_peak():
    rng = np.random.default_rng(4)
    counts = rng.integers(10, 20, (50, 6)).astype(float)
    per_token = np.array([0.1, 0.2, 0.9, 0.3, 0.2, 0.1])  # a clear peak at index 2
    totals = counts * (per_token + rng.normal(0, 0.02, (50, 6)))
    curve = ratio_curve(totals, counts, 2000)
    assert np.all(curve["low"] <= curve["estimate"]) and np.all(curve["estimate"] <= curve["high"])
    assert curve["peak"] == (2, 2)
    flat = ratio_curve(counts * 0.5 + rng.normal(0, 0.5, (50, 6)), counts, 2000)  # no peak to speak of
    assert flat["peak"][1] - flat["peak"][0] >= 2


def _point(label: str, segments: str, seed: int, nll: np.ndarray, tokens: np.ndarray, heavy: bool,
           wall: float, utc: str = "2026-12-01T00:00:00Z") -> SweepPoint:
    sequences = {"large": 8} if heavy else {"small": 2, "large": 6}
    gen = PPLSummary(1.0, float(nll.sum()), int(tokens.sum()), len(nll), "judge", "mdlm")
    return SweepPoint(
        key=f"{segments}|T8|seed{seed}|n{len(nll)}", num_samples=len(nll), gen_ppl=gen, gen_ppl_rules={"mdlm": gen},
        entropy=EntropySummary(5.0, 0.0, len(nll), "nats"),
        per_sample=PerSample({"mdlm": nll.tolist()}, {"mdlm": tokens.tolist()}, [5.0] * len(nll)),
        provenance={"utc": utc},
        label=label, groups=["g"], segments=segments, steps=8, seed=seed, steps_per_model=sequences,
        light_fraction=0 if heavy else 0.25,
        flops=SamplingFlops(blocks_only=1, full=1, baseline_model="large", baseline_blocks_only=1, baseline_full=1,
                            saving_blocks_only=0.0 if heavy else 0.16, saving_full=0.0, calls={"large": 8},
                            sequences_run=sequences, convention="",
                            per_forward_one_sequence={"small": {"full": 2}, "large": {"full": 4}}),
        cache=CacheUse(8, 8, 0, 0.0, 1), wall_s=wall, batch_wall_s=[wall], judge_s=0.0)


def test_summary_rows_pool_seeds_pair_with_all_heavy_and_set_wall_clock_against_its_spread():
    rng = np.random.default_rng(5)
    tokens = {s: rng.integers(80, 120, 32).astype(float) for s in (0, 1)}
    base = {s: rng.normal(4.0, 0.4, 32) * tokens[s] for s in (0, 1)}
    points = [_point("all-large", "large:8", s, base[s], tokens[s], True, 10.0 + s, f"2026-12-01T00:{10 * s:02d}:00Z")
              for s in (0, 1)]
    points += [_point("late-small", "large:6,small:2", s, base[s] + 0.1 * tokens[s], tokens[s], False, 8.0,
                      f"2026-12-01T00:{1 + 18 * s:02d}:00Z") for s in (0, 1)]  # at 00:01 and 00:19
    timings = [Timing(points[0].key, 0, 12.0, "2026-12-01T00:20:00Z")]  # all-large at 00:00, 00:10, 00:20
    rows = {r["label"]: r for r in summarize(points, timings)}
    late = rows["late-small"]
    assert late["seeds"] == 2 and late["pairs"] == 64 and late["paired_seeds"] == [0, 1]
    assert late["ppl_ratio"] == pytest.approx(math.exp(0.1)) and late["ppl_ratio_low"] == pytest.approx(math.exp(0.1))
    assert late["gen_ppl"] == pytest.approx(math.exp(sum((base[s] + 0.1 * tokens[s]).sum() for s in (0, 1)) /
                                                     sum(tokens[s].sum() for s in (0, 1))))
    # each point against the baseline timing nearest in time: 00:00 (10 s) and the retime at 00:20 (12 s)
    assert late["wall_saving"] == pytest.approx(1 - (8.0 / 10.0 + 8.0 / 12.0) / 2)
    assert late["wall_spread"] == pytest.approx((12.0 - 10.0) / 11.0)  # first batches timed 10 s and again 12 s
    assert late["saving_head_everywhere"] == pytest.approx(1 - (2 * 2.0 + 6 * 4.0) / (8 * 4.0))
    assert wall_spread(points[:1], [])["measurements"] == 1 and math.isnan(wall_spread(points[:1], [])["relative"])
    assert paired(points[2:], points[:1], "mdlm")["paired_seeds"] == [0]  # only the seeds both ran
    assert pareto_front([(1.0, 10.0, "a"), (0.8, 11.0, "b"), (0.9, 12.0, "c"), (0.5, 20.0, "d")]) == ["d", "b", "a"]


def test_best_placement_says_whether_it_is_separated_from_the_runner_up():
    rng = np.random.default_rng(6)
    tokens = rng.integers(80, 120, 64).astype(float)
    base = rng.normal(4.0, 0.4, 64) * tokens
    points = [_point("all-large", "large:8", 0, base, tokens, True, 10.0)]
    for label, shift, noise in (("late-small", 0.02, 0.001), ("sandwich", 0.02, 0.05), ("early-small", 0.3, 0.001)):
        point = _point(label, f"{label}:8", 0, base + (shift + rng.normal(0, noise, 64)) * tokens, tokens, False, 8)
        points.append(point)
    choice = best_placement(points, "g")
    assert choice["placement"] in ("late-small", "sandwich") and choice["runner_up"] in ("late-small", "sandwich")
    assert choice["separated"] is False  # 0.02 against 0.02 + noise: not told apart
    far = best_placement([p for p in points if p.label != "sandwich"], "g")
    assert far["placement"] == "late-small" and far["runner_up"] == "early-small" and far["separated"] is True


def test_two_sweeps_pair_only_where_models_judge_and_randomness_agree():
    shared = {"models": {"large": "runs/large"}, "judge": "gpt2", "batch_size": 8, "sampler_randomness": "v2",
              "token_rule": "mdlm", "latent_cache": False}
    assert check_pairable(shared, {**shared, "latent_cache": True}) == ["latent_cache"]
    with pytest.raises(ConfigError, match="differ in judge"):
        check_pairable(shared, {**shared, "judge": "gpt2-large"})
    with pytest.raises(ConfigError, match="differ in sampler_randomness"):
        check_pairable(shared, {**shared, "sampler_randomness": "v1"})
    rng = np.random.default_rng(7)
    tokens = rng.integers(80, 120, 16).astype(float)
    nll = rng.normal(4.0, 0.4, 16) * tokens
    a = [_point("all-large", "large:8", s, nll, tokens, True, 10.0) for s in (0, 1)]
    b = [_point("all-large", "large:8", 1, nll + 0.05 * tokens, tokens, True, 4.0),  # seed 1 only
         _point("sandwich", "small:1,large:6,small:1", 0, nll, tokens, False, 8.0)]  # not in A: no row
    (row,) = compare_points(a, b)
    assert row["pairs"] == 16 and row["ppl_ratio"] == pytest.approx(math.exp(0.05))  # paired on seed 1 alone
    assert row["wall_ratio"] == pytest.approx(0.4) and row["mauve"] == {"a": None, "b": None}
    assert row["seconds_per_sample"] == {"a": pytest.approx(10.0 / 16), "b": pytest.approx(4.0 / 16)}
    assert row["against_a_heavy"]["a"]["ppl_ratio"] == pytest.approx(1) and row["against_a_heavy"]["a"]["pairs"] == 32
    assert row["against_a_heavy"]["b"]["ppl_ratio"] == pytest.approx(math.exp(0.05))  # B's schedule, A's baseline
    assert row["against_a_heavy"]["b"]["pairs"] == 16 and row["heavy_model"] == "large"
