"""scikit-learn's 1,797 handwritten 8x8 digits, made MNIST-like: embedded, no network."""

from __future__ import annotations

import gzip
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.data.sources.base import Source, pad_and_stack, val_split

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import DownloadParams, Params

FILE = "digits.csv.gz"


def make_raw(dest: Path, _: DownloadParams) -> None:
    # The very file sklearn.datasets.load_digits parses: 1,797 rows of 64 pixels (0-16) + label.
    # Found without importing sklearn.datasets, which takes a second.
    shutil.copyfile(Path(find_spec("sklearn").origin).parent / "datasets/data" / FILE, dest / FILE)


def read(raw: Path, p: Params, out: ProcessedWriter) -> list[str]:
    import torch
    import torch.nn.functional as F

    with gzip.open(raw / FILE, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (1797, 65)
    pixels = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) * (255.0 / 16.0))
    # 8x8 -> 28x28 like MNIST's digit box, in one batched call.
    big = F.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False)
    grey = big.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()  # (N, 28, 28)
    images, labels = pad_and_stack(grey), table[:, 64].astype(np.int64)
    train, val = val_split(labels, p)
    out.array("train", images[train], labels[train])
    out.array("val", images[val], labels[val])
    return [str(d) for d in range(10)]


SOURCE = Source(
    name="digits",
    description="scikit-learn's 1,797 handwritten 8x8 digits, MNIST-style 32x32x3",
    image_size=32,
    read=read,
    make_raw=make_raw,
)
