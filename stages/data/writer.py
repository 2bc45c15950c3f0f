"""Writing out/processed/: decoded blocks go straight into the `.npy` files train memory-maps.

Nothing holds a whole split in memory: each block of decoded images is written at its place in
the file as it arrives, and the statistics (the mean image, the per-channel std, the digests
MLflow shows) come from one pass reading the finished files back a chunk at a time. So the peak
memory of preprocess is the imported libraries plus a few blocks, whatever the dataset's size.

Blocks are written with `os.pwrite`, not through a writable memory map: pages of a mapping count
in the process's resident memory until it is unmapped (a 15 GB split would show as 15 GB), while
written pages sit in the page cache, which the kernel writes back and evicts as it needs.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.core.errors import PipelineError
from stages.core.files import check_space, write_json
from stages.data.images import decode_blocks

SCAN_ROWS = 256  # images per chunk read back (the statistics make ~8 bytes a value of it)


class BadImagesError(PipelineError):
    """Files that could not be decoded (and preprocess.skip_bad_images is false)."""


class SplitDigest:
    """md5 of a split's pixels and labels, fed the images in order: the MLflow dataset digest
    (MLflow's own hashes only the first 10,000 values and copies the whole array to do so)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.md5 = hashlib.md5(str((tuple(shape), np.dtype(dtype).str)).encode())

    def update(self, rows: np.ndarray) -> None:
        self.md5.update(np.ascontiguousarray(rows).data)

    def hexdigest(self, labels: np.ndarray) -> str:
        self.md5.update(str((labels.shape, labels.dtype.str)).encode())
        self.md5.update(np.ascontiguousarray(labels).data)
        return self.md5.hexdigest()


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SplitDigest of arrays in memory (or memory-mapped: read a slice at a time)."""
    d = SplitDigest(images.shape, images.dtype)
    for start in range(0, len(images), SCAN_ROWS):
        d.update(images[start : start + SCAN_ROWS])
    return d.hexdigest(labels)


class NpyFile:
    """A `.npy` of uint8 images (N, S, S, 3), written and read a block at a time at any position
    with pwrite/pread (see the module's docstring)."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            self.shape, _, _ = read(f)
            self.offset = f.tell()  # where the data start
        self.row = int(np.prod(self.shape[1:]))  # bytes per image

    @classmethod
    def create(cls, path: Path, count: int, size: int) -> NpyFile:
        """A new file of `count` images of side `size` (checked against the free space)."""
        check_space(path, count * size * size * 3)
        # numpy writes the header and sizes the file (sparse); the data are written with pwrite.
        header = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
        )
        del header
        return cls(path, writable=True)

    def write(self, start: int, block: np.ndarray) -> None:
        """Images `start`, `start + 1`, ... := block (n, S, S, 3) uint8."""
        data = memoryview(np.ascontiguousarray(block, dtype=np.uint8)).cast("B")
        position = self.offset + start * self.row
        while data:  # pwrite may write less than asked
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def read(self, start: int, count: int) -> np.ndarray:
        """Images [start, start + count) as a fresh (count, S, S, 3) array."""
        data = os.pread(self.fd, count * self.row, self.offset + start * self.row)
        return np.frombuffer(data, dtype=np.uint8).reshape(-1, *self.shape[1:])

    def chunks(self) -> Iterator[np.ndarray]:
        """Every image in order, SCAN_ROWS at a time."""
        for start in range(0, self.shape[0], SCAN_ROWS):
            yield self.read(start, min(SCAN_ROWS, self.shape[0] - start))

    def keep(self, kept: np.ndarray) -> None:
        """Keep only the images at indices `kept` (sorted), moved down in order; the file and its
        header shrink to match. For the few undecodable files preprocess may skip."""
        dst = 0
        for start in range(0, self.shape[0], SCAN_ROWS):
            wanted = kept[(kept >= start) & (kept < start + SCAN_ROWS)]
            if len(wanted):
                block = self.read(start, min(SCAN_ROWS, self.shape[0] - start))[wanted - start]
                self.write(dst, block)  # dst <= start: never overwrites rows still to move
                dst += len(wanted)
        self.shape = (dst, *self.shape[1:])
        header = _npy_header(self.shape)
        if len(header) != self.offset:  # numpy pads headers so the first dimension can change
            raise RuntimeError(f"{self.path}: header size changed ({self.offset} -> {len(header)})")
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, self.offset + dst * self.row)

    def close(self) -> None:
        os.close(self.fd)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


@dataclass
class ProcessedWriter:
    """out/processed/ being written: one call per split, then `finish`."""

    folder: Path
    workers: int = 0  # decoding processes (0 = every available core)
    skip_bad: bool = False  # preprocess.skip_bad_images
    info: dict[str, Any] = field(default_factory=dict)  # extra keys for info.json (wnids, ...)
    counts: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, why), every split

    @contextmanager
    def split(self, name: str, count: int, size: int) -> Iterator[NpyFile]:
        """`{name}_images.npy` of `count` images, to fill with `.write(start, block)`."""
        npy = NpyFile.create(self.folder / f"{name}_images.npy", count, size)
        try:
            yield npy
        finally:
            npy.close()
        self.counts[name] = npy.shape[0]

    def array(self, name: str, images: np.ndarray, labels: np.ndarray | None) -> None:
        """A split already in memory (embedded sets, MNIST)."""
        with self.split(name, len(images), images.shape[1]) as npy:
            npy.write(0, images)
        self.labels(name, labels)

    def labels(self, name: str, labels: np.ndarray | None) -> None:
        if labels is not None:
            np.save(self.folder / f"{name}_labels.npy", np.asarray(labels, dtype=np.int64))

    def write_json(self, name: str, data: Any) -> None:
        """Another file of out/processed (test_files.json, ...)."""
        write_json(self.folder / name, data)

    def decode(
        self, name: str, files: Sequence[Path], labels: np.ndarray | None, size: int,
        fit: bool = False,
    ) -> list[Path]:  # fmt: skip
        """Decode image files into split `name` (undecodable ones left out and recorded);
        returns the files kept, in order."""
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        bad: list[tuple[int, str]] = []
        with self.split(name, len(files), size) as npy:
            blocks = decode_blocks(files, size, fit=fit, workers=self.workers, desc=name)
            for start, block, block_bad in blocks:
                npy.write(start, block)
                bad += block_bad
            kept = np.setdiff1d(np.arange(len(files)), [i for i, _ in bad])
            if bad:
                npy.keep(kept)
        self.bad += [(str(files[i]), why) for i, why in sorted(bad)]
        self.labels(name, None if labels is None else labels[kept])
        return [files[i] for i in kept]

    def finish(self, classes: list[str], dataset: str, params: dict[str, Any]) -> dict[str, Any]:
        """Check the undecodable files, then write the statistics, classes.json and info.json."""
        for path, why in self.bad:
            print(f"preprocess: cannot decode {path}: {why}")
        if self.bad and not self.skip_bad:
            shown = ", ".join(path for path, _ in self.bad[:10])
            more = f" and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
            raise BadImagesError(
                f"{len(self.bad)} file(s) could not be decoded: {shown}{more};"
                " fix or remove them, or set preprocess.skip_bad_images: true to skip them"
            )
        if self.bad:
            (self.folder / "skipped.txt").write_text("".join(f"{f}\n" for f, _ in self.bad))
        mean, std, train_digest = self._scan("train", statistics=True)
        _, _, val_digest = self._scan("val")
        np.save(self.folder / "mean.npy", mean)
        save_image(mean, self.folder / "mean.png")
        write_json(self.folder / "classes.json", classes)
        info = {
            "dataset": dataset,
            "params": params,  # checked by every stage that loads the data
            "image_size": int(mean.shape[0]),
            "num_classes": len(classes),
            "train_count": self.counts["train"],
            "val_count": self.counts["val"],
            "test_count": self.counts.get("test", 0),
            "skipped_images": len(self.bad),  # undecodable files left out
            "digests": {"train": train_digest, "val": val_digest},  # MLflow dataset digests
            **self.info,
            "std": std,
        }
        write_json(self.folder / "info.json", info)
        return info

    def _scan(self, name: str, statistics: bool = False):
        """One pass over a finished split, a chunk at a time: its digest and, for the training
        set, the per-pixel mean (float32 (S, S, 3), 0-255) and the per-channel std."""
        labels = np.load(self.folder / f"{name}_labels.npy")
        npy = NpyFile(self.folder / f"{name}_images.npy")
        d = SplitDigest(npy.shape, np.uint8)
        total = np.zeros(npy.shape[1:], dtype=np.float64)  # (S, S, 3)
        histogram = np.zeros((3, 256), dtype=np.int64)
        try:
            for rows in npy.chunks():  # (n, S, S, 3)
                d.update(rows)
                if statistics:
                    total += rows.sum(axis=0, dtype=np.float64)
                    flat = rows.reshape(-1, 3)
                    for c in range(3):
                        histogram[c] += np.bincount(flat[:, c], minlength=256)
        finally:
            npy.close()
        mean = (total / max(1, npy.shape[0])).astype(np.float32)
        return mean, channel_std(histogram) if statistics else [], d.hexdigest(labels)


def channel_std(histogram: np.ndarray) -> list[float]:
    """Per-channel standard deviation, in 0-255 units, from each channel's histogram of the 256
    values (3, 256): exact, and no float copy of the images."""
    values = np.arange(256, dtype=np.float64)  # (256,)
    n = histogram.sum(axis=1)  # (3,)
    mean = histogram @ values / n  # (3,)
    var = (histogram * (values - mean[:, None]) ** 2).sum(axis=1) / n  # (3,)
    return [float(v) for v in np.sqrt(np.maximum(var, 1e-12))]


def save_image(array: np.ndarray, path: Path, min_side: int = 256) -> None:
    """Write (H, W, 3) 0-255 values as a PNG, enlarged (nearest) so small images stay visible."""
    img = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    scale = max(1, min_side // max(img.size))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
