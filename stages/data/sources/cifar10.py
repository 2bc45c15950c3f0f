"""CIFAR-10: 10 classes, 50,000 train + 10,000 test 32x32 colour images (the binary version).

Accepted in `download.data_dir` as the official `cifar-10-binary.tar.gz` (checked by checksum)
or extracted as `cifar-10-batches-bin/` (checked by structure: the class names, the six batch
files, their record counts and labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.data.sources.base import (
    LayoutError,
    NotOfficialError,
    RemoteFile,
    Source,
    require,
    visible,
)

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import Params

FOLDER = "cifar-10-batches-bin"
RECORD = 3073  # label byte + 1024 R + 1024 G + 1024 B, row-major 32x32
TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST = "test_batch.bin"
PER_BATCH = 10_000  # official records per batch file
# The binary version: raw bytes. The Python version's batches are pickles, and unpickling a
# downloaded file runs whatever code it carries.
FILES = (
    RemoteFile(
        "cifar-10-binary.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
        "md5:c32a1d4ab5d03f1284b67883e8d87530",  # published on the CIFAR page
        170_052_171,
    ),
)


def _records(path: Path) -> np.ndarray:
    data = np.fromfile(require(path), dtype=np.uint8)
    if data.size == 0 or data.size % RECORD:
        raise LayoutError(
            f"{path}: {data.size} bytes is not a whole number of {RECORD}-byte records"
        )
    records = data.reshape(-1, RECORD)
    if records[:, 0].max() > 9:
        raise LayoutError(f"{path}: label {records[:, 0].max()} out of range 0-9")
    return records


def _classes(meta: Path) -> list[str]:
    return [line.strip() for line in meta.read_text().splitlines() if line.strip()]


def extracted(data_dir: Path) -> list[Path] | None:
    """data_dir/cifar-10-batches-bin, checked against the official structure."""
    root = data_dir / FOLDER
    if not root.is_dir():
        return None
    here = {p.name for p in visible(root)}
    missing = [n for n in ["batches.meta.txt", *TRAIN, TEST] if n not in here]
    if missing:
        raise NotOfficialError(root, f"{', '.join(missing)} missing", "CIFAR-10")
    meta = root / "batches.meta.txt"
    if (found := len(_classes(meta))) != 10:
        raise NotOfficialError(meta, f"{found} class names, not 10", "CIFAR-10")
    for name in [*TRAIN, TEST]:
        path = root / name
        size, want = path.stat().st_size, PER_BATCH * RECORD
        if size != want:
            raise NotOfficialError(
                path, f"{size:,} bytes, the official batch file {want:,} ({PER_BATCH:,} records)",
                "CIFAR-10",
            )  # fmt: skip
        if np.fromfile(path, dtype=np.uint8)[::RECORD].max() > 9:
            raise NotOfficialError(path, "holds a label outside 0-9", "CIFAR-10")
    return [root]


def read(raw: Path, _: Params, out: ProcessedWriter) -> list[str]:
    root = require(raw / FOLDER, "folder")
    meta = require(root / "batches.meta.txt")
    classes = _classes(meta)
    if len(classes) != 10:
        raise LayoutError(f"{meta}: expected 10 class names, found {len(classes)}")
    for split, names in (("train", TRAIN), ("val", [TEST])):  # the official test batch: val
        batches = [_records(root / name) for name in names]  # (n, 3073) each
        labels = []
        with out.split(split, sum(len(b) for b in batches), 32) as npy:
            start = 0
            for records in batches:
                planes = records[:, 1:].reshape(-1, 3, 32, 32)  # (n, 3, 32, 32)
                npy.write(start, planes.transpose(0, 2, 3, 1))  # (n, 32, 32, 3)
                labels.append(records[:, 0])
                start += len(records)
        out.labels(split, np.concatenate(labels))
    return classes


SOURCE = Source(
    name="cifar10",
    description="CIFAR-10: 10 classes, 50,000 train + 10,000 test 32x32 colour images",
    image_size=32,
    read=read,
    files=FILES,
    extracted=extracted,
)
