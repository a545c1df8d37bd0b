"""benchmarks/lease.sh, the detached job of a GPU lease, run here on the CPU with a tiny Python job."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from conftest import REPO

JOB = ("import os, pathlib; out = pathlib.Path(os.environ['JOB_OUT']); (out / 'run').mkdir(); "
       "(out / 'run' / 'result.json').write_text('{}'); (out / 'run' / 'model.safetensors').write_text('w'); "
       "print('job done')")


def _lease(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEASE_ROOT": str(tmp_path / "jobs"), "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "lease.sh"), *args], cwd=tmp_path / "checkout", env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_job_runs_detached_and_its_results_come_back_without_weights(tmp_path):
    (tmp_path / "checkout").mkdir()
    (tmp_path / "out").mkdir()
    missing = _lease(tmp_path, "poll", "j", "60")  # a fresh machine: no waiting for a job that is not there
    assert missing.returncode == 3 and "no job j on this machine" in missing.stderr
    assert _lease(tmp_path, "start", "j", "python3", "-c", JOB).returncode == 0
    again = _lease(tmp_path, "start", "j", "true")
    assert again.returncode == 2 and "exists already" in again.stderr
    polled = _lease(tmp_path, "poll", "j", "60")
    assert polled.returncode == 0 and "FINISHED rc=0" in polled.stdout and "job done" in polled.stdout
    parts = sorted((tmp_path / "out").glob("j.tgz.part-*"))
    (tmp_path / "j.tgz").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "j.tgz") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
    assert {"run/result.json", "console.log", "rc", "command"} <= names and "run/model.safetensors" not in names
