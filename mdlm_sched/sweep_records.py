"""Typed records of a sweep's results.jsonl and failures.jsonl: what sweep.py writes, and the one reader that
every consumer (summary, the report sections, the optimiser, the pipeline) goes through.

results.jsonl holds one JSON object per line, told apart by "kind": a point (a sampled, judged schedule), a
reference row (real validation text judged as samples are) and a timing (a baseline's first batch timed again).
`to_record` writes the current layout; `read` takes it and the first release's layout (the sweep of
reports/owt-h200), in which the headline token rule was a "first_eos" flag, only the headline rule's per-sample
values were kept ("nll" a list, "tokens_scored"), a reference's every-token PPL was "judge_ppl_every_token", and
neither the per-batch wall-clock nor the head-everywhere FLOPs were recorded.

No torch: the analysis package reads results through this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mdlm_sched.errors import DataError

POINT, REFERENCE, TIMING = "point", "reference", "timing"  # the "kind" of a results.jsonl line
LEGACY_RULE = "first-eos"  # the first layout's headline rule when "first_eos" was true (else every token)


@dataclass(frozen=True)
class PPLSummary:
    """Gen PPL of a set of samples under one token rule (metrics.GenPPL.summary)."""

    ppl: float
    nll_sum: float  # nats, summed in float64
    tokens: int  # tokens scored
    samples: int
    judge: str
    token_rule: str

    @classmethod
    def read(cls, d: Mapping[str, Any]) -> PPLSummary:
        rule = d.get("token_rule", LEGACY_RULE if d.get("first_eos") else "every-token")
        return cls(d["ppl"], d["nll_sum"], d["tokens"], d["samples"], d["judge"], rule)


@dataclass(frozen=True)
class EntropySummary:
    """Unigram entropy of each sample's tokens: mean and s.d. over samples (metrics.entropy_summary)."""

    mean: float
    sd: float
    samples: int
    unit: str  # "nats"


@dataclass(frozen=True)
class MauveSummary:
    """MAUVE against the reference text, once per k-means seed (metrics.mauve_scores)."""

    mean: float
    sd: float
    values: list[float]
    samples: int
    reference_samples: int
    features: str  # what was embedded


@dataclass(frozen=True)
class PerSample:
    """Each sample's values: summed NLL and scored tokens under each token rule kept, and its entropy."""

    nll: dict[str, list[float]]  # rule -> [N]
    tokens: dict[str, list[int]]  # rule -> [N]
    entropy: list[float]  # [N]

    @classmethod
    def read(cls, d: Mapping[str, Any], headline: str) -> PerSample:
        if isinstance(d["nll"], list):  # the first layout: the headline rule's values only
            return cls({headline: d["nll"]}, {headline: d["tokens_scored"]}, d["entropy"])
        return cls(d["nll"], d["tokens"], d["entropy"])


@dataclass(frozen=True)
class Judged:
    """What the judge measured of a set of samples (a point's or a reference row's); the headline rule is the
    sweep's token_rule."""

    key: str
    num_samples: int
    gen_ppl: PPLSummary  # under the headline token rule
    gen_ppl_rules: dict[str, PPLSummary]  # every rule measured (the first layout: the headline and every-token)
    entropy: EntropySummary
    per_sample: PerSample
    provenance: dict[str, Any]  # provenance.provenance(): git, hardware, versions, argv, utc

    @property
    def token_rule(self) -> str:
        """The headline gen PPL's token rule."""
        return self.gen_ppl.token_rule

    @property
    def rules(self) -> list[str]:
        """The token rules whose per-sample values the record holds."""
        return list(self.per_sample.nll)

    def values(self, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """(summed NLL [N], scored tokens [N]) of each sample under `rule`, float64."""
        if rule not in self.per_sample.nll:
            raise DataError(f"results of {self.key} hold per-sample values under the {', '.join(self.rules)} "
                            f"rule(s) only, not {rule}")
        return (np.asarray(self.per_sample.nll[rule], dtype=np.float64),
                np.asarray(self.per_sample.tokens[rule], dtype=np.float64))


def _judged(d: Mapping[str, Any]) -> dict[str, Any]:
    """The Judged fields of a results line, in the current layout."""
    gen = PPLSummary.read(d["gen_ppl"])
    rules = {rule: PPLSummary.read(v) for rule, v in d.get("gen_ppl_rules", {}).items()}
    if not rules:  # the first layout
        rules = {gen.token_rule: gen}
        if "judge_ppl_every_token" in d:
            rules["every-token"] = PPLSummary.read(d["judge_ppl_every_token"])
    return {"key": d["key"], "num_samples": d["num_samples"], "gen_ppl": gen, "gen_ppl_rules": rules,
            "entropy": EntropySummary(**d["entropy"]), "per_sample": PerSample.read(d["per_sample"], gen.token_rule),
            "provenance": d["provenance"]}


@dataclass(frozen=True)
class SamplingFlops:
    """FLOPs of a point's sampling in each convention (generate.flops_summary; the conventions in flops.py), and of
    the same calls made by the heaviest model."""

    blocks_only: int
    full: int
    baseline_model: str  # the heaviest model
    baseline_blocks_only: int
    baseline_full: int
    saving_blocks_only: float
    saving_full: float
    calls: dict[str, int]  # model -> batched calls
    sequences_run: dict[str, int]  # model -> sequences it ran
    per_forward_one_sequence: dict[str, dict[str, int]]  # model -> {"blocks_only", "full"}
    convention: str
    head_everywhere: int | None = None  # None in the first layout; head_everywhere_saving() derives the saving
    baseline_head_everywhere: int | None = None
    saving_head_everywhere: float | None = None

    def head_everywhere_saving(self) -> float:
        """The saving with the output head at every position of every sequence run (MDLM's sampler): as recorded,
        or for the first layout, from the sequences each model ran and its forward over one sequence with the head
        everywhere ("full"; exact sampling ran every position of those sequences)."""
        if self.saving_head_everywhere is not None:
            return self.saving_head_everywhere
        per_forward = self.per_forward_one_sequence
        used = sum(n * per_forward[m]["full"] for m, n in self.sequences_run.items())
        base = sum(self.sequences_run.values()) * per_forward[self.baseline_model]["full"]
        return 1.0 - used / base if base else 0.0


@dataclass(frozen=True)
class CacheUse:
    """Sequence-steps that ran the network and those served without it (generate.cache_summary)."""

    sequence_steps: int
    run: int
    skipped: int
    skipped_share: float
    noise_removal_sequences: int


UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the records' time stamps (provenance "utc", Timing.utc, Failure.utc)


def point_slug(label: str, steps: int, seed: int, num_samples: int) -> str:
    """A point's file name stem: its label, T, seed and sample count, with anything but [A-Za-z0-9_.-] as _."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label}-T{steps}-s{seed}-n{num_samples}")


@dataclass(frozen=True, kw_only=True)
class SweepPoint(Judged):
    """One finished point of a sweep: a schedule at T steps, one seed, sampled, counted, timed and judged."""

    label: str  # as the config wrote it
    groups: list[str]  # the sweep groups that name it
    segments: str  # canonical segments ("small:125,large:750,small:125")
    steps: int  # T
    seed: int
    steps_per_model: dict[str, int]
    light_fraction: float  # steps of the lightest model / T
    flops: SamplingFlops
    cache: CacheUse
    wall_s: float  # sampling, all batches
    batch_wall_s: list[float]  # each batch ([] in the first layout)
    judge_s: float
    mauve: MauveSummary | None = None  # when the sweep measured MAUVE

    @property
    def all_heavy(self) -> bool:
        """Whether the heaviest model took every step."""
        return set(self.steps_per_model) == {self.flops.baseline_model}

    @property
    def slug(self) -> str:
        """Its file name stem under samples/ and features/."""
        return point_slug(self.label, self.steps, self.seed, self.num_samples)

    @property
    def schedule_key(self) -> tuple[str, int, int]:
        """(segments, T, samples): what the points a summary row pools over seeds share."""
        return self.segments, self.steps, self.num_samples

    @classmethod
    def read(cls, d: Mapping[str, Any]) -> SweepPoint:
        return cls(**_judged(d), label=d["label"], groups=d["groups"], segments=d["segments"], steps=d["steps"],
                   seed=d["seed"], steps_per_model=d["steps_per_model"], light_fraction=d["light_fraction"],
                   flops=SamplingFlops(**d["flops"]), cache=CacheUse(**d["cache"]), wall_s=d["wall_s"],
                   batch_wall_s=d.get("batch_wall_s", []), judge_s=d["judge_s"],
                   mauve=MauveSummary(**d["mauve"]) if d.get("mauve") else None)

    def to_record(self) -> dict[str, Any]:
        """The results.jsonl line."""
        record = {"kind": POINT, **asdict(self)}
        if self.mauve is None:
            del record["mauve"]
        return record


@dataclass(frozen=True, kw_only=True)
class ReferenceRow(Judged):
    """Real validation blocks of one source, wrapped and judged exactly as samples are."""

    name: str
    source: str

    @classmethod
    def read(cls, d: Mapping[str, Any]) -> ReferenceRow:
        return cls(**_judged(d), name=d["name"], source=d["source"])

    def to_record(self) -> dict[str, Any]:
        """The results.jsonl line."""
        return {"kind": REFERENCE, **asdict(self)}


@dataclass(frozen=True)
class Timing:
    """A baseline point's first batch timed again after the sweep's points (the spread of its wall-clock)."""

    key: str  # the point's
    batch: int
    wall_s: float
    utc: str

    @classmethod
    def read(cls, d: Mapping[str, Any]) -> Timing:
        return cls(d["key"], d["batch"], d["wall_s"], d["utc"])

    def to_record(self) -> dict[str, Any]:
        """The results.jsonl line."""
        return {"kind": TIMING, **asdict(self)}


@dataclass(frozen=True)
class Failure:
    """A point that failed for want of memory or on bad input (failures.jsonl); a rerun retries it."""

    key: str
    label: str
    error: str  # the message, on one line
    utc: str

    def to_record(self) -> dict[str, Any]:
        """The failures.jsonl line."""
        return asdict(self)


READERS = {POINT: SweepPoint.read, REFERENCE: ReferenceRow.read, TIMING: Timing.read}


def read_result(d: Mapping[str, Any], where: str) -> SweepPoint | ReferenceRow | Timing:
    """The typed record of one results.jsonl line; a line this version cannot read is a DataError naming it."""
    try:
        return READERS[d["kind"]](d)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{where}: a results line ({str(d.get('kind'))}, {str(d.get('key'))!r:.80}) that this version "
                        f"of mdlm-sched cannot read ({type(exc).__name__}: {exc}); it was written by another "
                        f"version, or damaged") from None


def read_failure(d: Mapping[str, Any], where: str) -> Failure:
    """The typed record of one failures.jsonl line."""
    try:
        return Failure(**d)
    except TypeError as exc:
        raise DataError(f"{where}: a failures line this version of mdlm-sched cannot read ({exc})") from None
