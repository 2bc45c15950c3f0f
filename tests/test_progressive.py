"""Progressive resizing (train.resize_*), the tuning split (preprocess.tuning_split) and the
evaluation of the whole stored image: what a search for a better recipe rests on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.fabricate import CROP, SIZE, full_params, setup, train_settings
from helpers.remote_data import decoded
from test_sources import extract_tiny, offline

from stages import params
from stages import train as train_module
from stages.core.errors import ParamsError, PipelineError
from stages.core.runlog import RunLog
from stages.data.augment import augment, augment_options
from stages.data.sources import check_params
from stages.download import download
from stages.engine import loop
from stages.engine.model import check_model_params
from stages.evaluate import evaluate
from stages.preprocess import preprocess


def test_crop_side_holds_then_ramps_to_the_crop_size_in_steps_of_8():
    t = train_settings(epochs=12, crop_size=56, resize_from=32, resize_start=3, resize_end=9)
    assert [t.crop_side(e) for e in range(1, 13)] == [
        32, 32, 32, 32, 40, 40, 48, 48, 56, 56, 56, 56,
    ]  # fmt: skip
    off = train_settings(epochs=12, crop_size=56)
    assert {off.crop_side(e) for e in range(1, 13)} == {56}
    assert augment_options(off, 1)["rescale"] is None
    assert augment_options(t, 1)["rescale"] == 32 and augment_options(t, 9)["rescale"] is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"resize_from": 56}, r"train\.resize_from: is 56: use 0 \(off\) or a side from 8 to"),
        ({"resize_from": 4}, r"train\.resize_from: is 4"),
        ({"resize_from": 32, "resize_start": 5, "resize_end": 3}, r"train\.resize_end: is 3"),
        ({"resize_from": 32, "resize_start": 3, "resize_end": 3}, r"after train\.resize_start"),
        (
            {"resize_from": 32, "resize_end": 13},
            r"train\.resize_end: is 13: .* at most train\.epochs \(12\)",
        ),
    ],
)
def test_a_ramp_that_cannot_run_is_refused_naming_the_key(values, message):
    train = {"epochs": 12, "crop_size": 56} | values
    with pytest.raises(ParamsError, match=message):
        params.from_dict(full_params({"train": train}, "recipe=tiny-imagenet-cpu"))


def test_a_net_of_one_input_size_is_refused_progressive_resizing():
    p = params.from_dict(
        full_params({"train": {"resize_from": 16, "resize_start": 1, "resize_end": 2}}, "model=mlp")
    )
    with pytest.raises(ParamsError, match=r"train\.resize_from: is 16 but mlp, built for 28 px"):
        check_model_params(p)


def test_a_rescaled_crop_is_the_same_crop_at_a_lower_resolution():
    images = torch.randint(0, 256, (6, SIZE, SIZE, 3), dtype=torch.uint8)
    t = train_settings(crop_size=CROP, flip=True, saturation=0.0, hue=0.0)
    crops = augment(images, generator=torch.Generator().manual_seed(1), **augment_options(t))
    small = augment(
        images, generator=torch.Generator().manual_seed(1), **augment_options(t) | {"rescale": 8}
    )
    assert small.shape == (6, 3, 8, 8)
    expected = F.interpolate(crops, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(small, expected)


def test_the_tuning_split_holds_out_training_images_and_leaves_the_official_val_unread(
    monkeypatch,
):
    fake = extract_tiny(monkeypatch)  # 3 classes of 4 training images, 2 val images each
    p = offline("tiny-imagenet")
    p = params.from_dict(p.to_dict() | {"preprocess": p.preprocess.model_dump() | {
        "tuning_split": 3}})  # fmt: skip
    download(p)
    out = preprocess(p)
    train, val = np.load(out / "train_images.npy"), np.load(out / "val_images.npy")
    val_labels = np.load(out / "val_labels.npy")
    assert (len(train), len(val)) == (9, 3) and sorted(val_labels.tolist()) == [0, 1, 2]
    official = [decoded(d) for d, _ in fake.train]
    held = {v.tobytes() for v in val}
    assert held <= {o.tobytes() for o in official}  # training images...
    assert not held & {t.tobytes() for t in train}  # ...that training never sees
    assert not held & {decoded(d).tobytes() for d, _ in fake.val}  # the official ones unread
    info = json.loads((out / "info.json").read_text())
    assert info["params"]["preprocess"]["tuning_split"] == 3  # a different out/processed


def test_the_tuning_split_is_refused_where_the_source_has_none():
    p = params.from_dict(full_params(None, "preprocess.tuning_split=10"))
    with pytest.raises(ParamsError, match=r"preprocess\.tuning_split: supported for tiny-image"):
        check_params(p)


def test_too_large_a_tuning_split_is_one_line(monkeypatch):
    extract_tiny(monkeypatch)
    p = offline("tiny-imagenet")
    p = params.from_dict(p.to_dict() | {"preprocess": p.preprocess.model_dump() | {
        "tuning_split": 12}})  # fmt: skip
    download(p)
    with pytest.raises(PipelineError, match=r"cannot split preprocess\.tuning_split=12 off"):
        preprocess(p)


def test_a_progressive_streamed_run_trains_and_evaluate_scores_the_whole_image(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(RunLog, "model", lambda *args: None)  # the MLflow export: not here
    root = tmp_path / "w"
    setup(
        root,
        model="resnet18",
        epochs=3,
        lr=0.01,
        precision="fp32",
        memory_budget=1e-6,
        resize_from=8,
        resize_start=1,
        resize_end=3,
    )
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    p = params.load("params.yaml")
    sides = []

    def recorded(*args, **kwargs):  # the batches the model trains on, by side
        x = augment(*args, **kwargs)
        sides.append(x.shape[-1])
        return x

    monkeypatch.setattr(loop, "augment", recorded)
    train_module.train(p)
    steps = len(sides) // 3  # epoch 1 at 8 px, epoch 2 still 8 (8 px steps), then 12
    assert sides == [8] * 2 * steps + [CROP] * steps
    assert "train: streaming the training set" in capsys.readouterr().out
    metrics = evaluate(p)
    assert set(metrics["full_image"]) == {"top1", "top5", "loss"}
    assert 0 <= metrics["full_image"]["top1"] <= 1
    assert json.loads((root / "out/evaluate/metrics.json").read_text()) == metrics
