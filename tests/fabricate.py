"""Small fabricated pipeline outputs (processed data, a checkpoint, history, predictions) for
the report / predict / ensemble / submit tests: real files in the real layout, tiny sizes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import nets
from stages import params
from stages.core import checkpoint, paths
from stages.data.writer import digest

REPO = Path(__file__).resolve().parents[1]
SIZE = 16  # stored image side; models see 12 px crops
CROP = 12
CLASSES = ["zero", "one", "two", "three"]
WNIDS = ["n00000000", "n00000001", "n00000002", "n00000003"]


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a bright bar in row band k: learnable, and visibly different per class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    out = rng.integers(0, 40, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        out[i, 2 + 3 * k : 4 + 3 * k, 2:14] = 220
    return out, labels.astype(np.int64)


def processed(root: Path) -> None:
    folder = root / paths.PROCESSED
    folder.mkdir(parents=True)
    train_x, train_y = images(40, 0)
    val_x, val_y = images(16, 1)
    for name, arr in [("train_images", train_x), ("train_labels", train_y),
                      ("val_images", val_x), ("val_labels", val_y)]:  # fmt: skip
        np.save(folder / f"{name}.npy", arr)
    np.save(folder / "mean.npy", train_x.mean(0).astype(np.float32))
    Image.fromarray(train_x.mean(0).astype(np.uint8)).save(folder / "mean.png")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    info = {"dataset": "digits", "std": [50.0, 50.0, 50.0], "wnids": WNIDS,
            "digests": {"train": digest(train_x, train_y),
                        "val": digest(val_x, val_y)}}  # fmt: skip
    (folder / "info.json").write_text(json.dumps(info))


def p(*overrides: str) -> params.Params:
    base = ["model=alexnet", f"train.crop_size={CROP}", "net.fc_width=16"]
    return params.load(REPO / "params.yaml", base + list(overrides))


def model(seed: int = 0, crop: int = CROP, size: int = SIZE) -> torch.nn.Module:
    """`crop`/`size`: a model of another input size (stored images of `size`, crops of `crop`)."""
    torch.manual_seed(seed)
    mean = torch.full((3, size, size), 0.2)
    return nets.build("alexnet", len(CLASSES), crop, mean=mean, fc_width=16)


def save_checkpoint(
    path: Path, net: torch.nn.Module, run_id: str = "", crop: int = CROP, size: int = SIZE,
    classes: list[str] = CLASSES, data: dict | None = None,
) -> None:  # fmt: skip
    """A model.pt as training writes it: exactly the inference keys. `data`: the info.json of
    the data it learned from (digits with wnids unless given)."""
    model = checkpoint.Inference(
        net="alexnet", net_options={"fc_width": 16}, num_classes=len(classes), image_size=crop,
        stored_size=size, classes=classes, precision="fp32", memory_format="channels_last",
        model=net.state_dict(), params=p().to_dict(), metrics={"epoch": 1, "val_top1": 0.5},
        epoch=1, mlflow_run_id=run_id,
        data={"dataset": "digits", "wnids": WNIDS} if data is None else data,
    )  # fmt: skip
    checkpoint.save(path, model.to_dict())


def history_and_predictions(root: Path) -> None:
    (root / paths.TRAIN).mkdir(parents=True, exist_ok=True)
    with open(root / paths.HISTORY, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"])
        w.writerows([[1, 1.3, 0.4, 1.2, 0.5, 1.0, 0.05], [2, 0.9, 0.7, 1.0, 0.6, 1.0, 0.01]])
    (root / paths.EVALUATE).mkdir(parents=True, exist_ok=True)
    rows = [("zero", "zero")] * 3 + [("one", "two")] * 2 + [("two", "one"), ("three", "one")]
    with open(root / paths.EVALUATE / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows(rows)
