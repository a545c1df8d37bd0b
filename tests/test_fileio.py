"""The durable writers: a write that fails or is killed half-way leaves the old file or folder whole."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from conftest import REPO
from mdlm_sched.fileio import _exchange, atomic_dir, atomic_file


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as fh:
        fh.write("new, half-")
        fh.flush()
        raise RuntimeError("the writer fails half-way")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["record.json"]
    with atomic_file(path) as fh:
        fh.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["record.json"]


def test_a_write_killed_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    code = ("import os, signal, sys; from pathlib import Path; from mdlm_sched.fileio import atomic_file\n"
            "with atomic_file(Path(sys.argv[1])) as fh:\n"
            "    fh.write('new, half-'); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    assert path.read_text() == "old"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(path) as tmp:
        (tmp / "weights").write_text("new")
        raise RuntimeError("the export fails half-way")
    assert (path / "weights").read_text() == "old" and os.listdir(tmp_path) == ["model"]
    with atomic_dir(path) as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "config").write_text("new")
    assert sorted(os.listdir(path)) == ["config", "weights"] and (path / "weights").read_text() == "new"
    assert os.listdir(tmp_path) == ["model"]  # nothing left aside


def test_two_folders_swap_in_one_rename(tmp_path):
    # Linux (where CI runs) has renameat2: a folder is replaced without a moment in which its name is missing.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    assert _exchange(a, b)
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_files_and_folders_honour_the_umask(tmp_path):
    saved = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.txt") as fh:
            fh.write("x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner.txt").write_text("y")
    finally:
        os.umask(saved)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
