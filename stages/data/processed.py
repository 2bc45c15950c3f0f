"""The processed data preprocess wrote, loaded for train, evaluate, report and the commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def check_classes(self, classes: list[str], what: str) -> None:
        """Stop when a model (`what`) was trained on other classes than these data hold."""
        if list(classes) != list(self.classes):
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise DataError(
                f"{what} was trained on {len(classes)} other classes ({shown}) than"
                f" {paths.PROCESSED} holds ({self.info.get('dataset')}, {len(self.classes)}"
                " classes); run `dvc repro` so the model and the data match"
            )


def _differences(made: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: made -> wanted` for each flattened key whose value differs."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value
        return out

    a, b = flat(made), flat(wanted)
    return [f"{k}={a.get(k)!r} (params: {b.get(k)!r})" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


def load_processed(made_from: dict[str, Any] | None = None, folder: Path = paths.PROCESSED):
    """Load preprocess's output; a missing folder names the stage to run.

    `made_from` (Params.preprocess_inputs()) are the params the data must have been made with:
    data from another dataset or split stop here with one line, instead of training one
    dataset under another's name.
    """
    folder = Path(folder)
    if not (folder / "info.json").exists():
        raise DataError(f"{folder}: no preprocessed data; run `dvc repro preprocess` first")
    info = json.loads((folder / "info.json").read_text())
    if made_from is not None:
        # Data from before info.json recorded its params carry the dataset name only.
        made = info.get("params") or {"dataset": info.get("dataset")}
        wanted = {k: v for k, v in made_from.items() if k in made}
        diffs = _differences(made, wanted)
        if diffs:
            raise DataError(
                f"{folder} was made with {'; '.join(diffs[:3])}; run `dvc repro` (or"
                " `python -m stages download` and `python -m stages preprocess` with the same"
                " params) to remake it"
            )

    def arr(name: str, mmap: bool = False) -> np.ndarray:
        # Images are memory-mapped: a large set is read once, straight to the training device.
        return np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)

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
