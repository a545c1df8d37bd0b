"""The typed sweep records: one schema for what sweep.py writes and what every consumer reads, both layouts on disk
(the committed results of reports/owt-h200 and reports/owt-h200-v2) read into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.report import build_report
from mdlm_sched.artifacts import SweepDir
from mdlm_sched.errors import DataError
from mdlm_sched.fileio import read_jsonl
from mdlm_sched.summary import summarize
from mdlm_sched.sweep_records import ReferenceRow, SweepPoint, Timing, read_result

from conftest import REPO

FIRST = REPO / "reports" / "owt-h200" / "data"  # the first layout
CURRENT = REPO / "reports" / "owt-h200-v2" / "data"


def test_the_current_layout_reads_and_writes_back_line_for_line():
    raw = read_jsonl(CURRENT / "results.jsonl")
    results = SweepDir(CURRENT).read()
    records = results.references + results.points + results.timings
    assert len(records) == len(raw) and {type(r) for r in records} == {ReferenceRow, SweepPoint, Timing}
    by_key = {(r["kind"], r["key"], r.get("batch")): r for r in raw}
    for record in records:
        line = record.to_record()
        assert line == by_key[(line["kind"], line["key"], line.get("batch"))]  # every field, nothing added
        assert type(record).read(line) == record


def test_the_first_layout_reads_into_the_same_records():
    results = SweepDir(FIRST).read()
    point, ref = next(p for p in results.points if not p.all_heavy), results.references[0]
    assert point.token_rule == "first-eos" and point.rules == ["first-eos"] and point.batch_wall_s == []
    nll, tokens = point.values("first-eos")
    assert nll.sum() == pytest.approx(point.gen_ppl.nll_sum) and tokens.sum() == point.gen_ppl.tokens
    with pytest.raises(DataError, match="first-eos rule"):
        point.values("mdlm")  # the first layout kept the headline rule's values only
    assert set(ref.gen_ppl_rules) == {"first-eos", "every-token"}  # judge_ppl_every_token, renamed
    assert point.flops.saving_head_everywhere is None and 0 < point.flops.head_everywhere_saving() < 1
    rows = summarize(results.points, results.timings)
    assert {r["token_rule"] for r in rows} == {"first-eos"} and any(r["pairs"] for r in rows)


def test_a_line_this_version_cannot_read_is_one_error_naming_the_file(tmp_path: Path):
    sweep = tmp_path / "sweep"
    shutil.copytree(CURRENT, sweep)
    lines = (sweep / "results.jsonl").read_text().splitlines()
    damaged = json.loads(lines[-2])
    del damaged["flops"]["calls"]
    (sweep / "results.jsonl").write_text("\n".join(lines[:-2] + [json.dumps(damaged), lines[-1]]) + "\n")
    with pytest.raises(DataError, match=r"results.jsonl: a results line \(point, .*cannot read") as info:
        SweepDir(sweep).read()
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="unknown"):
        read_result({"kind": "unknown", "key": "x"}, "here")


def test_a_report_of_a_sweep_cut_before_its_first_point_shows_its_reference_rows(tmp_path):
    # reports/owt-h200-v3, first lease: it ended after the four reference rows, before any point.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name in ("results.jsonl", "sweep.json"):
        (sweep / name).write_bytes((REPO / "reports" / "owt-h200-v3" / "data" / "lease1" / name).read_bytes())
    text = build_report([sweep], tmp_path / "report", "cut short").read_text()
    assert "No finished points yet." in text and "Reference rows (real validation text" in text
    assert "| owt | `/tmp/data/owt_val.jsonl.xz` | 414 | 376.20 [" in text
