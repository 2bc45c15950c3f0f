"""Batched augmentations: output ranges, bounded effects, per-sample parameters."""

import torch

from stages.data.augment import augment, colour_jitter, cutout, to_float


def batch(n: int = 64, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def distinct(x: torch.Tensor) -> int:
    return len({tuple(v.flatten()[:40].tolist()) for v in x})


def test_each_augmentation_stays_in_range_and_varies_per_sample():
    images = batch()[:1].repeat(64, 1, 1, 1)  # one image 64 times: differences = parameters
    cases = {
        "vflip": {"vflip": True, "flip": False},
        "resized_crop": {"resized_crop_scale": 0.3},
        "brightness": {"brightness": 0.4},
        "contrast": {"contrast": 0.4},
        "saturation": {"saturation": 0.4},
        "hue": {"hue": 0.2},
        "cutout": {"cutout_size": 4},
    }
    for name, kw in cases.items():
        g = torch.Generator().manual_seed(0)
        base = {"size": 16, "pad": 0, "flip": False}
        out = augment(images, generator=g, **(base | kw))
        assert out.shape == (64, 3, 16, 16), name
        assert out.min() >= 0 and out.max() <= 1, name
        assert distinct(out) > (1 if name == "vflip" else 10), name


def test_vflip_mirrors_rows_exactly():
    images = batch(8)
    g = torch.Generator().manual_seed(0)
    out = augment(images, 16, 0, False, g, vflip=True)
    plain = to_float(images)
    flipped = [torch.equal(o, p.flip(-2)) for o, p in zip(out, plain, strict=True)]
    same = [torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped)


def test_resized_crop_keeps_geometry_and_mirrors_per_sample():
    ramp = (torch.arange(16) * 16).to(torch.uint8)  # value = 16 * column
    images = ramp.view(1, 1, 16, 1).expand(32, 16, 16, 3).contiguous()  # (32, 16, 16, 3)
    g = torch.Generator().manual_seed(0)
    out = augment(images, 8, 0, True, g, resized_crop_scale=0.2)[:, 0, 0]  # (32, 8) first rows
    steps = out[:, 1:] - out[:, :-1]  # (32, 7)
    rising, falling = (steps >= -1e-6).all(1), (steps <= 1e-6).all(1)
    assert (rising | falling).all()  # a crop of a ramp is a ramp, mirrored or not
    assert rising.any() and falling.any()
    spans = out.max(1).values - out.min(1).values
    assert spans.std() > 0.02  # crop widths differ per sample


def test_colour_jitter_is_bounded():
    x = torch.full((256, 3, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    y = colour_jitter(x, 0.2, 0.0, 0.0, 0.0, g)
    scale = y[:, 0, 0, 0] / 0.5  # (B,) brightness factors
    assert scale.min() >= 0.8 - 1e-6 and scale.max() <= 1.2 + 1e-6 and scale.std() > 0.05
    grey = torch.rand(16, 1, 4, 4).expand(16, 3, 4, 4)
    # saturation and hue leave grey pixels grey (no chroma to scale or rotate)
    out = colour_jitter(grey.clone(), 0.0, 0.0, 0.5, 0.5, g)
    torch.testing.assert_close(out, grey, atol=1e-5, rtol=0)


def test_cutout_zeroes_one_square_per_image():
    x = torch.zeros(32, 3, 12, 12)
    g = torch.Generator().manual_seed(0)
    out = cutout(x, 4, g)
    area = (out[:, 0] == 0.5).sum((1, 2))  # (B,) pixels filled
    assert area.max() == 16 and area.min() >= 4  # clipped squares at the border are smaller
    assert len({tuple(m.nonzero()[0].tolist()) for m in out[:, 0] == 0.5}) > 5


def test_gathering_by_index_equals_augmenting_the_gathered_batch():
    images = batch(32)
    idx = torch.tensor([5, 0, 31, 5, 17, 2])
    for kw in ({"pad": 0}, {"pad": 2, "cutout_size": 3}, {"pad": 0, "resized_crop_scale": 0.5}):
        opts = {"size": 12, "flip": True, "vflip": True} | kw
        by_index = augment(images, generator=torch.Generator().manual_seed(3), index=idx, **opts)
        gathered = augment(images[idx], generator=torch.Generator().manual_seed(3), **opts)
        assert torch.equal(by_index, gathered), kw
