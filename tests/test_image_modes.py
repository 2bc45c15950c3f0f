"""The image reader on files whose pixels convert("RGB") gets wrong or hides: 16-bit greyscale
(scans, medical images) is scaled to 8 bits, not clipped to white; an animated image gives its
first frame and says so once, not once per file. Both in preprocess's decoder and in `predict`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fabricate
from PIL import Image, features

from stages.data import images as imaging
from stages.data.images import decode_blocks, read_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # one per frame


def ramp16() -> np.ndarray:
    """(SIZE, SIZE) uint16 covering 0..65535, the ends and the rounding points included."""
    values = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16)
    values[:4] = [128, 129, 65406, 65535]  # 128/257 rounds to 0, 129/257 to 1, 65406 to 254
    return values.reshape(SIZE, SIZE)


def as_8_bit(wide: np.ndarray) -> np.ndarray:
    """What a 16-bit grey image must become: v * 255 / 65535 rounded, on all three channels."""
    grey = np.rint(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def save_animation(path: Path) -> None:
    frames = [Image.new("RGB", (SIZE, SIZE), c) for c in COLOURS]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.fixture
def first_frame_unsaid(monkeypatch):
    """A fresh process's state: the first-frame note not said yet."""
    monkeypatch.setattr(imaging._FirstFrame, "said", False)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    wide = ramp16()
    Image.fromarray(wide).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")  # 16-bit, as Pillow opens it
    expected = as_8_bit(wide)
    assert expected[0, :4, 0].tolist() == [0, 1, 254, 255]
    np.testing.assert_array_equal(read_image(tmp_path / "scan.png", SIZE), expected)  # predict
    [(_, images, _)] = decode_blocks([tmp_path / "scan.png"], SIZE, fit=True, workers=1)
    np.testing.assert_array_equal(images[0], expected)  # preprocess


def test_32_bit_integer_grey_holding_16_bit_values_is_scaled_too(tmp_path):
    wide = ramp16()
    Image.fromarray(wide.astype(np.int32), "I").save(tmp_path / "scan.tif")
    assert Image.open(tmp_path / "scan.tif").mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "scan.tif", SIZE), as_8_bit(wide))


def test_8_bit_grey_is_unchanged(tmp_path):
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    expected = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png", SIZE), expected)


def animation_formats() -> list[str]:
    # APNG: Pillow writes it with save_all; WebP where Pillow was built with libwebp.
    return ["gif", "png"] + (["webp"] if features.check("webp") else [])


@pytest.mark.parametrize("ext", animation_formats())
def test_an_animation_gives_its_first_frame(tmp_path, capsys, first_frame_unsaid, ext):
    save_animation(tmp_path / f"a.{ext}")
    assert Image.open(tmp_path / f"a.{ext}").n_frames == 3
    pixels = read_image(tmp_path / f"a.{ext}", SIZE)
    assert np.abs(pixels.astype(int) - COLOURS[0]).max() <= 8  # lossy WebP: close to frame 0
    assert "holds 3 frames" in capsys.readouterr().err


def test_the_first_frame_is_said_once_per_run_not_per_file(tmp_path, capsys, first_frame_unsaid):
    for i in range(3):
        save_animation(tmp_path / f"{i}.gif")
    [(_, images, bad)] = decode_blocks(sorted(tmp_path.glob("*.gif")), SIZE, fit=True, workers=1)
    assert len(images) == 3 and not bad
    said = [line for line in capsys.readouterr().err.splitlines() if "frames" in line]
    assert len(said) == 1 and said[0].startswith(str(tmp_path / "0.gif"))


def test_predict_scales_16_bit_and_says_first_frame_once(tmp_path):
    """The command as a user runs it: exit 0, one note for two animations, right pixels."""
    fabricate.save_checkpoint(tmp_path / "model.pt", fabricate.model())
    Image.fromarray(ramp16()).save(tmp_path / "scan.png")
    save_animation(tmp_path / "a.gif")
    save_animation(tmp_path / "b.gif")
    result = subprocess.run(
        [sys.executable, "-m", "stages", "predict", "scan.png", "a.gif", "b.gif",
         "--checkpoint", "model.pt", "--crops", "1"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [line.count("frames") for line in result.stderr.splitlines()] == [1]
    assert all(f"{name}:" in result.stdout for name in ("scan.png", "a.gif", "b.gif"))
