"""Stage 1, download: put the dataset's raw files, untouched, under out/raw/.

Each source (stages/data/sources/) says what that means. Embedded sources need no network:
`digits` copies scikit-learn's bundled file, `shapes` is drawn by preprocess from the seed,
`folder` snapshots your own images from `download.data_dir`. Real datasets are taken from
`download.data_dir` (data/) when you put them there, as the official archive (checked by
checksum) or as the official layout already extracted (checked by structure), and otherwise
fetched from the official address (or `download.mirror`), verified, and extracted
(stages/data/fetch.py). dvc.yaml lists `download.data_dir` as this stage's dependency (the
inputs stage makes it where it is missing), so any change in it reruns download.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import atomic_dir
from stages.data.fetch import OfflineError, copy_tree, extract, fetch, where_to_put
from stages.data.sources import SOURCES, Source
from stages.params import DownloadParams, Params

ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar")


def download(p: Params) -> Path:
    """Fetch the raw files of `p.dataset` into out/raw/ (replaced as a whole) and return it."""
    source = SOURCES[p.dataset]
    with atomic_dir(paths.RAW) as tmp:
        if source.make_raw is not None:
            source.make_raw(tmp, p.download)
        else:
            _official(source, tmp, p.download)
    return paths.RAW


def _official(source: Source, dest: Path, d: DownloadParams) -> None:
    """The official files: archives in data_dir (checksum), else the extracted layout there
    (structure), else downloaded; archives extracted into `dest`, other files copied."""
    data_dir = Path(d.data_dir)
    have_archives = source.files and all((data_dir / r.name).is_file() for r in source.files)
    found = None if have_archives or source.extracted is None else source.extracted(data_dir)
    if found:
        for path in found:
            if path.is_dir():
                copy_tree(path, dest / path.name, inside=data_dir)
            elif path.name.endswith(ARCHIVES):
                extract(path, dest)
            else:
                shutil.copyfile(path, dest / path.name)
        print(f"download: using {', '.join(str(path) for path in found)} from {data_dir}/")
        return
    if not source.files:
        raise PipelineError(
            f"{data_dir}: the files of {source.name} are not there; {source.manual}"
        )
    scratch = dest / ".archives"
    for path in _fetch_all(source, scratch, d):
        if path.name.endswith(ARCHIVES):
            extract(path, dest)
        else:  # a file used as it is (MNIST's gzipped idx files); never move the user's file
            shutil.copyfile(path, dest / path.name)
    shutil.rmtree(scratch, ignore_errors=True)  # extracted: the archive itself is not raw data


def _fetch_all(source: Source, dest: Path, d: DownloadParams) -> list[Path]:
    """Verified copies of every official file (in data_dir or downloaded into dest)."""
    remotes, data_dir = source.files, Path(d.data_dir)
    try:
        return [
            fetch(r, dest, data_dir=data_dir, mirror=d.mirror, retries=d.retries, timeout=d.timeout)
            for r in remotes
        ]
    except OfflineError as err:
        missing = [r for r in remotes if not (data_dir / r.name).is_file()]
        if len(missing) < 2:
            raise
        # Offline, name every file still missing, not only the first one tried.
        raise OfflineError(
            f"no network, and {len(missing)} of the {len(remotes)} files of {source.name} are"
            f" not in {data_dir}/: download them by hand and put them at"
            f" {where_to_put(missing, data_dir)}"
        ) from err
