"""Stage 2, preprocess: decode the raw files once into packed arrays nothing downstream re-decodes.

Writes to out/processed/ (as a whole, atomically):
  {train,val}_images.npy  uint8 (N, H, W, 3)      {train,val}_labels.npy  int64 (N,)
  classes.json            readable class names     mean.npy  float32 (H, W, 3), 0-255 units
  mean.png                the mean image, enlarged info.json dataset, sizes, per-channel std
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split

from stages import paths
from stages.files import atomic_dir, write_json
from stages.params import Params


@dataclass
class Splits:
    """Decoded images of one dataset; `val_*` is None when the source has no official split."""

    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    classes: list[str]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None


def pad_and_stack(images: np.ndarray, size: int = 32) -> np.ndarray:
    """MNIST-style grey (N, h, w) uint8 -> zero-pad centred to size x size -> (N, size, size, 3)."""
    n, h, w = images.shape
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=np.uint8)
    out[:, top : top + h, left : left + w] = images
    return np.repeat(out[..., None], 3, axis=-1)  # (N, size, size, 3)


def _read_digits(raw: Path, _: Params) -> Splits:
    with gzip.open(raw / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (1797, 65)
    pixels = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) * (255.0 / 16.0))
    # 8x8 -> 28x28 like MNIST's digit box, in one batched call.
    big = F.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False)
    grey = big.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()  # (N, 28, 28)
    return Splits(
        train_images=pad_and_stack(grey),
        train_labels=table[:, 64].astype(np.int64),
        classes=[str(d) for d in range(10)],
    )


READERS: dict[str, Callable[[Path, Params], Splits]] = {"digits": _read_digits}


def mean_image(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-pixel mean of (N, H, W, 3) uint8 as float32 (H, W, 3), summed in chunks (low memory)."""
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), chunk):
        total += images[start : start + chunk].sum(axis=0, dtype=np.float64)
    return (total / len(images)).astype(np.float32)


def channel_std(images: np.ndarray, chunk: int = 4096) -> list[float]:
    """Per-channel standard deviation of (N, H, W, 3) uint8, in 0-255 units."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.float64)
        s += block.sum(axis=(0, 1, 2))
        s2 += (block**2).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    var = s2 / count - (s / count) ** 2
    return [float(v) for v in np.sqrt(np.maximum(var, 1e-12))]


def save_image(array: np.ndarray, path: Path, min_side: int = 256) -> None:
    """Write (H, W, 3) 0-255 values as a PNG, enlarged (nearest) so small images stay visible."""
    img = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    scale = max(1, min_side // max(img.size))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def preprocess(p: Params) -> Path:
    """Decode out/raw/ into out/processed/ and return that folder."""
    splits = READERS[p.dataset](paths.RAW, p)
    if splits.val_images is None:
        idx = np.arange(len(splits.train_labels))
        train_idx, val_idx = train_test_split(
            idx,
            test_size=p.preprocess.val_fraction,
            stratify=splits.train_labels,
            random_state=p.seed,
        )
        splits.val_images = splits.train_images[val_idx]
        splits.val_labels = splits.train_labels[val_idx]
        splits.train_images = splits.train_images[train_idx]
        splits.train_labels = splits.train_labels[train_idx]

    mean = mean_image(splits.train_images)
    with atomic_dir(paths.PROCESSED) as out:
        for split in ("train", "val"):
            np.save(out / f"{split}_images.npy", getattr(splits, f"{split}_images"))
            np.save(out / f"{split}_labels.npy", getattr(splits, f"{split}_labels"))
        np.save(out / "mean.npy", mean)
        save_image(mean, out / "mean.png")
        write_json(out / "classes.json", splits.classes)
        write_json(
            out / "info.json",
            {
                "dataset": p.dataset,
                "image_size": int(splits.train_images.shape[1]),
                "num_classes": len(splits.classes),
                "train_count": len(splits.train_labels),
                "val_count": len(splits.val_labels),
                "std": channel_std(splits.train_images),
            },
        )
    print(
        f"preprocess: {p.dataset}: {len(splits.train_labels)} train + {len(splits.val_labels)} val"
        f" images of {splits.train_images.shape[1]}px, {len(splits.classes)} classes"
    )
    return paths.PROCESSED
