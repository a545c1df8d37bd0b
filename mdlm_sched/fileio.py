"""Durable file writing and tolerant reading, for every file the project writes.

Writers never leave a file half-written: whole files are written under a temporary name in the
same folder, flushed to disk, then renamed into place (`atomic_file`, `atomic_dir`); results and
logs are appended one JSON line at a time, flushed and fsynced (`append_jsonl`), so a crash loses
at most the line being written, and a torn last line is ignored when reading and cut off before
the next append. Readers name the file and the fix when a file cannot be read.

This module imports no torch: the analysis package reads results through it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mdlm_sched.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- writers
def _umask() -> int:
    """The process umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename inside it is durable once its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        _fsync(p)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic rename (Linux renameat2 with RENAME_EXCHANGE); False where the system
    or the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Yield a file open in `mode` that replaces `path` only once it is complete and on disk.

    The file gets the permissions a plain open() would give it (0666 less the umask), not the
    0600 of a temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: Path, record: Any) -> None:
    """Write a JSON file (indent 1, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is removed.

    An existing folder is swapped with the new one in one rename (renameat2), so a crash leaves one or the other
    at `path`; where the system has no such rename, the old folder is first moved aside (a crash between the two
    renames then leaves both under hidden names beside `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~_umask())  # a plain mkdir's permissions, not mkdtemp's 0700
        yield tmp
        _fsync_tree(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # tmp holds the old folder after an exchange (removed below)
            # A folder cannot be renamed over a non-empty one: move the old aside first.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a line, durably (flush + fsync); a torn last line is cut off first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_writable(folder: str | Path, what: str) -> None:
    """Raise ConfigError unless `folder` exists as a folder we can write into, or can be made: checked before any
    work, so that nothing computed is lost for want of a place to put it. Nothing is left behind.

    what: the setting that names the folder, for the message (e.g. "train.out_dir").
    """
    path = Path(folder).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}={folder} cannot be a folder: {probe} is a file; choose another place")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as exc:
        raise ConfigError(f"{what}={folder} cannot be written ({exc.strerror} in {probe}); choose a folder you can "
                          f"write to") from None


# ----------------------------------------------------------------------------------- readers
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines file ([] if there is no file); a torn last line is skipped."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:  # no newline after it: the write was cut short
                log.warning("%s: ignoring a torn last line (an interrupted write)", path)
                continue
            raise DataError(f"{path}:{n + 1} is not a JSON line (edited by hand?); repair or delete that line") \
                from None
    return out


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or DataError naming it (`what` says which file it should be)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; give {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({' '.join(str(exc).split())[:200]}); give {what}") \
            from None
