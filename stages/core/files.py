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
import hashlib
import json
import os
import resource
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout

from stages.core.errors import PipelineError, held


class NotWrittenError(PipelineError):
    """A file the system will not let this process write (a read-only file system, the
    process's file-size limit, no permission); nothing of it is left behind."""


class DiskFullError(NotWrittenError):
    """A result that does not fit on the disk; nothing of it is left behind."""


# What a write can fail with that no retry and no other input fixes: said in one line naming the
# file. EACCES and EPERM are a write's only when they name the file being written (a block that
# writes a result may read others).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


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


def is_hidden(name: str) -> bool:
    """The one rule for hidden things, files and folders alike: a name that starts with `.`
    (.DS_Store, macOS's ._photo.jpg, .thumbnails/, .git/). Wherever the pipeline lists a folder
    you filled (your images, an extracted dataset, test images), what is hidden, or inside a
    hidden folder at any depth, is skipped: never copied, decoded or trained on."""
    return name.startswith(".")


def is_plain_name(name: str) -> bool:
    """Whether `name` is one file name (no folder part, not `.` or `..`): what a name read from
    a file must be before it is joined to a folder, so that the path stays in that folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def is_inner_path(path: str) -> bool:
    """Whether `path` is a relative path of plain names (`histograms/epoch_001.png`)."""
    return all(is_plain_name(part) for part in path.split("/"))


def output_file(path: Path | str, option: str) -> Path:
    """`path` as a file a command may write (given by the user as `option`), or one line why not."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{option} {path}: is a directory; give a file name, e.g. {path}/out")
    return path


def _size_limit() -> str | None:
    """This process's file-size limit (`ulimit -f`) in words, or None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return None
    return _mib(soft) if soft >= 2**20 else f"{soft / 2**10:,.1f} KiB"


def why_not_written(path: Path | str, err: OSError, need: int | None = None) -> NotWrittenError:
    """The one line saying why `path` (a file, or a folder) could not be written, and what to do."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    where = "it" if folder == path else str(folder)
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
        needed = f"needed {_mib(need)}, " if need else ""
        return DiskFullError(
            f"{path}: the disk filled up while writing it ({needed}{_mib(free)} free); nothing"
            " was kept: free some space and run again"
        )
    if code == errno.EFBIG:
        limit = _size_limit()
        said = f"the file-size limit of this process (`ulimit -f`: {limit})" if limit else (
            "the largest file its file system takes"
        )  # fmt: skip
        return NotWrittenError(
            f"{path}: would grow past {said}; nothing was kept: raise the limit (`ulimit -f"
            " unlimited`) or write elsewhere, and run again"
        )
    if code == errno.EROFS:
        return NotWrittenError(
            f"{path}: cannot be written: {where} is on a read-only file system; nothing was"
            " written: make it writable (or work in a writable copy of the repository) and run"
            " again"
        )
    if code in _ACCESS_ERRNOS:
        return NotWrittenError(
            f"{path}: cannot be written: permission denied in {folder}; nothing was written:"
            " make it writable for this user and run again"
        )
    return NotWrittenError(f"{path}: cannot be written ({err.strerror or err})")


def write_trouble(path: Path) -> str:
    """What keeps `path` from being written (or grown), as advice, when no error says it (a
    database reporting only "disk I/O error" or "database or disk is full")."""
    folder = path.parent if path.parent.exists() else Path.cwd()
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"{folder} is on a read-only file system: make it writable"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"this user may not write {path}: change its permissions"
    limit = _size_limit()
    if limit is not None:
        return f"this process may write files of at most {limit} (`ulimit -f`): raise the limit"
    free = shutil.disk_usage(folder).free
    if free < 256 * 2**20:
        return f"its disk has {_mib(free)} free: free some space"
    return f"check the disk {path} is on (its file system reported an error)"


def write_failure(err: OSError) -> NotWrittenError:
    """`err`, a write error raised where no result's name was at hand, as one line."""
    if err.filename is not None:
        return why_not_written(os.fsdecode(err.filename), err)
    limit = _size_limit() if err.errno == errno.EFBIG else None
    return NotWrittenError(
        f"a file could not be written ({err.strerror or err}"
        f"{f'; this process may write files of at most {limit}: `ulimit -f`' if limit else ''})"
    )


def is_write_error(err: OSError, target: Path | str | None = None) -> bool:
    """Whether `err` says a file cannot be written (see _WRITE_ERRNOS); a permission error
    counts when it names `target` or a file under it."""
    if err.errno in _WRITE_ERRNOS:
        return True
    if err.errno not in _ACCESS_ERRNOS or target is None or err.filename is None:
        return False
    named = Path(os.fsdecode(err.filename)).absolute()
    return named.is_relative_to(Path(target).absolute())


@contextlib.contextmanager
def _write_errors_are_one_line(path: Path, need: int | None, tmp: Path | None) -> Iterator[None]:
    """A write error of the temporary `tmp` (None: any OSError, while making it) as one line
    naming `path`, the result."""
    try:
        yield
    except OSError as err:
        if tmp is not None and not is_write_error(err, tmp):
            raise
        raise why_not_written(path, err, need) from None


def written(path: Path) -> contextlib.AbstractContextManager[None]:
    """Write errors of the file `path` (see is_write_error) as one line naming it."""
    return _write_errors_are_one_line(path, None, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        if len(parts) != 2 or not parts[0].isdigit() or psutil.pid_exists(int(parts[0])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path, need: int | None = None, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (with `folder`, a fresh directory); it
    replaces `path` as a whole only on success.

    Leftovers of killed writes of `path` are removed first (see the module docstring). `need`
    (bytes, when known) is checked against the free space then; a disk that fills up anyway
    ends in DiskFullError naming `path`, with the temporary removed.
    """
    path, tmp = Path(path), None
    try:  # a Ctrl-C at any point removes the temporary
        with _write_errors_are_one_line(path, need, None):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(path)  # before the space check: a killed run's leftover may fill it
            if need:
                check_space(path, need)
            where = {"prefix": f".{path.name}.{os.getpid()}.", "suffix": ".tmp", "dir": path.parent}
            with held():  # the temporary exists only once `tmp` names it
                tmp = Path(
                    tempfile.mkdtemp(**where) if folder else _closed(*tempfile.mkstemp(**where))
                )
        tmp.chmod((0o777 if folder else 0o666) & ~_umask())  # mkstemp's 0600: read like any file
        with _write_errors_are_one_line(path, need, tmp):
            yield tmp
            if folder and path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp is not None and folder:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)


def _closed(fd: int, name: str) -> str:
    os.close(fd)
    return name


def atomic_dir(path: Path, need: int | None = None) -> contextlib.AbstractContextManager[Path]:
    """`atomic_path` of a directory."""
    return atomic_path(path, need, folder=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


class BusyError(PipelineError):
    """A folder another process is working in right now (a second training in one out/train)."""


def _holder(lock: Path) -> str:
    """The process that holds `lock`, as it wrote itself there."""
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        process = psutil.Process(int(lock.read_text()))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(process.create_time()))
        return f"process {process.pid} (`{shlex.join(process.cmdline())[:120]}`, started {started})"
    return "another process"


@contextlib.contextmanager
def only_one(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` (made if missing, and checked to be writable) for the block, or stop at
    once with BusyError naming the process that holds it; `what` says what runs there.

    filelock's lock, an OS lock the kernel releases when the process ends however it ends
    (SIGKILL, the out-of-memory killer): a killed run never leaves a stale lock. Its file, where
    the holder writes its process id, is in the system's temporary folder, named after the
    folder's path: nothing is left among the results.
    """
    folder = Path(folder)
    key = hashlib.sha256(f"{os.getuid()} {folder.resolve()}".encode()).hexdigest()[:20]
    lock = FileLock(Path(tempfile.gettempdir()) / f"convnet-{key}.lock", timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # unnamed on Linux: nothing to leave behind
            pass
        lock.acquire()
    except Timeout:  # an OSError too
        raise BusyError(
            f"{folder}: {what} runs in it already, in {_holder(Path(lock.lock_file))}; one at a"
            " time: wait for it to end (or stop it), then run again"
        ) from None
    except OSError as err:
        raise why_not_written(folder, err) from None
    try:
        Path(lock.lock_file).write_text(str(os.getpid()))
        yield
    finally:
        lock.release()
