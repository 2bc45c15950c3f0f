"""Training data larger than the memory budget: streamed from the .npy file a batch at a time,
giving exactly the batches (and so the weights) of the resident path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers.fabricate import make_processed, params_from
from helpers.processes import with_store

from stages import train as train_module
from stages.core.runlog import RunLog
from stages.data.stream import READER, Resident, Streamed
from stages.engine.distributed import Dist

CPU = torch.device("cpu")


@pytest.fixture
def images_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "train_images.npy", images)
    return np.load(tmp_path / "train_images.npy", mmap_mode="r"), np.arange(50) % 7


@pytest.mark.parametrize("world", [1, 2])
def test_streamed_batches_equal_the_resident_ones_for_every_rank(images_file, world):
    images, labels = images_file
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    resident, streamed = Resident(images, labels, CPU), Streamed(images, labels, CPU)
    for rank in range(world):
        part = Dist(rank, world).part(12)
        got = list(streamed.steps(order, 12, 4, part))
        for step, (whole, index, y) in enumerate(resident.steps(order, 12, 4, part)):
            batch, none, y2 = got[step]
            assert none is None and torch.equal(batch, whole[index]) and torch.equal(y, y2)
            rows = order[step * 12 : (step + 1) * 12][part]
            assert torch.equal(batch, torch.from_numpy(np.array(images[rows.numpy()])))


def test_stopping_early_ends_the_reader(images_file):
    images, labels = images_file
    steps = Streamed(images, labels, CPU).steps(torch.arange(50), 5, 10, slice(0, 5))
    next(steps)
    assert [t for t in threading.enumerate() if t.name == READER]  # reading ahead
    steps.close()  # the loop left (an error, an interrupt): the reader thread is stopped
    assert not [t for t in threading.enumerate() if t.name == READER]


def test_a_file_cut_short_is_an_error_in_the_training_thread(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4, 4, 3), np.uint8))
    images = np.load(tmp_path / "x.npy", mmap_mode="r")
    with open(tmp_path / "x.npy", "r+b") as f:
        f.truncate(images.offset + 5 * 48)
    steps = Streamed(images, np.zeros(10, np.int64), CPU).steps(
        torch.arange(10), 10, 1, slice(0, 10)
    )
    with pytest.raises(OSError, match="image 5 is cut short"):
        next(steps)


def test_a_set_over_the_budget_streams_and_trains_the_same_weights(tmp_path, monkeypatch, capsys):
    make_processed(tmp_path, n_train=64, n_val=16, size=16)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.setattr(RunLog, "model", lambda *args: None)
    # fp32: bf16 convolutions on an AMX CPU are not bit for bit repeatable (two resident runs
    # differed in the last bit of a resnet18 weight); fp32 ones are.
    train = {"crop_size": 12, "epochs": 2, "batch_size": 16, "device": "cpu", "resume": False,
             "brightness": 0.2, "precision": "fp32"}  # fmt: skip
    weights = {}
    for budget in ("auto", 0.00001):  # 49 KiB of images: resident, then streamed
        p = params_from({"train": train | {"memory_budget": budget}}, "model=resnet18")
        metrics = train_module.train(p)
        out = capsys.readouterr().out
        assert ("streaming the training set" in out) == (budget != "auto"), out
        state = torch.load("out/train/model.pt", weights_only=True)["model"]
        weights[budget] = (metrics, state)
    (m1, w1), (m2, w2) = weights.values()
    assert m1["train_loss"] == m2["train_loss"]
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
