"""The `submit` command: Tiny ImageNet challenge predictions for the unlabeled test images.

The format is the challenge's: one line per test image, `<file name> <predicted wnid>`, sorted
by file name. The model's classes are readable words; the wnids come from the checkpoint's
`wnids` entry or out/processed/info.json's `wnids`, else the class names are used as they are
(they are wnids when preprocess kept them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import atomic_path, output_file
from stages.data.images import read_image
from stages.engine.model import load_trained

EXTENSIONS = {".jpeg", ".jpg", ".png"}


def class_ids(state: dict) -> list[str]:
    """The dataset's class identifiers (wnids for Tiny ImageNet), in the model's class order."""
    if state.get("wnids"):
        return list(state["wnids"])
    info = paths.PROCESSED / "info.json"
    if info.exists():
        wnids = json.loads(info.read_text()).get("wnids")
        if wnids and len(wnids) == state["num_classes"]:
            return list(wnids)
    return list(state["classes"])


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
    files = sorted(f for f in images.iterdir() if f.suffix.lower() in EXTENSIONS)
    if not files:
        raise PipelineError(f"{images}: no .JPEG/.jpg/.png images")
    trained = load_trained(checkpoint_path, device)
    ids = class_ids(trained.state)
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
