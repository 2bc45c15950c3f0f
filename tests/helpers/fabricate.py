"""Small fabricated pipeline inputs and outputs: processed data as `preprocess` writes it, a
params.yaml composed from conf/ and shrunk, checkpoints, history and predictions. Real files in
the real layout, tiny sizes."""

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
from stages.params import Params, TrainParams, compose, from_dict, yaml_text

from .processes import with_store

REPO = Path(__file__).resolve().parents[2]
SIZE = 16  # stored image side; models see 12 px crops
CROP = 12
CLASSES = ["zero", "one", "two", "three"]
WNIDS = ["n00000000", "n00000001", "n00000002", "n00000003"]
# The kill and store-failure tests need a training that outlasts the test's reaction: an epoch of
# 480 images takes about 35 ms here (a whole 30-epoch run about 1 s), one of 4,800 about 0.25 s.
SLOW_EPOCH = 4800


def _draw(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a bright k-th quadrant over noise: learnable, and visibly different per class."""
    labels = np.arange(n) % len(CLASSES)
    x = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    h = size // 2
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 2)
        x[i, r * h : (r + 1) * h, c * h : (c + 1) * h] += 150
    return x, labels.astype(np.int64)


def images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, size, size, 3) uint8 of the four classes in turn, and their labels."""
    return _draw(np.random.default_rng(seed), n, size)


def make_processed(
    root: Path, n_train: int = 96, n_val: int = 40, size: int = SIZE, dataset: str = "digits"
) -> Path:
    """Write root/out/processed/ as preprocess does, of the four CLASSES (their wnids in
    info.json). `dataset` is the name info.json records (training refuses another's data)."""
    out = root / paths.PROCESSED
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = _draw(rng, n_train, size)
    val_x, val_y = _draw(rng, n_val, size)
    for name, arr in [("train_images", train_x), ("train_labels", train_y),
                      ("val_images", val_x), ("val_labels", val_y)]:  # fmt: skip
        np.save(out / f"{name}.npy", arr)
    np.save(out / "mean.npy", train_x.mean(0).astype(np.float32))
    Image.fromarray(train_x.mean(0).astype(np.uint8)).save(out / "mean.png")
    (out / "classes.json").write_text(json.dumps(CLASSES))
    info = {"dataset": dataset, "image_size": size, "num_classes": len(CLASSES),
            "train_count": n_train, "val_count": n_val, "std": [60.0, 60.0, 60.0],
            "wnids": WNIDS, "digests": {"train": digest(train_x, train_y),
                                        "val": digest(val_x, val_y)}}  # fmt: skip
    (out / "info.json").write_text(json.dumps(info))
    return out


def processed(root: Path) -> Path:
    """The small processed data of the report, predict and tool tests: 40 + 16 images."""
    return make_processed(root, n_train=40, n_val=16)


def setup(root: Path, n_train: int = 480, **train) -> None:
    """A workspace in `root`: fabricated processed data, a tiny params.yaml, an empty store."""
    root.mkdir()
    make_processed(root, n_train=n_train)
    write_params(root, **train)
    with_store(root)


def write_params(root: Path, model: str = "mlp", **train) -> Path:
    """A params.yaml for tiny CPU runs, composed from conf/ as `dvc exp run -S model=...` would
    compose it, then shrunk: 2 epochs on 12 px crops (an mlp of 32 units), overrides in `train`."""
    base = {"epochs": 2, "batch_size": 16, "crop_size": CROP, "lr": 0.05, "warmup_epochs": 0,
            "device": "cpu"}  # fmt: skip
    composed = compose(REPO / "conf", [f"model={model}"])
    if model == "mlp":
        composed["net"]["hidden"] = 32
    composed["train"] |= base | train
    composed["evaluate"]["batch_size"] = 32
    path = root / "params.yaml"
    path.write_text(yaml_text(composed))
    return path


def train_settings(**values) -> TrainParams:
    """conf/'s train section (what a fresh clone's `dvc repro` trains with), `values` changed."""
    return TrainParams(**compose(REPO / "conf")["train"] | values)


def full_params(partial: dict | None = None, *overrides: str) -> dict:
    """params.yaml as conf/ composes it with `overrides` (`dvc exp run -S` syntax), then the
    values of `partial` (nested sections) put in."""

    def merge(into: dict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    data = compose(REPO / "conf", list(overrides))
    merge(data, partial or {})
    return data


def params_from(partial: dict | None = None, *overrides: str) -> Params:
    """Validated Params of `full_params(partial, *overrides)`."""
    return from_dict(full_params(partial, *overrides))


def p(*overrides: str) -> Params:
    """The repository's params with a small alexnet on 12 px crops, `overrides` on top."""
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
