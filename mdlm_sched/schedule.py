"""Model schedules: which named model takes each of the T denoising steps.

A schedule is written in one of three ways (`parse_schedule`):

- **Segments**, counted in steps: ``"L125,H750,L125"``. Each segment is a model key and a step count;
  the counts must add up to T.
- **Presets**, with the fraction of light steps after ``@`` (default 0.25): ``"sandwich"``,
  ``"early-small@0.1"``. They place the light model against the heavy one, so they mean the same at
  any T (the light step count is round(fraction * T)):
    all-large, all-small, early-small, late-small, sandwich (large in the middle: light steps split
    between the start and the end), small-in-the-middle, alternating (light steps spread evenly).
- **t-thresholds**, so that a schedule means the same at any T: ``"t:L>0.875,H>0.125,L"``. Read from
  t = 1 down: L while t > 0.875, then H while t > 0.125, then L to the end. A step belongs to the
  segment that holds its midpoint, so that at T = 1000 this is exactly L125,H750,L125.

Model keys: a model's full name (``small``), ``H`` for the heavy model (most FLOPs per forward) and
``L`` for the light one (fewest), as in the seed paper, and the upper-case initial of any other
name (``S`` for small, ``M`` for medium) when it is unambiguous. Any number of models may be named.

Step i of T runs from t_i = 1 - i (1 - t_min) / T down to t_{i+1} (`time_grid`). No torch here: the
report reads preset names from this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from mdlm_sched.errors import ConfigError, ScheduleError

PRESETS = ("all-large", "all-small", "early-small", "late-small", "sandwich", "small-in-the-middle", "alternating")
# The presets that place light steps among heavy ones (the other two use one model throughout), and the four
# placements of 250 of 1000 light steps that the seed paper compares.
PLACEMENTS = tuple(p for p in PRESETS if not p.startswith("all-"))
PAPER_PLACEMENTS = ("early-small", "late-small", "sandwich", "small-in-the-middle")
DEFAULT_FRACTION = 0.25
DEFAULT_T_MIN = 1e-5  # MDLM samples on linspace(1, 1e-5, T + 1)
# The most denoising steps a schedule may have: it is a list of T steps, so a typo must not become a huge one.
MAX_STEPS = 1_000_000


def check_steps(steps: int, what: str = "steps") -> None:
    """T must be a step count a schedule can hold: 1 to MAX_STEPS (ScheduleError otherwise)."""
    if not 1 <= steps <= MAX_STEPS:
        raise ScheduleError(f"{what}={steps} must be in [1, {MAX_STEPS:,}] (denoising steps T)")

_SEGMENT = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*?):?(\d+)$")
_THRESHOLD = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*?)>([0-9.eE+\-]+)$")


def time_grid(steps: int, t_min: float = DEFAULT_T_MIN) -> np.ndarray:
    """The T + 1 times [T + 1] (float64) of ancestral sampling: step i goes from t[i] to t[i + 1]."""
    return np.linspace(1.0, t_min, steps + 1, dtype=np.float64)


def grid_steps(steps: int, grid: int) -> list[int]:
    """`grid` step indices evenly spaced over 0..steps-1, both ends included (the per-step analysis's grid)."""
    if not 1 <= grid <= steps:
        raise ConfigError(f"grid={grid} must be in [1, steps={steps}]; evaluate at most every step")
    return sorted({int(round(x)) for x in np.linspace(0, steps - 1, grid)})


@dataclass(frozen=True)
class ModelSchedule:
    """The model name of every denoising step, with the spec it was built from."""

    names: tuple[str, ...]  # names[i] is the model of step i; len() is T
    spec: str

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> str:
        return self.names[i]

    def segments(self) -> list[tuple[str, int]]:
        """Run-length form: [(model, steps), ...] in step order."""
        return [(name, len(list(run))) for name, run in groupby(self.names)]

    def segments_str(self) -> str:
        """Run-length form as a string, with full model names: "small:125,large:750,small:125"."""
        return ",".join(f"{name}:{count}" for name, count in self.segments())

    def counts(self) -> dict[str, int]:
        """Steps per model."""
        out: dict[str, int] = {}
        for name in self.names:
            out[name] = out.get(name, 0) + 1
        return out


def model_keys(names_light_to_heavy: Sequence[str]) -> dict[str, str]:
    """Key -> model name: every full name, H (heaviest), L (lightest), and unambiguous initials.

    names_light_to_heavy: the model names ordered by FLOPs per forward, lightest first.
    """
    names = list(names_light_to_heavy)
    keys = {name: name for name in names}
    keys.setdefault("H", names[-1])
    keys.setdefault("L", names[0])
    initials: dict[str, list[str]] = {}
    for name in names:
        initials.setdefault(name[0].upper(), []).append(name)
    for letter, owners in initials.items():
        if len(owners) == 1:
            keys.setdefault(letter, owners[0])
    return keys


def _resolve(key: str, keys: dict[str, str], spec: str) -> str:
    if key not in keys:
        known = ", ".join(f"{k}={v}" for k, v in keys.items() if k != v)
        names = ", ".join(sorted(set(keys.values())))
        raise ScheduleError(f"schedule {spec!r}: {key!r} names no model; use a model name ({names}) or a letter "
                            f"({known})")
    return keys[key]


def _light_steps(fraction: float, steps: int, spec: str) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ScheduleError(f"schedule {spec!r}: fraction {fraction} must be in [0, 1]")
    return round(fraction * steps)


def _preset(name: str, fraction: float, steps: int, light: str, heavy: str, spec: str) -> list[str]:
    n = _light_steps(fraction, steps, spec)
    if name == "all-large":
        return [heavy] * steps
    if name == "all-small":
        return [light] * steps
    if name == "early-small":
        return [light] * n + [heavy] * (steps - n)
    if name == "late-small":
        return [heavy] * (steps - n) + [light] * n
    if name == "sandwich":
        head = n // 2
        return [light] * head + [heavy] * (steps - n) + [light] * (n - head)
    if name == "small-in-the-middle":
        head = (steps - n) // 2
        return [heavy] * head + [light] * n + [heavy] * (steps - n - head)
    # alternating: step i is light when floor((i + 1) n / T) steps past floor(i n / T); n = T/2 gives H,L,H,L,...
    return [light if (i + 1) * n // steps > i * n // steps else heavy for i in range(steps)]


def _segments(spec: str, steps: int, keys: dict[str, str]) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        match = _SEGMENT.match(part.strip())
        if not match:
            raise ScheduleError(f"schedule {spec!r}: segment {part!r} is not KEY followed by a step count "
                                f"(e.g. L125 or small:125)")
        out += [_resolve(match.group(1), keys, spec)] * int(match.group(2))
    if len(out) != steps:
        raise ScheduleError(f"schedule {spec!r}: segments add up to {len(out)} steps but steps={steps}; "
                            f"make them add up, or use a preset or t-thresholds (t:...) that fit any step count")
    return out


def _thresholds(spec: str, midpoints: Sequence[float], keys: dict[str, str]) -> list[str]:
    parts = [p.strip() for p in spec[2:].split(",")]
    bounds: list[tuple[str, float]] = []
    for part in parts[:-1]:
        match = _THRESHOLD.match(part)
        if not match:
            raise ScheduleError(f"schedule {spec!r}: {part!r} is not KEY>t (e.g. L>0.875); only the last part "
                                f"has no threshold")
        try:
            bound = float(match.group(2))
        except ValueError:
            raise ScheduleError(f"schedule {spec!r}: {match.group(2)!r} is not a number") from None
        if not 0.0 <= bound <= 1.0 or (bounds and bound >= bounds[-1][1]):
            raise ScheduleError(f"schedule {spec!r}: thresholds must fall from 1 towards 0 (got {bound})")
        bounds.append((_resolve(match.group(1), keys, spec), bound))
    if not parts[-1] or not re.match(r"^[A-Za-z][A-Za-z0-9_\-]*$", parts[-1]):
        raise ScheduleError(f"schedule {spec!r}: the last part must be a model key alone (e.g. t:L>0.875,H>0.125,L)")
    last = _resolve(parts[-1], keys, spec)
    return [next((name for name, bound in bounds if t > bound), last) for t in midpoints]


def parse_schedule(spec: str, steps: int, names_light_to_heavy: Sequence[str],
                   t_min: float = DEFAULT_T_MIN) -> ModelSchedule:
    """Build the ModelSchedule of `spec` (segments, preset[@fraction] or t:thresholds) for T = steps.

    names_light_to_heavy: the models, lightest first (presets and the H/L keys use both ends).
    t_min: the end of the sampler's time grid (t-thresholds are placed on it).
    """
    check_steps(steps)
    if not names_light_to_heavy:
        raise ScheduleError("a schedule needs at least one model")
    spec = spec.strip()
    keys = model_keys(names_light_to_heavy)
    preset, _, fraction = spec.partition("@")
    if preset in PRESETS:
        try:
            frac = float(fraction) if fraction else DEFAULT_FRACTION
        except ValueError:
            raise ScheduleError(f"schedule {spec!r}: {fraction!r} after @ is not a fraction in [0, 1]") from None
        names = _preset(preset, frac, steps, names_light_to_heavy[0], names_light_to_heavy[-1], spec)
    elif spec.startswith("t:"):
        grid = time_grid(steps, t_min)
        names = _thresholds(spec, ((grid[:-1] + grid[1:]) / 2).tolist(), keys)
    elif _SEGMENT.match(spec.split(",")[0].strip()):
        names = _segments(spec, steps, keys)
    else:
        raise ScheduleError(f"schedule {spec!r} is not a preset ({', '.join(PRESETS)}, optionally @fraction), "
                            f"segments (e.g. L125,H750,L125) or t-thresholds (e.g. t:L>0.875,H>0.125,L)")
    return ModelSchedule(names=tuple(names), spec=spec)


def is_single_segment(spec: str) -> bool:
    """Whether spec is one segment and nothing more (e.g. "L2"): what YAML leaves of an unquoted "L2,H6"."""
    return "," not in spec and _SEGMENT.match(spec.strip()) is not None


def coarse_segment_specs(segments: int, steps: int) -> list[tuple[str, str]]:
    """The seed paper's exhaustive search: T steps cut into k near-equal segments, each given to L or H.

    Returns 2^k (label, spec) pairs, e.g. ("LHHL", "L250,H500,L250") for k = 4, T = 1000; segment j
    covers steps round(j T / k) to round((j + 1) T / k).
    """
    if not 1 <= segments <= steps:
        raise ScheduleError(f"{segments} coarse segments must be in [1, steps={steps}]")
    bounds = [round(j * steps / segments) for j in range(segments + 1)]
    out = []
    for code in range(2 ** segments):
        label = "".join("L" if code >> (segments - 1 - j) & 1 else "H" for j in range(segments))
        names = [key for j, key in enumerate(label) for _ in range(bounds[j + 1] - bounds[j])]
        out.append((label, ",".join(f"{key}{len(list(run))}" for key, run in groupby(names))))
    return out
