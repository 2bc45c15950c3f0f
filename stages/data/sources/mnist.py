"""MNIST: 60,000 train + 10,000 test handwritten digits, 28x28, padded to 32x32x3.

Accepted in `download.data_dir` as the four official gzipped idx files (checked by checksum) or
as the four idx files uncompressed (checked by structure: magic numbers, sizes, counts).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.data.sources.base import (
    LayoutError,
    NotOfficialError,
    RemoteFile,
    Source,
    pad_and_stack,
    require,
)

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import Params

# MNIST's own site (yann.lecun.com) now often refuses plain downloads; the copies below are the
# ones torchvision and TensorFlow use, byte-identical (same md5).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _remote(name: str, md5: str, size: int) -> RemoteFile:
    return RemoteFile(name, tuple(m + name for m in MIRRORS), f"md5:{md5}", size)


FILES = (
    _remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9_912_422),
    _remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28_881),
    _remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1_648_877),
    _remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4_542),
)
IMAGES, LABELS = 0x00000803, 0x00000801  # idx magic numbers: uint8, 3 and 1 dimensions
COUNTS = {"train": 60_000, "t10k": 10_000}  # the official images per file prefix


def _expected(name: str) -> tuple[int, list[int]]:
    """(magic, dims) of the official idx file `name` (without .gz)."""
    prefix = name.split("-")[0]
    n = COUNTS[prefix]
    return (IMAGES, [n, 28, 28]) if "-images-" in name else (LABELS, [n])


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (gzipped when its name ends in .gz): big-endian magic, dims, uint8 values."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as err:
        raise LayoutError(f"{path}: not a readable idx file ({err})") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise LayoutError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LayoutError(f"{path}: {body.size} values, header says {dims}")
    return body.reshape(dims)


def extracted(data_dir: Path) -> list[Path] | None:
    """The four idx files uncompressed in data_dir, checked against the official structure."""
    paths = [data_dir / f.name.removesuffix(".gz") for f in FILES]
    if not all(p.is_file() for p in paths):
        return None
    for path in paths:
        magic, dims = _expected(path.name)
        with open(path, "rb") as f:
            head = f.read(4 + 4 * len(dims))
        found = int.from_bytes(head[:4], "big")
        if found != magic:
            raise NotOfficialError(path, f"magic number {found:#010x}, not {magic:#010x}", "MNIST")
        got = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(dims))]
        if got != dims:
            raise NotOfficialError(path, f"holds {got}, the official file {dims}", "MNIST")
        size, want = path.stat().st_size, 4 + 4 * len(dims) + int(np.prod(dims))
        if size != want:
            raise NotOfficialError(path, f"{size:,} bytes, the official file {want:,}", "MNIST")
    return paths


def read(raw: Path, _: Params, out: ProcessedWriter) -> list[str]:
    def find(name: str) -> Path:  # out/raw holds each file gzipped or not
        plain = raw / name.removesuffix(".gz")
        return plain if plain.is_file() else require(raw / name)

    for prefix, split in (("train", "train"), ("t10k", "val")):
        images = read_idx(find(f"{prefix}-images-idx3-ubyte.gz"), IMAGES)  # (n, 28, 28)
        labels = read_idx(find(f"{prefix}-labels-idx1-ubyte.gz"), LABELS)  # (n,)
        if len(images) != len(labels):
            raise LayoutError(f"{raw}/{prefix}-*: {len(images)} images but {len(labels)} labels")
        out.array(split, pad_and_stack(images), labels)
    return [str(d) for d in range(10)]


SOURCE = Source(
    name="mnist",
    description="MNIST: 60,000 train + 10,000 test handwritten digits, 28x28 padded to 32x32x3",
    image_size=32,
    read=read,
    files=FILES,
    extracted=extracted,
)
