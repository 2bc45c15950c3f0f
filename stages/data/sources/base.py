"""What a dataset source declares, and the small helpers its reader shares with the others.

A source is one module of this package exposing `SOURCE = Source(...)`: its name and description,
the official files download fetches (with their checksums), how it accepts the official layout
already extracted in `download.data_dir` (checked by its structure, since an extracted copy has
no checksum), and how preprocess reads out/raw/ into the processed arrays. The table in
`stages.data.sources` is built from these modules, so a new source is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.core.errors import PipelineError
from stages.core.files import is_hidden, is_plain_name

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import DownloadParams, Params


class LayoutError(PipelineError):
    """The raw files are not laid out as the dataset should be; the message names the file."""


class NotOfficialError(LayoutError):
    """An extracted copy in data/ that differs from the official set (extra class, missing file)."""

    def __init__(self, where: Path, difference: str, dataset: str) -> None:
        super().__init__(
            f"{where}: {difference}; this is not the official {dataset} set: fix the copy, or"
            " put the official archive in its place, or train on a set of your own with"
            " dataset=folder"
        )


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name (also the name looked for in `download.data_dir`)."""

    name: str
    urls: tuple[str, ...]  # tried in order; `download.mirror` replaces them all with mirror/name
    digest: str  # "md5:<hex>" or "sha256:<hex>"
    size: int  # bytes, for the progress bar and the README

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]

    @property
    def hexdigest(self) -> str:
        return self.digest.split(":", 1)[1]

    def addresses(self, mirror: str = "") -> list[str]:
        """Where to fetch it, in order: the mirror alone when one is set, else the official ones."""
        return [mirror.rstrip("/") + "/" + self.name] if mirror else list(self.urls)


# out/raw (already fetched) + params + the writer of out/processed -> the class names, in label
# order. The reader writes every split through the writer.
Reader = Callable[[Path, "Params", "ProcessedWriter"], list[str]]


@dataclass(frozen=True)
class Source:
    """Everything the pipeline knows about one dataset."""

    name: str
    description: str
    read: Reader  # preprocess: out/raw -> the processed splits, through the writer
    image_size: int | None = None  # side of the stored images; None: preprocess.image_size
    # Official files, fetched from data_dir or the network and checked against their checksums;
    # archives among them (.zip, .tar.gz) are extracted into out/raw. Empty: nothing to fetch.
    files: tuple[RemoteFile, ...] = ()
    # The official layout already extracted in data_dir: checked by structure (NotOfficialError
    # naming the first difference) -> the paths download copies into out/raw; None when absent.
    extracted: Callable[[Path], list[Path] | None] | None = None
    # Sources with no official files write out/raw themselves (embedded data, your own folders).
    make_raw: Callable[[Path, DownloadParams], None] | None = None
    # Checks of params that only this source needs (ParamsError naming the key).
    check: Callable[[Params], None] | None = None
    # Where your own data lives (a path under data_dir), for the MLflow dataset's source.
    local_origin: Callable[[DownloadParams], str] | None = None
    # How to get the files when they have no public address (a login, a licence).
    manual: str = ""
    # The reader honours preprocess.tuning_split (holds out training images as the validation
    # set, the official one unused).
    tuning_split: bool = False

    @property
    def embedded(self) -> bool:
        """True when the pipeline makes out/raw itself: no network, nothing in data/."""
        return self.make_raw is not None

    def origin(self, d: DownloadParams) -> str | None:
        """Where the data came from: the first address download tries, your folder, or None
        for data made by the pipeline itself."""
        if self.files:
            return self.files[0].addresses(d.mirror)[0]
        return self.local_origin(d) if self.local_origin else None


def require(path: Path, what: str = "file") -> Path:
    """`path`, or LayoutError when the raw files lack it."""
    if not (path.is_file() if what == "file" else path.is_dir()):
        raise LayoutError(
            f"{path}: {what} missing; out/raw is not the expected layout (run the download"
            " stage for this dataset, or check the archive you placed in data/)"
        )
    return path


def plain(name: str, where: str) -> str:
    """`name`, read from a file of the raw data (`where`: the file and line), checked to be one
    file name before it is joined to a folder: a `/` or `..` in it would read from outside."""
    if not is_plain_name(name):
        raise LayoutError(f"{where}: {name!r} is not a plain file name; it would lead out of its"
                          " folder: fix the file or put the official archive in data/")  # fmt: skip
    return name


def visible(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, without hidden ones (files.is_hidden: .DS_Store, ...)."""
    return sorted(e for e in folder.iterdir() if not is_hidden(e.name))


def visible_files(folder: Path) -> list[Path]:
    """The files under `folder` at any depth, sorted, without hidden ones and without anything
    inside a hidden folder (files.is_hidden)."""
    return sorted(
        f for f in folder.rglob("*")
        if f.is_file() and not any(is_hidden(part) for part in f.relative_to(folder).parts)
    )  # fmt: skip


def pad_and_stack(images: np.ndarray, size: int = 32) -> np.ndarray:
    """MNIST-style grey (N, h, w) uint8 -> zero-pad centred to size x size -> (N, size, size, 3)."""
    n, h, w = images.shape
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=np.uint8)
    out[:, top : top + h, left : left + w] = images
    return np.repeat(out[..., None], 3, axis=-1)  # (N, size, size, 3)


def val_split(labels: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/validation split (`preprocess.val_fraction`, `seed`), for
    sources without an official validation set."""
    return _stratified(labels, p, "val_fraction", p.preprocess.val_fraction)


def holdout(labels: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training images kept for training and of those held out as the
    validation set (`preprocess.tuning_split` of them, stratified by `seed`), for sources whose
    official validation set is kept for the final score."""
    return _stratified(labels, p, "tuning_split", p.preprocess.tuning_split)


def _stratified(
    labels: np.ndarray, p: Params, key: str, size: float
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(
            np.arange(len(labels)), test_size=size, stratify=labels, random_state=p.seed
        )
    except ValueError as err:  # a class too small to appear in both splits, or too many
        raise PipelineError(
            f"{p.dataset}: cannot split preprocess.{key}={size} off the training images with"
            f" every class in both parts ({err}); add images to small classes or hold out"
            " fewer"
        ) from None
    return train, val
