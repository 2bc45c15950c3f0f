"""`convnet predict` on real image files: colour PNG, grayscale JPEG, and a file that is not one."""

import re

import numpy as np
import pytest
from helpers import fabricate
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.data.images import ImageFileError, read_image


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    fabricate.save_checkpoint(path, fabricate.model())
    return path


def test_read_image_resizes_short_side_and_centre_crops(tmp_path):
    img = np.zeros((40, 80, 4), np.uint8)  # RGBA, twice as wide as high
    img[:, 20:60, 0] = 255  # a red centre square
    img[..., 3] = 255
    Image.fromarray(img, "RGBA").save(tmp_path / "wide.png")
    out = read_image(tmp_path / "wide.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, 1:-1, 0] > 200).all()  # the centre square fills the crop
    with pytest.raises(ImageFileError, match="no such file"):
        read_image(tmp_path / "missing.png", 16)


def test_predict_png_grey_jpeg_and_a_non_image(tmp_path, ckpt):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    out_png = tmp_path / "saliency.png"
    args = ["predict", str(tmp_path / "a.png"), str(tmp_path / "notes.txt"),
            str(tmp_path / "b.jpg"), "--checkpoint", str(ckpt), "--top", "3",
            "--saliency", str(out_png), "--crops", "10"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{tmp_path / 'notes.txt'}: not an image file PIL can read" in result.output
    assert "1 of 3 files could not be read" in result.output
    for name in ("a.png", "b.jpg"):  # both images still classified, 3 classes each
        block = result.output.split(f"{tmp_path / name}:\n")[1].splitlines()[:3]
        assert all(re.fullmatch(r"\s+\d+\.\d\d%\s+(zero|one|two|three)", line) for line in block)
        probs = [float(line.split("%")[0]) for line in block]
        assert probs == sorted(probs, reverse=True)
    assert Image.open(out_png).format == "PNG"
    assert not list(tmp_path.glob(".saliency.png*"))  # no temporary file left


def test_predict_matches_the_model_on_a_stored_size_image(tmp_path, ckpt):
    from stages.commands.predict import predict
    from stages.engine.model import load_trained

    x, _ = fabricate.images(1, 3)  # (1, 16, 16, 3): already the stored size, nothing resized
    Image.fromarray(x[0]).save(tmp_path / "x.png")
    [result] = predict([tmp_path / "x.png"], ckpt, top=4, crops=1, device="cpu")
    expected = load_trained(ckpt, "cpu").predict(x, 1)[0]  # (K,)
    got = dict(result.top)
    for k, name in enumerate(fabricate.CLASSES):
        assert got[name] == pytest.approx(float(expected[k]), abs=1e-6)


def test_predict_without_checkpoint_is_one_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "none.pt")]
    )
    assert result.exit_code == 1
    assert "no checkpoint" in result.output and "Traceback" not in result.output
