"""Model schedules: segment strings, presets, fractions, t-thresholds, any number of models."""

from __future__ import annotations

import pytest

from mdlm_sched.errors import ScheduleError
from mdlm_sched.schedule import PRESETS, model_keys, parse_schedule

PAIR = ["small", "large"]  # light to heavy


def segs(spec: str, steps: int = 1000, names=PAIR) -> list[tuple[str, int]]:
    return parse_schedule(spec, steps, names).segments()


def test_paper_segment_strings_use_light_and_heavy_letters():
    assert segs("L125,H750,L125") == [("small", 125), ("large", 750), ("small", 125)]
    assert segs("H375,L250,H375") == [("large", 375), ("small", 250), ("large", 375)]
    assert segs("small:250,large:750") == [("small", 250), ("large", 750)]
    assert segs("S10,H990") == [("small", 10), ("large", 990)]  # initial of "small"


@pytest.mark.parametrize("preset, expected", [
    ("all-large", [("large", 1000)]),
    ("all-small", [("small", 1000)]),
    ("early-small", [("small", 250), ("large", 750)]),
    ("late-small", [("large", 750), ("small", 250)]),
    ("sandwich", [("small", 125), ("large", 750), ("small", 125)]),
    ("small-in-the-middle", [("large", 375), ("small", 250), ("large", 375)]),
])
def test_presets_at_the_papers_250_of_1000(preset, expected):
    assert segs(preset) == expected


def test_preset_fraction_and_rounding():
    assert segs("early-small@0.1", 1000) == [("small", 100), ("large", 900)]
    assert segs("sandwich@0.25", 10) == [("small", 1), ("large", 8), ("small", 1)]  # round(2.5) = 2 light steps
    assert segs("sandwich@0.3", 10) == [("small", 1), ("large", 7), ("small", 2)]
    assert segs("small-in-the-middle@0.5", 8) == [("large", 2), ("small", 4), ("large", 2)]
    assert parse_schedule("sandwich@0", 50, PAIR).counts() == {"large": 50}
    assert parse_schedule("late-small@1", 50, PAIR).counts() == {"small": 50}


def test_alternating_spreads_light_steps_evenly():
    half = parse_schedule("alternating@0.5", 8, PAIR).names
    assert half == ("large", "small") * 4
    quarter = parse_schedule("alternating", 1000, PAIR)
    assert quarter.counts() == {"small": 250, "large": 750}
    light = [i for i, name in enumerate(quarter.names) if name == "small"]
    assert {b - a for a, b in zip(light, light[1:])} == {4}


def test_t_thresholds_mean_the_same_at_any_step_count():
    spec = "t:L>0.875,H>0.125,L"
    assert segs(spec, 1000) == segs("sandwich", 1000)
    assert segs(spec, 8) == [("small", 1), ("large", 6), ("small", 1)]
    assert segs(spec, 80) == [("small", 10), ("large", 60), ("small", 10)]
    for steps in (8, 80, 1000):
        assert parse_schedule(spec, steps, PAIR).counts()["small"] == steps // 4


def test_any_number_of_named_models():
    names = ["small", "medium", "large"]
    keys = model_keys(names)
    assert keys["H"] == "large" and keys["L"] == "small" and keys["M"] == "medium" and keys["S"] == "small"
    assert segs("S100,M800,H100", 1000, names) == [("small", 100), ("medium", 800), ("large", 100)]
    assert segs("t:small>0.9,medium>0.5,large", 10, names) == [("small", 1), ("medium", 4), ("large", 5)]
    # presets put the lightest against the heaviest model
    assert parse_schedule("sandwich", 1000, names).counts() == {"small": 250, "large": 750}


def test_ambiguous_initials_are_not_keys():
    keys = model_keys(["mini", "medium", "large"])
    assert "M" not in keys


def test_single_model_runs_every_preset():
    for preset in PRESETS:
        assert parse_schedule(preset, 20, ["only"]).counts() == {"only": 20}


def test_segments_str_and_spec_are_kept():
    schedule = parse_schedule("sandwich", 1000, PAIR)
    assert schedule.spec == "sandwich"
    assert schedule.segments_str() == "small:125,large:750,small:125"
    assert len(schedule) == 1000 and schedule[0] == "small" and schedule[500] == "large"


@pytest.mark.parametrize("spec, steps, fragment", [
    ("L125,H750,L125", 500, "add up to 1000 steps but steps=500"),
    ("X100,H900", 1000, "'X' names no model"),
    ("sandwhich", 1000, "is not a preset"),
    ("sandwich@1.5", 1000, "fraction 1.5 must be in [0, 1]"),
    ("sandwich@abc", 1000, "is not a fraction"),
    ("t:L>0.2,H>0.5,L", 1000, "thresholds must fall"),
    ("t:L>0.5", 1000, "the last part must be a model key"),
    ("t:L0.5,H", 1000, "is not KEY>t"),
    ("L125,H,L125", 1000, "is not KEY followed by a step count"),
    ("all-large", 0, "steps=0 must be in [1, 1,000,000]"),
    ("all-large", 10**12, "steps=1000000000000 must be in [1, 1,000,000]"),
])
def test_bad_schedules_name_the_problem(spec, steps, fragment):
    with pytest.raises(ScheduleError) as info:
        parse_schedule(spec, steps, PAIR)
    message = str(info.value)
    assert fragment in message and "\n" not in message
