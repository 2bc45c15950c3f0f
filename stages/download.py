"""Stage 1, download: put the dataset's raw files, untouched, under out/raw/.

Embedded datasets need no network: `digits` copies scikit-learn's bundled `digits.csv.gz`.
Real datasets look in `download.data_dir` (data/) first for an archive placed by hand, then
fetch from the official address (or `download.mirror`), verifying checksums.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from stages import paths
from stages.files import atomic_dir
from stages.params import DownloadParams, Params

Fetcher = Callable[[Path, DownloadParams], None]


def _digits(dest: Path, _: DownloadParams) -> None:
    # The very file sklearn.datasets.load_digits parses: 1,797 rows of 64 pixels (0-16) + label.
    source = resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
    with resources.as_file(source) as src:
        shutil.copyfile(src, dest / "digits.csv.gz")


FETCHERS: dict[str, Fetcher] = {"digits": _digits}


def download(p: Params) -> Path:
    """Fetch the raw files of `p.dataset` into out/raw/ (replaced as a whole) and return it."""
    with atomic_dir(paths.RAW) as tmp:
        FETCHERS[p.dataset](tmp, p.download)
    return paths.RAW
