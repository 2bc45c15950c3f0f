"""Preprocessing arithmetic and the batched crops: exact values on crafted inputs."""

import tracemalloc

import numpy as np
import pytest
import torch

import nets
from stages.data.augment import augment, center_crop, crop_flip, ten_crop
from stages.data.sources.base import pad_and_stack
from stages.data.writer import ProcessedWriter, digest
from stages.engine.device import Speed
from stages.engine.inference import predict_proba, topk_accuracy


def coords(h: int = 8, w: int = 8) -> torch.Tensor:
    """A (1, h, w, 3) uint8 image whose pixel (r, c) holds r in channel 0 and c in channel 1."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([r, c, torch.zeros_like(r)], -1)[None].to(torch.uint8)


CPU = Speed(torch.device("cpu"))  # fp32, contiguous


def test_pad_and_stack_centres_and_copies_to_three_channels():
    grey = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    out = pad_and_stack(grey)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert (out[:, 2:30, 2:30, 1] == grey).all()
    assert (out[..., 0] == out[..., 2]).all()
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (out[:, border] == 0).all()


def _statistics(tmp_path, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """The writer's mean image and info for `images` as the training set."""
    out = ProcessedWriter(tmp_path)
    labels = np.arange(len(images)) % 2
    out.array("train", images, labels)
    out.array("val", images[:2], labels[:2])
    info = out.finish(["a", "b"], "digits", {})
    return np.load(tmp_path / "mean.npy"), info


def test_mean_image_std_and_digest_exact(tmp_path, monkeypatch):
    import stages.data.writer as writer

    monkeypatch.setattr(writer, "SCAN_ROWS", 2)  # chunks must add up like one pass
    images = np.zeros((3, 2, 2, 3), np.uint8)
    images[0] = 30
    images[1, 0, 0] = 90
    mean, info = _statistics(tmp_path, images)
    expected = np.full((2, 2, 3), 10.0, np.float32)
    expected[0, 0] = 40.0
    np.testing.assert_allclose(mean, expected)
    values = images[..., 0].astype(float).ravel()
    np.testing.assert_allclose(info["std"][0], values.std(), rtol=1e-9)
    # The digest read back from the file equals the one of the arrays in memory.
    assert info["digests"]["train"] == digest(images, np.arange(3) % 2)
    assert info["digests"]["val"] == digest(images[:2], np.arange(2) % 2)


def test_statistics_need_no_image_sized_temporaries(tmp_path):
    # numpy reports its array allocations to tracemalloc: the statistics of a 12 MB set must
    # not allocate a float copy of it (Tiny ImageNet's 1.4 GB arrays leave no room for one).
    images = np.random.default_rng(0).integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8)
    out = ProcessedWriter(tmp_path)
    out.array("train", images, np.zeros(len(images), np.int64))
    out.array("val", images[:10], np.zeros(10, np.int64))
    tracemalloc.start()
    try:
        info = out.finish(["a"], "digits", {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 2
    values = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(info["std"], values.std(axis=0), rtol=1e-9)


def test_crop_flip_takes_the_requested_window():
    img = coords().repeat(2, 1, 1, 1)  # (2, 8, 8, 3)
    out = crop_flip(img, torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([False, True]), 4)
    rows, cols = (out[:, :2] * 255).round().long().unbind(1)  # (2, 4, 4) each
    assert rows[0, :, 0].tolist() == [1, 2, 3, 4] and cols[0, 0].tolist() == [2, 3, 4, 5]
    assert rows[1, :, 0].tolist() == [3, 4, 5, 6] and cols[1, 0].tolist() == [3, 2, 1, 0]


def test_ten_crop_positions_and_mirrors():
    views = ten_crop(coords(), 6)  # (1, 10, 3, 6, 6)
    corner = [(int(v[0, 0, 0] * 255 + 0.5), int(v[1, 0, 0] * 255 + 0.5)) for v in views[0]]
    assert corner[:5] == [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    # mirrored crops: the top-left pixel is the original crop's top-right one
    assert corner[5:] == [(0, 5), (0, 7), (2, 5), (2, 7), (1, 6)]
    assert torch.equal(views[0, 5], views[0, 0].flip(-1))
    assert torch.equal(views[0, 4], center_crop(coords(), 6)[0])


def test_augment_draws_parameters_per_sample():
    images = coords(16, 16).repeat(64, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = augment(images, 8, pad=2, flip=True, generator=g)
    assert out.shape == (64, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    assert len({tuple(x[:2, 0, 0].tolist()) for x in out}) > 10  # different crops in one batch


def test_ten_crop_equals_single_crop_on_constant_images():
    torch.manual_seed(0)
    model = nets.build("alexnet", 5, 24)
    images = np.full((6, 32, 32, 3), 77, np.uint8)
    one = predict_proba(model, images, 24, crops=1, batch_size=4, speed=CPU)
    ten = predict_proba(model, images, 24, crops=10, batch_size=4, speed=CPU)
    torch.testing.assert_close(one, ten, rtol=1e-5, atol=1e-6)


def test_topk_accuracy():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(probs, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc == pytest.approx({"top1": 1 / 3, "top2": 2 / 3})


def test_ten_crop_without_mirrors_averages_the_five_plain_crops():
    """A model trained without flips is tested on the views it learned: corners and centre."""
    torch.manual_seed(0)
    model = nets.build("alexnet", 5, 24).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    five = predict_proba(model, images, 24, crops=10, batch_size=2, mirror=False, speed=CPU)
    with torch.no_grad():
        views = ten_crop(torch.from_numpy(images), 24)[:, :5]  # (3, 5, 3, 24, 24)
        expected = model(views.flatten(0, 1)).softmax(-1).view(3, 5, -1).mean(1)
    torch.testing.assert_close(five, expected, rtol=1e-4, atol=1e-5)
    ten = predict_proba(model, images, 24, crops=10, batch_size=2, speed=CPU)
    assert not torch.allclose(five, ten)  # the mirrors are what differs
