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

    def check_model(self, classes: list[str], stored_size: int, crop_size: int, what: str) -> None:
        """Stop when a model (`what`) was trained on other classes, or on images of another size,
        than these data hold: its crops would not fit, or show it other pixels per object."""
        self.check_classes(classes, what)
        if stored_size != self.image_size:
            raise DataError(
                f"{what} was trained on {stored_size} px images (crops of {crop_size} px), but"
                f" {paths.PROCESSED} holds {self.image_size} px images"
                f" ({self.info.get('dataset')}); run `dvc repro` so the model and the data match"
            )

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


def _read_json(path: Path, remake: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {remake}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not valid JSON ({err}); {remake}") from None


def _read_array(path: Path, remake: str, mmap: bool = False) -> np.ndarray:
    # Images are memory-mapped: a large set is read once, straight to the training device.
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {remake}") from None
    except (OSError, ValueError, EOFError) as err:  # truncated, not a .npy, pickled objects
        raise DataError(f"{path}: damaged or not a .npy array ({err}); {remake}") from None


def _check(p: Processed, folder: Path, remake: str) -> None:
    """Stop on arrays that do not fit together (one was replaced or cut short): training on
    their overlap, or on labels past the classes, would be silently wrong."""
    for split, images, labels in (
        ("train", p.train_images, p.train_labels),
        ("val", p.val_images, p.val_labels),
    ):
        if images.ndim != 4 or images.shape[3] != 3 or images.shape[1:3] != p.mean.shape[:2]:
            raise DataError(
                f"{folder / f'{split}_images.npy'}: shape {images.shape}, expected (N,"
                f" {p.mean.shape[0]}, {p.mean.shape[1]}, 3) like mean.npy; {remake}"
            )
        if labels.shape != (len(images),):
            raise DataError(
                f"{folder / f'{split}_labels.npy'}: {labels.shape[0] if labels.ndim else 0}"
                f" labels for the {len(images)} images of {split}_images.npy; {remake}"
            )
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(p.classes):
            raise DataError(
                f"{folder / f'{split}_labels.npy'}: labels {labels.min()}..{labels.max()},"
                f" but classes.json names {len(p.classes)} classes; {remake}"
            )


def load_processed(made_from: dict[str, Any] | None = None, folder: Path = paths.PROCESSED):
    """Load preprocess's output; a missing folder names the stage to run.

    `made_from` (Params.preprocess_inputs()) are the params the data must have been made with:
    data from another dataset or split stop here with one line, instead of training one
    dataset under another's name. A missing, damaged or inconsistent file stops with one line
    naming it.
    """
    folder = Path(folder)
    if not (folder / "info.json").exists():
        raise DataError(f"{folder}: no preprocessed data; run `dvc repro preprocess` first")
    remake = f"run `dvc repro preprocess` to remake {folder}"
    info = _read_json(folder / "info.json", remake)
    if not isinstance(info, dict) or not isinstance(info.get("std"), list):
        raise DataError(f"{folder / 'info.json'}: not what preprocess writes; {remake}")
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
    classes = _read_json(folder / "classes.json", remake)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{folder / 'classes.json'}: not a list of class names; {remake}")
    processed = Processed(
        train_images=_read_array(folder / "train_images.npy", remake, mmap=True),
        train_labels=_read_array(folder / "train_labels.npy", remake),
        val_images=_read_array(folder / "val_images.npy", remake, mmap=True),
        val_labels=_read_array(folder / "val_labels.npy", remake),
        classes=classes,
        mean=_read_array(folder / "mean.npy", remake),
        std=info["std"],
        info=info,
    )
    _check(processed, folder, remake)
    return processed
