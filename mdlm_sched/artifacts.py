"""Every file a stage writes or reads: its name, its durable writer and its typed reader.

No other module spells a file name. Each kind of folder has a small class that names its files:

    TrainRun(out_dir)      config.yaml, log.jsonl, checkpoints/step-NNNNNNNN/, checkpoints/latest, model/
    Checkpoint(folder)     {model,ema}.safetensors, optimizer.pt, state.json
    SampleRun(out)         samples.jsonl, trace.csv, record.json; batches/batch-NNNNNN.json until it is done
    ConversionWork(out)    <out>.unfinished/: settings.json, moments.safetensors, source_bound.json until convert-mla
                           has written <out>
    AnalysisDir(out)       per_step.csv, per_step.json
    SweepDir(out)          results.jsonl, failures.jsonl (typed records: sweep_records.py), sweep.json,
                           samples/<point>.jsonl
    OptimiseDir(out)       optimise.json
    CompareDir(out)        compare.json, compare.md
    PipelineDir(out_dir)   pipeline.json, train/<name>/, analysis/, optimise/, calibrated/, sweep/,
                           variants/<name>/{sweep,compare}/, report/
    ReportDir(out)         report.md, experiment.json, summary_<name>.json, figures <stem>.{png,pdf}

Every file is written through fileio's durable writers (never half-written) and read through its
readers.

This module imports no torch: the analysis package reads results through it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mdlm_sched.errors import DataError
from mdlm_sched.fileio import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from mdlm_sched.sweep_records import (TIMING, Failure, MauveSummary, ReferenceRow, SweepPoint, Timing,
                                      read_failure, read_result)


# ------------------------------------------------------------------------------ training runs
def _file(name: str) -> property:
    """A property: the file or folder `name` inside the instance's root folder."""
    return property(lambda self: self.root / name, doc=f"root / {name!r}")


def _folder(name: str, kind: type) -> property:
    """A property: the sub-folder `name`, as a `kind` (AnalysisDir, SweepDir, ...)."""
    return property(lambda self: kind(self.root / name), doc=f"{kind.__name__}(root / {name!r})")


@dataclass(frozen=True)
class Checkpoint:
    """One resumable training state: checkpoints/step-NNNNNNNN/."""

    root: Path
    optimizer = _file("optimizer.pt")
    state = _file("state.json")

    def weights(self, stem: str) -> Path:
        """The safetensors file of one state dict ("model", "ema")."""
        return self.root / f"{stem}.safetensors"


@dataclass(frozen=True)
class TrainRun:
    """A training run folder (train.out_dir)."""

    root: Path
    config = _file("config.yaml")
    log = _file("log.jsonl")
    checkpoints = _file("checkpoints")
    model = _file("model")  # the Hugging Face export of the EMA weights

    @property
    def latest(self) -> Path:
        """A one-line file naming the newest complete checkpoint folder."""
        return self.checkpoints / "latest"

    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self.checkpoints / f"step-{step:08d}")

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (None if there is none)."""
        return int(self.latest.read_text().strip().removeprefix("step-")) if self.latest.is_file() else None

    def checkpoint_folders(self) -> list[Path]:
        """Every checkpoint folder, oldest first."""
        return sorted(self.checkpoints.glob("step-*"))


# A Hugging Face model folder: its config and its weights (save_pretrained's names).
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
IMPORT_RECORD = "import.json"  # in a model folder made by import-mdlm: what was read (mdlm_format.ImportedMDLM)


def model_folder(path: str | Path) -> Path:
    """The Hugging Face folder of a model: `path` itself, or `path/model` for a training run folder."""
    path = Path(path)
    exported = TrainRun(path).model
    if not (path / HF_CONFIG).is_file() and (exported / HF_CONFIG).is_file():
        return exported
    return path


# Record kinds of a training log (the "kind" field of every line of log.jsonl).
LOG_START, LOG_RESUME, LOG_TRAIN, LOG_VAL = "start", "resume", "train", "val"


@dataclass
class TrainingLog:
    """log.jsonl of a training run, by record kind."""

    starts: list[dict[str, Any]] = field(default_factory=list)  # "start" and "resume" records, in order
    train: list[dict[str, Any]] = field(default_factory=list)  # one per train.log_every steps
    val: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # validation source -> its records

    @classmethod
    def read(cls, path: Path) -> TrainingLog:
        out = cls()
        for record in read_jsonl(path):
            kind = record.get("kind")
            if kind in (LOG_START, LOG_RESUME):
                out.starts.append(record)
            elif kind == LOG_TRAIN:
                out.train.append(record)
            elif kind == LOG_VAL:
                out.val.setdefault(record["source"], []).append(record)
            else:
                raise DataError(f"{path}: a record without a known kind ({record!r:.80}); the log was not written "
                                f"by this version of mdlm-sched")
        return out


# ------------------------------------------------------------------------------ sampling runs
@dataclass(frozen=True)
class SampleRun:
    """The output folder of `mdlm-sched sample`."""

    root: Path
    samples = _file("samples.jsonl")
    trace = _file("trace.csv")
    record = _file("record.json")

    def batch(self, k: int) -> Path:  # an unfinished run's finished batch k (generate.BatchStore)
        return self.root / "batches" / f"batch-{k:06d}.json"


# ------------------------------------------------------------------------------ conversions
@dataclass(frozen=True)
class ConversionWork:
    """The saved work of an unfinished `mdlm-sched convert-mla`, in <out>.unfinished beside the model folder it is
    to write (that folder is written whole at the end, so the work cannot live inside it)."""

    root: Path
    settings = _file("settings.json")  # what the work depends on
    moments = _file("moments.safetensors")  # calibration sums so far, blocks done, the noise generator's state
    source_bound = _file("source_bound.json")  # the source model's bound on the calibration blocks

    @classmethod
    def beside(cls, out: Path) -> ConversionWork:
        return cls(out.with_name(out.name + ".unfinished"))


# ------------------------------------------------------------------------------ per-step analysis
PER_STEP_FIELDS = ("source", "step", "t", "metric", "model", "mean", "ci_low", "ci_high", "units", "tokens")
_PER_STEP_INTS = ("step", "units", "tokens")
_PER_STEP_FLOATS = ("t", "mean", "ci_low", "ci_high")


@dataclass(frozen=True)
class AnalysisDir:
    """The output folder of the per-step analysis."""

    root: Path
    csv = _file("per_step.csv")
    json = _file("per_step.json")

    def exists(self) -> bool:
        return self.csv.is_file() and self.json.is_file()

    def write(self, rows: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> None:
        """per_step.csv (long format, one row per source, step, metric and model) and per_step.json."""
        lines = [",".join(PER_STEP_FIELDS)] + [
            f"{r['source']},{r['step']},{r['t']:.8g},{r['metric']},{r['model']},{r['mean']:.10g},{r['ci_low']:.10g},"
            f"{r['ci_high']:.10g},{r['units']},{r['tokens']}" for r in rows]
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.csv, "\n".join(lines) + "\n")
        atomic_write_json(self.json, record)

    def read(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(per_step.csv rows with numbers, per_step.json record)."""
        rows = []
        for row in csv.DictReader(io.StringIO(self.csv.read_text())):
            typed: dict[str, Any] = dict(row)
            typed.update({k: int(row[k]) for k in _PER_STEP_INTS})
            typed.update({k: float(row[k]) for k in _PER_STEP_FLOATS})
            rows.append(typed)
        return rows, read_json(self.json, "the per_step.json of a per-step analysis")


# ---------------------------------------------------------------------------------- sweeps
@dataclass
class SweepResults:
    """What a sweep folder holds, as typed records (sweep_records.py)."""

    points: list[SweepPoint]
    references: list[ReferenceRow]
    timings: list[Timing]
    failures: list[Failure]  # points that failed and have not been rerun successfully since
    settings: dict[str, Any]  # sweep.json's "shared" settings ({} if absent)


@dataclass(frozen=True)
class SweepDir:
    """The output folder of a sweep."""

    root: Path
    results = _file("results.jsonl")
    failures = _file("failures.jsonl")
    settings = _file("sweep.json")
    mauve = _file("mauve.json")  # MAUVE computed afterwards from saved features (mdlm_sched.sweep_mauve)

    def sample_file(self, slug: str) -> Path:
        """samples/<point>.jsonl: the texts and per-sample values of one point."""
        return self.root / "samples" / f"{slug}.jsonl"

    def feature_file(self, slug: str) -> Path:
        """features/<point>.npy: MAUVE's judge features [N, d] of one point (sweep option save_features)."""
        return self.root / "features" / f"{slug}.npy"

    @property
    def reference_features(self) -> Path:
        """features/reference.npy: those of the headline reference blocks (no point's slug is "reference")."""
        return self.root / "features" / "reference.npy"

    def finished_keys(self) -> set[str]:
        """Keys of the finished points and reference rows."""
        return {r["key"] for r in read_jsonl(self.results) if r["kind"] != TIMING}

    def append(self, record: SweepPoint | ReferenceRow | Timing | Failure) -> None:
        """One line more in results.jsonl (failures.jsonl for a Failure), durably."""
        append_jsonl(self.failures if isinstance(record, Failure) else self.results, record.to_record())

    def read(self) -> SweepResults:
        records = [read_result(r, str(self.results)) for r in read_jsonl(self.results)]
        later = read_json(self.mauve, "the mauve.json of a sweep") if self.mauve.is_file() else {}
        points = [replace(r, mauve=MauveSummary(**later[r.key])) if r.mauve is None and r.key in later else r
                  for r in records if isinstance(r, SweepPoint)]
        done = {p.key for p in points}
        failures = [read_failure(f, str(self.failures)) for f in read_jsonl(self.failures)]
        settings = read_json(self.settings, "the sweep.json of a sweep")["shared"] if self.settings.is_file() else {}
        return SweepResults(points=points, references=[r for r in records if isinstance(r, ReferenceRow)],
                            timings=[r for r in records if isinstance(r, Timing)],
                            failures=[f for f in failures if f.key not in done], settings=settings)


# ------------------------------------------------------------------------------- optimiser
@dataclass(frozen=True)
class OptimiseDir:
    """The output folder of `mdlm-sched optimise`."""

    root: Path
    record = _file("optimise.json")

    def read(self) -> dict[str, Any]:
        return read_json(self.record, "the optimise.json of mdlm-sched optimise")


# ------------------------------------------------------------------------------ sweep comparisons
@dataclass(frozen=True)
class CompareDir:
    """Two sweeps compared point by point (sweep_compare.py): `mdlm-sched compare --out`, a pipeline variant's."""

    root: Path
    record = _file("compare.json")  # {"a", "b", "differing", "rows"}
    text = _file("compare.md")  # the table as `mdlm-sched compare` prints it

    def read(self) -> dict[str, Any]:
        return read_json(self.record, "the compare.json of mdlm-sched compare")

    def write(self, record: Mapping[str, Any], text: str | None = None) -> None:
        """compare.json, and compare.md if the table is given (the report renders it from the JSON)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, record)
        if text is not None:
            atomic_write_text(self.text, text)


# ------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class PipelineDir:
    """The out_dir of `mdlm-sched pipeline`: one folder per stage and the pipeline's own record."""

    root: Path
    state = _file("pipeline.json")
    report = _file("report")  # the default report folder
    analysis = _folder("analysis", AnalysisDir)
    optimise = _folder("optimise", OptimiseDir)  # the optimised schedules swept (cost model uncalibrated)
    calibrated = _folder("calibrated", OptimiseDir)  # the cost model fitted on every schedule the sweep measured
    sweep = _folder("sweep", SweepDir)

    def train(self, name: str) -> TrainRun:
        return TrainRun(self.root / "train" / name)

    def variant(self, name: str) -> SweepDir:
        """variants/<name>/sweep: the sweep again with a variant's sampler settings."""
        return SweepDir(self.root / "variants" / name / "sweep")

    def variant_compare(self, name: str) -> CompareDir:
        """variants/<name>/compare: that sweep against the main one, point by point."""
        return CompareDir(self.root / "variants" / name / "compare")


# ------------------------------------------------------------------------------ reports
@dataclass(frozen=True)
class ReportDir:
    """The output folder of `mdlm-sched report`."""

    root: Path
    report = _file("report.md")
    experiment = _file("experiment.json")  # a copy of the pipeline's record beside the report it belongs to

    def summary(self, name: str) -> Path:
        """summary_<name>.json: the rows a sweep's tables were made from."""
        return self.root / f"summary_{name}.json"

    def figure(self, *parts: str) -> Path:
        """A figure's path without suffix (saved with each of FIGURE_SUFFIXES): figure("sweep", name) is
        sweep_<name>; the kinds are "sweep", "fraction", "quality_time" and ("per_step", name, axis)."""
        return self.root / "_".join(parts)


FIGURE_SUFFIXES = (".png", ".pdf")


# ------------------------------------------------------------------------------ data cache
def data_cache_file(cache_dir: str | Path, stem: str, seq_len: int, digest: str) -> Path:
    """The .npy file of one source's tokenised, wrapped blocks."""
    return Path(cache_dir) / f"{stem}-L{seq_len}-{digest}.npy"
