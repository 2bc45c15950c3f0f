"""Downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov and Hutter 2017): the 1,000 ILSVRC-2012
classes, 1,281,167 train and 50,000 validation images at 64x64.

The official files sit behind a login at image-net.org (Downloads, "Downsampled ImageNet 64x64"),
so there is no address to fetch: put `Imagenet64_train_part1_npz.zip`,
`Imagenet64_train_part2_npz.zip` and `Imagenet64_val_npz.zip` in `download.data_dir`, zipped or
extracted (`train_data_batch_1.npz` ... `train_data_batch_10.npz`, `val_data.npz`, loose or in
folders named after the zips). Each npz holds `data` (N, 12288) uint8, the R, G and B planes one
after another, and `labels` 1..1000 in the ILSVRC-2012 class order (the devkit's map_clsloc.txt,
kept beside this module as imagenet64_classes.tsv).

Read without pickle: the arrays' headers are parsed and their rows streamed out of the npz, a
chunk at a time, so memory stays flat whatever the size (15.7 GB of pixels in all).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from stages.data.sources.base import LayoutError, NotOfficialError, Source

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import Params

SIZE = 64
ROW = 3 * SIZE * SIZE  # bytes per image in `data`
TRAIN = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL = "val_data.npz"
ZIPS = {  # official archive -> the npz files it holds
    "Imagenet64_train_part1_npz.zip": TRAIN[:5],
    "Imagenet64_train_part2_npz.zip": TRAIN[5:],
    "Imagenet64_val_npz.zip": [VAL],
}
CHUNK = 4096  # images read from an npz at a time
MANUAL = (
    "ImageNet 64x64 has no public address: log in at image-net.org, download"
    f" {', '.join(ZIPS)} (Downloads, Downsampled ImageNet 64x64) and put them in data/, zipped"
    " or extracted"
)


@dataclass(frozen=True)
class Counts:
    train: int = 1_281_167
    val: int = 50_000
    classes: int = 1000


OFFICIAL = Counts()


def classes() -> tuple[list[str], list[str]]:
    """The wnids and readable names of the 1,000 classes, in label order (label 1 first)."""
    rows = [line.split("\t") for line in (Path(__file__).parent / "imagenet64_classes.tsv")
            .read_text().splitlines()]  # fmt: skip
    return [w for w, _ in rows], [name.replace("_", " ") for _, name in rows]


def _header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the .npy stream `f`, left at its first value; object arrays (which
    only a pickle can load, and a pickle can run code) are refused."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as err:
        raise LayoutError(f"{where}: not a .npy array ({err})") from None
    if dtype.hasobject:
        raise LayoutError(f"{where}: holds Python objects, which only a pickle loads; refusing")
    if fortran:
        raise LayoutError(f"{where}: stored in Fortran order, not as the official files")
    return shape, dtype


def _arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the arrays of an npz file, from their headers alone."""
    try:
        with zipfile.ZipFile(path) as npz:
            found = {}
            for member in npz.namelist():
                with npz.open(member) as f:
                    found[member.removesuffix(".npy")] = _header(f, f"{path}:{member}")
            return found
    except zipfile.BadZipFile as err:
        raise LayoutError(f"{path}: not an npz file ({err})") from None


def _count(path: Path) -> int:
    """Images in one official npz file, checked: `data` (N, 12288) uint8, `labels` (N,) ints."""
    arrays = _arrays(path)
    if "data" not in arrays or "labels" not in arrays:
        raise LayoutError(f"{path}: no `data` or no `labels` array (found {', '.join(arrays)})")
    (data_shape, data_type), (label_shape, label_type) = arrays["data"], arrays["labels"]
    if data_type != np.uint8 or len(data_shape) != 2 or data_shape[1] != ROW:
        raise LayoutError(f"{path}: `data` is {data_type} {data_shape}, not uint8 (N, {ROW})")
    if label_type.kind not in "iu" or label_shape != data_shape[:1]:
        raise LayoutError(
            f"{path}: `labels` is {label_type} {label_shape}, not {data_shape[0]} integers"
        )
    return data_shape[0]


def _find(folder: Path, name: str) -> Path | None:
    """`name` loose in `folder`, or in the folder its zip extracts to."""
    zips = [z for z, held in ZIPS.items() if name in held]
    for candidate in [folder / name] + [folder / z.removesuffix(".zip") / name for z in zips]:
        if candidate.is_file():
            return candidate
    return None


def check(folder: Path) -> list[Path]:
    """Every official npz file under `folder`, checked against the official counts."""
    found = {name: _find(folder, name) for name in [*TRAIN, VAL]}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise NotOfficialError(folder, f"{', '.join(missing)} missing", "ImageNet 64x64")
    try:
        train = sum(_count(found[name]) for name in TRAIN)
        val = _count(found[VAL])
    except LayoutError as err:
        raise NotOfficialError(folder, str(err), "ImageNet 64x64") from None
    for split, got, want in (("train", train, OFFICIAL.train), ("val", val, OFFICIAL.val)):
        if got != want:
            raise NotOfficialError(
                folder, f"{got:,} {split} images, the official set {want:,}", "ImageNet 64x64"
            )
    return [found[name] for name in [*TRAIN, VAL]]


def extracted(data_dir: Path) -> list[Path] | None:
    """The npz files in data_dir (checked), or the three official zips (checked once
    extracted, when preprocess reads them); None when neither is there."""
    if any(_find(data_dir, name) for name in [*TRAIN, VAL]):
        return check(data_dir)
    zips = [data_dir / name for name in ZIPS]
    return zips if all(z.is_file() for z in zips) else None


def _rows(path: Path) -> Iterator[np.ndarray]:
    """The images of an npz file as (n, 64, 64, 3) uint8 blocks, streamed from `data`."""
    with zipfile.ZipFile(path) as npz, npz.open("data.npy") as f:
        shape, _ = _header(f, f"{path}:data.npy")
        for start in range(0, shape[0], CHUNK):
            n = min(CHUNK, shape[0] - start)
            planes = np.frombuffer(f.read(n * ROW), dtype=np.uint8)
            if planes.size != n * ROW:
                raise LayoutError(f"{path}: `data` ends after {start + planes.size // ROW} images")
            yield planes.reshape(n, 3, SIZE, SIZE).transpose(0, 2, 3, 1)  # (n, 64, 64, 3)


def _labels(path: Path) -> np.ndarray:
    """`labels` 1..1000 as 0..999 (int64)."""
    with zipfile.ZipFile(path) as npz, npz.open("labels.npy") as f:
        shape, dtype = _header(f, f"{path}:labels.npy")
        labels = np.frombuffer(f.read(), dtype=dtype)[: shape[0]].astype(np.int64) - 1
    if len(labels) and (labels.min() < 0 or labels.max() >= OFFICIAL.classes):
        raise LayoutError(f"{path}: labels outside 1..{OFFICIAL.classes}")
    return labels


def read(raw: Path, _: Params, out: ProcessedWriter) -> list[str]:
    files = check(raw)
    for split, names in (("train", files[:-1]), ("val", files[-1:])):
        labels = [_labels(path) for path in names]
        with out.split(split, sum(len(y) for y in labels), SIZE) as npy:
            start = 0
            for path in names:
                for block in _rows(path):
                    npy.write(start, block)
                    start += len(block)
        out.labels(split, np.concatenate(labels))
    wnids, names = classes()
    out.info["wnids"] = wnids
    return names


SOURCE = Source(
    name="imagenet64",
    description="Downsampled ImageNet 64x64: 1,000 classes, 1,281,167 train + 50,000 val images",
    image_size=SIZE,
    read=read,
    extracted=extracted,
    manual=MANUAL,
)
