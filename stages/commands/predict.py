"""The `predict` command: top-k classes of arbitrary image files, from a checkpoint alone.

Files are read exactly as preprocess reads a `folder` dataset (stages.data.images.read_image:
EXIF rotation, transparency on white, the same resize to the stored size), so the model sees
the pixels it would have been trained on; they are classified with the centre crop or the 10
crops. A file that is not an image is reported on stderr and skipped; the others are still
classified (on stdout), and the command then exits non-zero. A file name holding a newline,
another control character or bytes that are not text is printed quoted, with escapes, so each
result stays one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import atomic_path, output_file
from stages.data.augment import center_crop
from stages.data.images import ImageFileError, read_image
from stages.engine.model import load_trained
from stages.explain.pictures import plot_predictions
from stages.explain.saliency import saliency


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


class SomeFilesFailed(PipelineError):
    """Raised after all readable images were classified, when some files were not images."""


def _shown(path: Path | str) -> str:
    """`path` as one line of output: as it is, or quoted with escapes when it is not printable."""
    name = str(path)
    return name if name.isprintable() else repr(name)


def predict(
    images: list[Path],
    checkpoint_path: Path = paths.CHECKPOINT,
    top: int = 5,
    crops: int = 10,
    saliency_out: Path | None = None,
    device: str = "auto",
) -> list[Prediction]:
    """Classify each file in `images`; prints one block per image and returns the results."""
    if crops not in (1, 10):
        raise PipelineError(f"--crops must be 1 or 10, got {crops}")
    if top < 1:
        raise PipelineError(f"--top must be a positive integer, got {top}")
    if saliency_out is not None:
        saliency_out = output_file(saliency_out, "--saliency")
    trained = load_trained(checkpoint_path, device)
    classes, size, stored = trained.classes, trained.crop_size, trained.stored_size

    arrays, ok, failures = [], [], []
    for path in images:
        try:
            arrays.append(read_image(path, stored))
            ok.append(Path(path))
        except ImageFileError as err:
            failures.append(str(err))
            print(f"{_shown(path)}: {err.reason}", file=sys.stderr, flush=True)
    results: list[Prediction] = []
    if ok:
        batch = torch.from_numpy(np.stack(arrays))  # (N, S0, S0, 3) uint8
        probs = trained.predict(batch, crops)  # (N, K)
        k = min(top, len(classes))
        for path, row in zip(ok, probs, strict=True):
            p, idx = row.topk(k)
            result = Prediction(
                path, [(classes[j], float(q)) for q, j in zip(p, idx.tolist(), strict=True)]
            )
            results.append(result)
            print(f"{_shown(path)}:")
            for name, q in result.top:
                print(f"  {q:7.2%}  {_shown(name)}")  # class names are folder names
        if saliency_out is not None:
            x = center_crop(batch, size).to(trained.speed.device)  # (N, 3, S, S)
            maps = saliency(trained.model, x).cpu()  # (N, S, S), SmoothGrad
            titles = [_shown(path.name)[:28] for path in ok]
            with atomic_path(Path(saliency_out)) as tmp:
                plot_predictions(x.cpu(), maps, probs, classes, tmp, titles=titles, top=k)
            print(f"saliency: {_shown(saliency_out)}")
    if failures:
        raise SomeFilesFailed(f"{len(failures)} of {len(images)} files could not be read")
    return results
