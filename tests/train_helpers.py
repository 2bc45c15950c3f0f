"""Tiny fabricated preprocessed data (what `preprocess` writes) for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.data.writer import digest
from stages.params import Params, TrainParams, compose, from_dict, yaml_text

REPO = Path(__file__).resolve().parents[1]


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
            "train_count": n_train, "val_count": n_val, "std": [60.0, 60.0, 60.0],
            "digests": {"train": digest(train_x, train_y),
                        "val": digest(val_x, val_y)}}  # fmt: skip
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


def write_params(root: Path, model: str = "mlp", **train) -> Path:
    """A params.yaml for tiny CPU runs, composed from conf/ as `dvc exp run -S model=...` would
    compose it, then shrunk: 2 epochs on 12 px crops (an mlp of 32 units), overrides in `train`."""
    base = {"epochs": 2, "batch_size": 16, "crop_size": 12, "lr": 0.05, "warmup_epochs": 0,
            "device": "cpu"}  # fmt: skip
    params = compose(REPO / "conf", [f"model={model}"])
    if model == "mlp":
        params["net"]["hidden"] = 32
    params["train"] |= base | train
    params["evaluate"]["batch_size"] = 32
    path = root / "params.yaml"
    path.write_text(yaml_text(params))
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
