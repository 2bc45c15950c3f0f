"""Reading image files the way evaluation sees images: shared by `predict` and `submit`.

Any size and mode (grey, palette, RGBA, CMYK) becomes RGB, the short side is resized to the
dataset's image size and the centre square cropped, giving the (S, S, 3) uint8 array
preprocess would have stored; evaluation's centre crop / 10 crops then apply unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.errors import PipelineError
from stages.data.datasets import DATASETS


class ImageFileError(PipelineError):
    """A file that is missing or not a readable image."""


def read_image(path: Path, size: int) -> np.ndarray:
    """The image at `path` as a (size, size, 3) uint8 array (short side resized, centre crop)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            img = img.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).copy()  # (size, size, 3)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageFileError(f"{path}: not a readable image ({type(err).__name__})") from None


def stored_image_size(state: dict) -> int:
    """The side of the images the checkpoint's model was trained from (before cropping)."""
    # The model's mean image has the stored images' size (unless it is a per-channel mean).
    mean = state["model"].get("normalize.mean")
    if mean is not None and mean.dim() == 3 and mean.shape[-1] > 1:
        return int(mean.shape[-1])
    dataset = state.get("params", {}).get("dataset")
    spec = DATASETS.get(dataset) if dataset else None
    return spec.image_size if spec else int(state["image_size"])
