"""Atomic writes: a stage that fails leaves nothing a later stage or DVC could take for a result."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import PipelineError


class DiskFullError(PipelineError):
    """A result that does not fit on the disk; nothing of it is left behind."""


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_space(path: Path, need: int) -> None:
    """Stop before writing `need` bytes at `path` when its file system has less free."""
    free = shutil.disk_usage(Path(path).parent).free
    if need > free:
        raise DiskFullError(
            f"{path}: needs {_mib(need)} but its disk has {_mib(free)} free; free some space"
            " and run again"
        )


def output_file(path: Path | str, option: str) -> Path:
    """`path` as a file a command may write (given by the user as `option`), or one line why not."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{option} {path}: is a directory; give a file name, e.g. {path}/out")
    return path


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path, need: int | None) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(Path(path).parent).free
        needed = f"needed {_mib(need)}, " if need else ""
        raise DiskFullError(
            f"{path}: the disk filled up while writing it ({needed}{_mib(free)} free); nothing"
            " was kept: free some space and run again"
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it onto `path` only on success.

    `need` (bytes, when known) is checked against the free space first; a disk that fills up
    anyway ends in DiskFullError naming `path`, with the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need:
        check_space(path, need)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:  # from the first statement on: a Ctrl-C at any point still removes the file
        os.close(fd)
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; results read like any file
        with _disk_full_is_one_line(path, need):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces `path` as a whole only on success.

    `need` and a full disk as in `atomic_path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need:
        check_space(path, need)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        with _disk_full_is_one_line(path, need):
            yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
