"""The processed data preprocess wrote, loaded for train, evaluate, report and the commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core import paths
from stages.core.errors import PipelineError


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
