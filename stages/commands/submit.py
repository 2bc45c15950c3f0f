"""The `submit` command: Tiny ImageNet challenge predictions for the unlabeled test images.

The format is the challenge's: one line per test image, `<file name> <predicted wnid>`, sorted
by file name. The model's classes are readable words; the wnids are those the checkpoint
carries (the ones preprocess recorded for the data it learned from), else its class names when
they are wnids already. They never come from out/processed, which may hold other data than
the checkpoint learned from: its words, or another set's wnids, would be written in silence.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import paths
from stages.core.checkpoint import CheckpointError
from stages.core.errors import PipelineError
from stages.core.files import atomic_path, is_hidden, output_file
from stages.data.images import read_image
from stages.engine.model import load_trained

EXTENSIONS = {".jpeg", ".jpg", ".png"}
WNID = re.compile(r"n\d{8}")  # a WordNet id, as the challenge names classes


def class_ids(state: dict, checkpoint: Path | str = paths.CHECKPOINT) -> list[str]:
    """The dataset's class identifiers (wnids) in the model's class order, from the checkpoint
    alone; CheckpointError when it carries none."""
    carried = state.get("wnids") or (state.get("data") or {}).get("wnids")
    if carried:
        if len(carried) != state["num_classes"] or not all(isinstance(w, str) for w in carried):
            raise CheckpointError(
                f"{checkpoint}: carries {len(carried)} wnids for {state['num_classes']} classes;"
                " not a checkpoint this version of the project wrote"
            )
        return list(carried)
    names = list(state["classes"])
    if all(WNID.fullmatch(name) for name in names):
        return names
    raise CheckpointError(
        f"{checkpoint}: carries no wnids and its classes are not wnids ({names[0]!r}, ...):"
        " a submission needs a model trained on Tiny ImageNet (dataset=tiny-imagenet)"
    )


def submit(
    images: Path,
    checkpoint_path: Path = paths.CHECKPOINT,
    out: Path = Path("out/submission.txt"),
    crops: int = 10,
    device: str = "auto",
    chunk: int = 1024,
) -> int:
    """Classify every image in the folder `images`; write the submission file; return its lines."""
    if crops not in (1, 10):
        raise PipelineError(f"--crops must be 1 or 10, got {crops}")
    out = output_file(out, "--out")
    images = Path(images)
    if not images.is_dir():
        raise PipelineError(f"{images}: no such folder of test images")
    files = sorted(
        f for f in images.iterdir() if f.suffix.lower() in EXTENSIONS and not is_hidden(f.name)
    )  # not macOS's ._test_1.JPEG
    if not files:
        raise PipelineError(f"{images}: no .JPEG/.jpg/.png images")
    trained = load_trained(checkpoint_path, device)
    ids = class_ids(trained.state, checkpoint_path)
    lines = []
    # Decoded in chunks: 10,000 test images never sit in memory as PIL objects at once.
    starts = range(0, len(files), chunk)
    for start in tqdm(starts, desc="submit", unit="chunk", disable=not sys.stderr.isatty()):
        part = files[start : start + chunk]
        batch = torch.from_numpy(np.stack([read_image(f, trained.stored_size) for f in part]))
        pred = trained.predict(batch, crops).argmax(1)  # (n,)
        lines += [f"{f.name} {ids[k]}" for f, k in zip(part, pred.tolist(), strict=True)]
    with atomic_path(Path(out)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"submit: {len(lines)} predictions in {out}")
    return len(lines)
