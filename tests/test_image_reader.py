"""One reader of image files: `predict` sees a file as evaluate sees the stored image, and
preprocess stores exactly what `read_image` returns, for PNG, EXIF-rotated JPEG, RGBA,
a large JPEG and a palette GIF."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import fabricate
from helpers.fabricate import params_from
from PIL import Image

from stages.commands.predict import predict
from stages.core import paths
from stages.data import images as imaging
from stages.data.images import ImageFileError, decode_blocks, read_image
from stages.engine.model import load_trained
from stages.preprocess import preprocess

ORIENTATION = 0x0112  # EXIF tag; 6: the stored pixels are the picture turned 90 degrees left
BORDER = 4  # transparent border of the RGBA files: 2 of its 4 pixels fall inside the centre crop
RED = (255, 0, 0)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    fabricate.save_checkpoint(path, fabricate.model())
    return path


@pytest.fixture
def val_images(tmp_path, monkeypatch):
    """Validation images as preprocess stores them (stored size, uint8), from out/processed."""
    monkeypatch.chdir(tmp_path)
    fabricate.processed(Path("."))
    return np.load(paths.PROCESSED / "val_images.npy")[:8]  # (8, 16, 16, 3), 2 per class


def save_exif_jpeg(img: np.ndarray, path: Path, orientation: int | None) -> None:
    """`img` turned 90 degrees left, with (or without) the EXIF tag that turns it back."""
    turned = Image.fromarray(np.ascontiguousarray(np.rot90(img)))  # rot90: counter-clockwise
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    turned.save(path, quality=100, subsampling=0, exif=exif)


def with_transparent_border(img: np.ndarray, under: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 4): `img` opaque in the centre; the border fully transparent, holding `under`."""
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    border = np.ones(img.shape[:2], bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    rgba[border] = (*under, 0)
    return rgba


def on_white(img: np.ndarray) -> np.ndarray:
    """What preprocess stores for with_transparent_border(img, ...): the border white."""
    return with_transparent_border(img, (255, 255, 255))[..., :3].copy()


def probabilities(results) -> dict[str, np.ndarray]:
    """File name -> single-crop probabilities (K,) in the model's class order."""
    out = {}
    for result in results:
        top = dict(result.top)
        out[result.path.name] = np.array([top[name] for name in fabricate.CLASSES])
    return out


def test_predict_sees_each_file_as_evaluate_sees_the_stored_image(tmp_path, val_images, ckpt):
    files = []
    for i, img in enumerate(val_images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        Image.fromarray(with_transparent_border(img, RED), "RGBA").save(tmp_path / f"{i}-rgba.png")
        save_exif_jpeg(img, tmp_path / f"{i}-exif.jpg", orientation=6)
        save_exif_jpeg(img, tmp_path / f"{i}-no-tag.jpg", orientation=None)
        Image.fromarray(img).save(tmp_path / f"{i}-plain.jpg", quality=100, subsampling=0)
        files += [tmp_path / f"{i}{s}" for s in (".png", "-rgba.png", "-exif.jpg", "-no-tag.jpg")]
        files.append(tmp_path / f"{i}-plain.jpg")
    got = probabilities(predict(files, ckpt, top=4, crops=1, device="cpu"))
    trained = load_trained(ckpt, "cpu")

    def model(images: np.ndarray) -> np.ndarray:  # what evaluate computes on stored images
        return trained.predict(np.ascontiguousarray(images), 1).numpy()  # (N, K)

    lossless = model(val_images)
    rgba = model(np.stack([on_white(img) for img in val_images]))
    red = model(np.stack([with_transparent_border(img, RED)[..., :3] for img in val_images]))
    # The EXIF file holds the no-tag file's JPEG data: decoded, then turned back to the right.
    turned = np.stack([np.asarray(Image.open(tmp_path / f"{i}-no-tag.jpg").convert("RGB"))
                       for i in range(len(val_images))])  # fmt: skip
    upright = model(np.rot90(turned, k=-1, axes=(1, 2)))
    for i in range(len(val_images)):
        np.testing.assert_allclose(got[f"{i}.png"], lossless[i], atol=1e-5)
        np.testing.assert_allclose(got[f"{i}-rgba.png"], rgba[i], atol=1e-5)
        np.testing.assert_allclose(got[f"{i}-exif.jpg"], upright[i], atol=1e-5)
        # Rotation applied: as the same pixels saved upright, up to JPEG's rounding...
        np.testing.assert_allclose(got[f"{i}-exif.jpg"], got[f"{i}-plain.jpg"], atol=5e-3)
        # ...and not what the turned pixels give when the tag is ignored.
        assert np.abs(got[f"{i}-exif.jpg"] - got[f"{i}-no-tag.jpg"]).max() > 1e-2
        # The border matters to the model: the red it holds would have given other numbers.
        assert np.abs(rgba[i] - red[i]).max() > 1e-3


def test_read_image_turns_composites_and_resizes_like_the_stored_images(tmp_path):
    img = fabricate.images(1, 3)[0][0]  # (16, 16, 3): a bright bar in one row band
    save_exif_jpeg(img, tmp_path / "exif.jpg", orientation=6)
    save_exif_jpeg(img, tmp_path / "no-tag.jpg", orientation=None)
    upright = read_image(tmp_path / "exif.jpg", 16).astype(int)
    assert np.abs(upright - img).mean() < 6  # the picture as taken, up to JPEG noise
    assert np.abs(read_image(tmp_path / "no-tag.jpg", 16).astype(int) - img).mean() > 20

    Image.fromarray(with_transparent_border(img, RED), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png", 16), on_white(img))

    # 64x32 -> 32x16 (bicubic) -> the centre 16x16, as preprocess's folder images.
    wide = np.kron(img, np.ones((2, 4, 1), np.uint8))  # (32, 64, 3)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = Image.fromarray(wide).resize((32, 16), Image.BICUBIC, reducing_gap=3.0)
    expected = np.asarray(expected)[:, 8:24]
    assert np.array_equal(read_image(tmp_path / "wide.png", 16), expected)


def test_unreadable_files_are_one_line_naming_the_path_in_both_readers(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 10), "red").save(good)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # the header, half the pixel data
    (tmp_path / "folder.png").mkdir()
    bad = {
        tmp_path / "missing.png": "no such file",
        tmp_path / "folder.png": "is a directory, not an image",
        junk: "not an image file PIL can read",
        truncated: "",  # PIL's own words for the damage
    }
    reasons = {}
    for path, reason in bad.items():
        with pytest.raises(ImageFileError) as err:
            read_image(path, 8)
        message = str(err.value)
        assert message.startswith(f"{path}: {reason}") and "\n" not in message
        reasons[str(path)] = message.removeprefix(f"{path}: ")
    # preprocess's decoding of the same files reports them with the very same reasons.
    files = [good, *bad]
    [(_, _, failed)] = decode_blocks(files, 8, fit=True, workers=1)
    assert {str(files[i]): why for i, why in failed} == reasons  # good.png decoded


def test_preprocess_stores_exactly_what_read_image_returns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(imaging, "CHUNK", 4)  # the files go through the worker pool
    rng = np.random.default_rng(7)
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(("cats", "dogs")):
        folder = paths.RAW / paths.FOLDER / cls
        folder.mkdir(parents=True)

        def noise(h: int, w: int) -> np.ndarray:
            small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
            return np.kron(small, np.ones((4, 4, 1), np.uint8))[:h, :w]  # (h, w, 3) blocky

        Image.fromarray(noise(20, 30)).save(folder / "photo.png")
        rgba = with_transparent_border(noise(24, 24), RED)
        Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
        save_exif_jpeg(noise(24, 40), folder / "phone.jpg", orientation=6)
        # 320x200: libjpeg decodes at 1/4 scale (draft), then the bicubic resize.
        Image.fromarray(noise(200, 320)).save(folder / "large.jpg", quality=90)
        gif = Image.fromarray(noise(30, 20)).convert("P", palette=Image.ADAPTIVE, colors=32)
        gif.save(folder / "palette.gif", transparency=0)
        files += [(f, label) for f in sorted(folder.iterdir())]
    p = params_from(
        {
            "dataset": "folder",
            "preprocess": {"image_size": 16, "workers": 2, "val_fraction": 0.4},
            "train": {"crop_size": 12},
        }
    )
    preprocess(p)
    splits = ("train", "val")
    stored = np.concatenate([np.load(paths.PROCESSED / f"{s}_images.npy") for s in splits])
    labels = np.concatenate([np.load(paths.PROCESSED / f"{s}_labels.npy") for s in splits])
    assert len(stored) == len(files) == 10
    missing = [
        f"{path.parent.name}/{path.name}"
        for path, label in files
        if not any(
            lab == label and np.array_equal(image, read_image(path, 16))
            for image, lab in zip(stored, labels, strict=True)
        )
    ]
    assert not missing, f"preprocess stored other pixels than read_image for {missing}"


# Reads one file with the address space capped at 1 GiB (the reader imports no torch): a work
# bound that holds only for small files would show here as a MemoryError.
CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
import numpy as np
from stages.data.images import read_image
pixels = read_image(sys.argv[1], int(sys.argv[2]))
print(pixels.shape, np.unique(pixels.reshape(-1, 3), axis=0).tolist())
"""


@pytest.mark.parametrize("size", [(1, 600_000), (600_000, 1)])
def test_an_image_costs_what_it_becomes_not_what_its_shape_allows(tmp_path, size):
    """A 2.4 KB PNG of 1 x 600,000 pixels: resizing all of it to the model's size made a
    64 x 38,400,000 image on the way (12 GB); only its centre square is worked on now."""
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (200, 30, 30)).save(path, optimize=True)
    assert path.stat().st_size < 4000
    result = subprocess.run(
        [sys.executable, "-c", CAPPED, str(path), "64"], capture_output=True, text=True,
        timeout=120, env=dict(os.environ, PYTHONPATH=str(fabricate.REPO)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(64, 64, 3) [[200, 30, 30]]"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels (its pixel data, one zero byte)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_a_file_that_would_decode_past_the_bound_is_refused_before_decoding(tmp_path):
    """Past Pillow's limit (89 million pixels) but under twice it, where Pillow only warns: one
    line naming the file and the size, in both readers, nothing decoded."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(10_000, 9_000))
    with pytest.raises(ImageFileError) as err:
        read_image(path, 16)
    assert str(err.value) == (
        f"{path}: is 10,000 x 9,000 pixels, more than the {imaging.MAX_PIXELS:,} an image may"
        " decode to (Pillow's decompression-bomb limit); make it smaller"
    )
    [(_, _, failed)] = decode_blocks([path], 16, fit=True, workers=1)
    assert failed == [(0, str(err.value).removeprefix(f"{path}: "))]
