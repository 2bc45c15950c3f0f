"""Tiny fabricated preprocessed data (what `preprocess` writes) for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml


def make_processed(
    root: Path, n_train: int = 96, n_val: int = 40, size: int = 16, k: int = 4,
    dataset: str = "digits",
):  # fmt: skip
    """Write root/out/processed/ like preprocess does: class k = a bright k-th quadrant + noise.

    `dataset` is the name info.json records (training refuses data of another dataset)."""
    rng = np.random.default_rng(0)
    out = root / "out" / "processed"
    out.mkdir(parents=True)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % k
        x = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
        h = size // 2
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 2)
            x[i, r * h : (r + 1) * h, c * h : (c + 1) * h] += 150
        return x, labels.astype(np.int64)

    train_x, train_y = images(n_train)
    val_x, val_y = images(n_val)
    for name, arr in [("train_images", train_x), ("train_labels", train_y),
                      ("val_images", val_x), ("val_labels", val_y)]:  # fmt: skip
        np.save(out / f"{name}.npy", arr)
    np.save(out / "mean.npy", train_x.mean(0).astype(np.float32))
    (out / "mean.png").write_bytes(b"")
    (out / "classes.json").write_text(json.dumps([f"c{i}" for i in range(k)]))
    info = {"dataset": dataset, "image_size": size, "num_classes": k,
            "train_count": n_train, "val_count": n_val, "std": [60.0, 60.0, 60.0]}  # fmt: skip
    (out / "info.json").write_text(json.dumps(info))
    return out


# The kill and store-failure tests need a training that outlasts the test's reaction: an epoch of
# 480 images takes about 35 ms here (a whole 30-epoch run about 1 s), one of 4,800 about 0.25 s.
SLOW_EPOCH = 4800


def setup(root: Path, n_train: int = 480, **train) -> None:
    """A workspace in `root`: fabricated processed data and a tiny params.yaml."""
    root.mkdir()
    make_processed(root, n_train=n_train)
    write_params(root, **train)


def write_params(root: Path, **train) -> Path:
    """A params.yaml for tiny CPU runs: mlp on 12 px crops, overrides in `train`."""
    base = {"epochs": 2, "batch_size": 16, "crop_size": 12, "lr": 0.05, "warmup_epochs": 0,
            "device": "cpu"}  # fmt: skip
    params = {"seed": 0, "model": "mlp", "nets": {"mlp": {"hidden": 32}}, "train": base | train,
              "evaluate": {"batch_size": 32}}  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
