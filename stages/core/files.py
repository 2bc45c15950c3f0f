"""Atomic writes: a stage that fails leaves nothing a later stage or DVC could take for a result.

A result is written to a temporary sibling, `.<name>.<pid>.<random>.tmp`, and renamed onto its
name only when complete. A process killed outright (SIGKILL, the out-of-memory killer, a power
cut) runs no cleanup and leaves that sibling behind; the next write of the same result removes
it. The writer's process id in the name tells a leftover (its process is gone) from the
temporary of a command running right now in the same workspace, which is kept.
"""

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


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # Windows: os.kill(pid, 0) would send Ctrl-C, not test the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the process's existence is checked
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _temporary_prefix(path: Path) -> str:
    """The start of a temporary's name for `path`: its name, then this process's id."""
    return f".{path.name}.{os.getpid()}."


def _remove_stale(path: Path) -> None:
    """Remove the temporaries of `path` that killed processes left: names of the form
    `.<name>.<pid>.<random>.tmp` whose process is gone."""
    head = f".{path.name}."
    for entry in path.parent.iterdir():
        name = entry.name
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        parts = name[len(head) : -len(".tmp")].split(".")
        # Exactly <pid>.<random>: `.x.5.123.abc.tmp` is a temporary of x.5, not of x.
        if len(parts) != 2 or not parts[0].isdigit() or _alive(int(parts[0])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it onto `path` only on success.

    Leftovers of killed writes of `path` are removed first (see the module docstring). `need`
    (bytes, when known) is checked against the free space then; a disk that fills up anyway
    ends in DiskFullError naming `path`, with the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)  # before the space check: a killed run's leftover may be what fills it
    if need:
        check_space(path, need)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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

    Leftovers, `need` and a full disk as in `atomic_path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    if need:
        check_space(path, need)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
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
