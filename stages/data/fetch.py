"""Fetch, verify and safely extract archives: the rules every real dataset's download follows.

- `data_dir/<name>` is looked at first (a user without internet drops the archive there); it is
  used only if its checksum matches.
- Otherwise each address is tried in turn: written to `<name>.part`, resumed with an HTTP Range
  request after a dropped connection, retried with exponential backoff on connection errors and
  5xx, checksum verified, and only then renamed to `<name>`. A failure deletes the `.part` file,
  so nothing that looks complete is ever left behind.
- Extraction refuses members that would land outside the target directory, naming them.

Why not torchvision's `download_url` / `extract_archive` (torchvision 0.29): `download_url`
writes straight to the final file name (an interrupted download leaves a file that looks
complete), has no Range resume and retries nothing but its redirect handling; `extract_archive`
calls `TarFile.extractall` without a filter (on Python 3.11-3.13 that trusts `../` names and
links pointing anywhere) and `ZipFile.extractall`, which silently rewrites bad names instead of
refusing them. `check_integrity` is md5-only, and our table also allows sha256.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tqdm import tqdm

from stages.core.errors import PipelineError
from stages.core.files import is_hidden, is_write_error, written

if TYPE_CHECKING:  # the sources import this module (folder copies your images with copy_tree)
    from stages.data.sources.base import RemoteFile

BACKOFF_S = 1.0  # first wait between attempts; doubles each time (tests set it to 0)
CHUNK = 1 << 20


class FetchError(PipelineError):
    """A download that could not be completed or verified; the message says what to do."""


class OfflineError(FetchError):
    """No address of a file could be reached at all: the network is down or closed."""


class UnsafeArchiveError(PipelineError):
    """An archive member that would be written outside the extraction directory."""


class _Retryable(Exception):
    """A failure worth another attempt at the same address (dropped connection, 5xx)."""

    def __init__(self, message: str, network: bool = True) -> None:
        super().__init__(message)
        self.network = network  # False: the server answered (5xx), so the network is up


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def fetch(
    remote: RemoteFile,
    dest_dir: Path,
    *,
    data_dir: Path,
    mirror: str = "",
    retries: int = 4,
    timeout: float = 60.0,
) -> Path:
    """Return a verified copy of `remote`: `data_dir/<name>` if there, else downloaded into
    `dest_dir/<name>`. Raises FetchError with one actionable message."""
    local = Path(data_dir) / remote.name
    if local.is_file():
        got = file_digest(local, remote.algorithm)
        if got != remote.hexdigest:
            raise FetchError(
                f"{local}: {remote.algorithm} is {got}, expected {remote.hexdigest};"
                " the file is damaged or not the official one: replace it or delete it"
                " to download again"
            )
        print(f"download: using {local} (checksum ok)")
        return local

    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.name
    part = dest_dir / (remote.name + ".part")
    failures: list[str] = []
    unreachable = 0
    urls = remote.addresses(mirror)
    for url in urls:
        try:
            _download(url, part, remote, retries=retries, timeout=timeout)
        except _Retryable as err:
            part.unlink(missing_ok=True)
            failures.append(f"{url}: {err}")
            unreachable += err.network
            continue
        except FetchError as err:
            part.unlink(missing_ok=True)
            failures.append(str(err))
            continue
        except BaseException:  # Ctrl-C, SIGTERM: no half file left behind
            part.unlink(missing_ok=True)
            raise
        got = file_digest(part, remote.algorithm)
        if got != remote.hexdigest:
            part.unlink()
            failures.append(
                f"{url} gave a file with {remote.algorithm} {got}, expected"
                f" {remote.hexdigest} (deleted)"
            )
            continue
        os.replace(part, final)  # only a verified file ever carries the final name
        return final

    part.unlink(missing_ok=True)
    by_hand = (
        f"download {remote.urls[0]} by hand and put it at {local}"
        f" ({remote.algorithm} {remote.hexdigest}, {remote.size:,} bytes)"
    )
    if unreachable == len(urls):
        raise OfflineError(f"no network: could not reach {'; '.join(failures)}. {by_hand}")
    raise FetchError(f"could not fetch {remote.name}: {'; '.join(failures)}. Or {by_hand}")


def _download(url: str, part: Path, remote: RemoteFile, *, retries: int, timeout: float) -> None:
    """Fill `part` from `url`, resuming after drops; raise _Retryable once attempts run out."""
    part.unlink(missing_ok=True)
    last: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            _attempt(url, part, remote, timeout)
            return
        except _Retryable as err:
            last = err
    assert last is not None
    raise _Retryable(f"{last} (after {retries} attempts)", network=last.network)


def _attempt(url: str, part: Path, remote: RemoteFile, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "convnet-pipeline"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # asked past the end: start again from zero
            part.unlink()
            raise _Retryable(f"HTTP 416 resuming at byte {have}", network=False) from None
        if err.code >= 500:
            raise _Retryable(f"HTTP {err.code} {err.reason}", network=False) from None
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _Retryable(f"{reason}") from None
    with response:
        # 206: the server honoured the Range and sends the rest; 200: it sends everything.
        mode = "ab" if have and response.status == 206 else "wb"
        start = have if mode == "ab" else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else remote.size
        with (
            written(part),  # a write the system refuses is the disk's doing, not the network's
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=remote.name,
                disable=None,  # no bar when not a terminal (DVC logs, CI)
            ) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
            except (http.client.HTTPException, OSError) as err:  # drops, resets, timeouts
                if isinstance(err, OSError) and is_write_error(err, part):
                    raise  # said by `written`
                raise _Retryable(f"connection dropped at byte {f.tell()} ({err!r})") from None
            if f.tell() < total:  # server closed cleanly but early
                raise _Retryable(f"connection dropped at byte {f.tell()} of {total}")


def _check_member(name: str, target: Path, archive: Path) -> None:
    p = PurePosixPath(name)
    resolved = (target / name).resolve()
    if p.is_absolute() or ".." in p.parts or not resolved.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside {target}; refusing to extract"
        )


def extract(archive: Path, target: Path) -> None:
    """Extract a .zip, .tar, .tar.gz into `target`, refusing any member that leaves it."""
    target.mkdir(parents=True, exist_ok=True)
    name = archive.name
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:  # check all before writing anything
                    _check_member(info.filename, target, archive)
                    # A zip can carry a symlink in its Unix mode bits; refuse rather than follow.
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise UnsafeArchiveError(
                            f"{archive}: member {info.filename!r} is a symbolic link; refusing"
                        )
                for info in tqdm(infos, desc=f"extract {name}", unit="file", disable=None):
                    zf.extract(info, target)
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:  # name the member ourselves; the filter re-checks links
                    _check_member(m.name, target, archive)
                # "data" filter (Python 3.11.4+): no absolute or `..` paths, no links leaving
                # the target, no device files, sane permissions.
                tf.extractall(target, members=members, filter="data")
        else:
            raise FetchError(f"{archive}: unknown archive type (expected .zip or .tar.gz)")
    except tarfile.FilterError as err:
        raise UnsafeArchiveError(
            f"{archive}: member {err.tarinfo.name!r} is unsafe ({err}); refusing to extract"
        ) from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise FetchError(f"{archive}: not a valid archive ({err})") from None


def where_to_put(remotes: list[RemoteFile], data_dir: Path) -> str:
    """Where to put each file for an offline run: name, official address, checksum."""
    return "; ".join(
        f"{data_dir / r.name} from {r.urls[0]} ({r.algorithm} {r.hexdigest})" for r in remotes
    )


def copy_tree(src: Path, dst: Path, inside: Path) -> int:
    """Copy the regular files under `src` to `dst`; return how many.

    A symbolic link is followed only while its target stays inside the folder `inside` (the
    data folder): a link to anything else (your home, /etc) would copy that into out/raw, the
    DVC cache and every `dvc push`, so it is skipped with one line saying so. Links to a
    folder being copied (loops) and things that are not files (sockets, broken links) are
    skipped the same way. Hidden files and folders (files.is_hidden) are left out silently,
    as every reader of the copy leaves them out.
    """
    inside = inside.resolve()
    count = 0

    def skip(entry: Path, why: str) -> None:
        print(f"download: skipped {entry}: {why}")

    def visit(folder: Path, out: Path, above: tuple[Path, ...]) -> None:
        nonlocal count
        above = (*above, folder.resolve())  # the folders being copied, outermost first
        out.mkdir(parents=True, exist_ok=True)
        for entry in sorted(folder.iterdir()):
            if is_hidden(entry.name):
                continue
            target = entry.resolve()
            if entry.is_symlink() and not target.is_relative_to(inside):
                skip(entry, f"a link to {target}, outside {inside}; links must stay in it")
            elif entry.is_dir():
                if target in above:
                    skip(entry, f"a link to {target}, a folder it is inside (a loop)")
                else:
                    visit(entry, out / entry.name, above)
            elif entry.is_file():
                shutil.copyfile(entry, out / entry.name)
                count += 1
            else:
                skip(entry, "not a regular file (a broken link, socket or device)")

    visit(src, dst, ())
    return count
