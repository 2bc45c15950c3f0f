"""The report's augmentation preview shows every distortion training applies, as it applies it."""

import numpy as np
import torch
from helpers.fabricate import params_from

from stages.data.augment import augment, augment_options
from stages.report import augmentation_views


def train_params(**train):
    return params_from({"train": train}).train


def test_default_preview_is_the_crop_and_the_flip():
    views = augmentation_views(train_params(flip=True))
    assert [title for title, _ in views] == ["random crop 28", "+ horizontal flip"]


def test_every_configured_distortion_gets_a_row_and_the_last_is_training_itself():
    t = train_params(pad=2, flip=True, vflip=True, brightness=0.3, hue=0.1, cutout=6)
    views = augmentation_views(t)
    titles = [title for title, _ in views]
    assert titles == [
        "random crop 28 after 2 px padding",
        "+ horizontal flip",
        "+ vertical flip",
        "+ colour jitter brightness 0.3, hue 0.1",
        "+ cutout 6 px",
        "all together, as trained",
    ]
    # Each single-distortion row turns on exactly its own distortion.
    crop = views[0][1]
    assert not crop["flip"] and not crop["vflip"] and crop["cutout_size"] == 0
    assert views[2][1] == crop | {"vflip": True}
    assert views[4][1] == crop | {"cutout_size": 6}
    # The last row draws with exactly the options and the generator the training loop uses.
    assert views[-1][1] == augment_options(t)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), "uint8"))
    shown = augment(images, generator=torch.Generator().manual_seed(3), **views[-1][1])
    trained = augment(images, generator=torch.Generator().manual_seed(3), **augment_options(t))
    assert torch.equal(shown, trained)


def test_resized_crop_replaces_the_plain_crop():
    t = train_params(resized_crop=True, resized_crop_scale=0.5, flip=False)
    assert [title for title, _ in augmentation_views(t)] == ["random-resized crop 28 (area >= 0.5)"]
