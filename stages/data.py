"""In-memory datasets and batched augmentation, shared by train, evaluate and report.

Images stay packed uint8 (N, H, W, 3) on the training device. A batch is gathered by index and
cropped/flipped in one advanced-indexing gather for the whole batch, with per-sample random
offsets: no per-image Python and no DataLoader workers. (DESIGN.md: packed uint8 + batched
augmentation ran ~80k img/s where ImageFolder + PIL with 2 workers ran ~3.5k img/s.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages import paths
from stages.errors import PipelineError


class DataError(PipelineError):
    """Processed data missing or inconsistent: the user must rerun an earlier stage."""


@dataclass
class Processed:
    """What preprocess wrote: arrays as numpy (memory-mapped), plus class names and statistics."""

    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    val_images: np.ndarray  # (M, H, W, 3) uint8
    val_labels: np.ndarray  # (M,) int64
    classes: list[str]
    mean: np.ndarray  # (H, W, 3) float32, 0-255
    std: list[float]  # per channel, 0-255
    info: dict

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    def mean_tensor(self) -> torch.Tensor:
        """The mean image as the (3, H, W) [0, 1] tensor the model's input layer holds."""
        return torch.from_numpy(self.mean).permute(2, 0, 1) / 255.0

    def std_tensor(self) -> torch.Tensor:
        return torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) / 255.0


def load_processed(folder: Path = paths.PROCESSED) -> Processed:
    """Load preprocess's output; a missing folder names the stage to run."""
    folder = Path(folder)
    if not (folder / "info.json").exists():
        raise DataError(f"{folder}: no preprocessed data; run `dvc repro preprocess` first")

    def arr(name: str, mmap: bool = False) -> np.ndarray:
        # Images are memory-mapped: a large set is read once, straight to the training device.
        return np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)

    info = json.loads((folder / "info.json").read_text())
    return Processed(
        train_images=arr("train_images.npy", mmap=True),
        train_labels=arr("train_labels.npy"),
        val_images=arr("val_images.npy", mmap=True),
        val_labels=arr("val_labels.npy"),
        classes=json.loads((folder / "classes.json").read_text()),
        mean=arr("mean.npy"),
        std=info["std"],
        info=info,
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop each image at its own (top, left), mirror those with `flip`, as one gather.

    images (B, H, W, 3) uint8; top/left (B,) int64; flip (B,) bool -> (B, 3, size, size) float.
    """
    b = images.shape[0]
    steps = torch.arange(size, device=images.device)  # (S,)
    rows = top[:, None] + steps  # (B, S)
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)  # (B, S)
    batch = torch.arange(b, device=images.device)[:, None, None]  # (B, 1, 1)
    patches = images[batch, rows[:, :, None], cols[:, None, :]]  # (B, S, S, 3)
    return to_float(patches)


def augment(
    images: torch.Tensor, size: int, pad: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (after zero padding) + random horizontal flip, per-sample parameters.

    images (B, H, W, 3) uint8 -> (B, 3, size, size) float in [0, 1].
    """
    if pad:
        images = F.pad(images, (0, 0, pad, pad, pad, pad))  # (B, H+2p, W+2p, 3)
    b, h, w, _ = images.shape
    dev = images.device
    top = torch.randint(0, h - size + 1, (b,), device=dev, generator=generator)
    left = torch.randint(0, w - size + 1, (b,), device=dev, generator=generator)
    mirror = torch.rand(b, device=dev, generator=generator) < 0.5
    if not flip:
        mirror = torch.zeros_like(mirror)
    return crop_flip(images, top, left, mirror, size)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> centre crops (B, 3, size, size) float in [0, 1]."""
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return to_float(images[:, top : top + size, left : left + size])


def ten_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """4 corners + centre, each also mirrored: (B, H, W, 3) uint8 -> (B, 10, 3, S, S) float.

    Crop order: top-left, top-right, bottom-left, bottom-right, centre; then the same mirrored
    (torchvision's TenCrop order).
    """
    h, w = images.shape[1:3]
    offsets = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    offsets.append(((h - size) // 2, (w - size) // 2))
    crops = [to_float(images[:, t : t + size, x : x + size]) for t, x in offsets]  # 5 (B,3,S,S)
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops, dim=1)  # (B, 10, 3, S, S)
