"""Self-describing checkpoints: plain dicts of primitives and state dicts, written atomically.

One loader serves evaluate, report, predict and resume. Files load with
`torch.load(weights_only=True)`, so a checkpoint can never run code when it is opened.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import PipelineError
from stages.core.files import atomic_path

FORMAT = "convnet-pipeline/checkpoint/1"


class CheckpointError(PipelineError):
    """A checkpoint file that is missing, unreadable or not one of this project's."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (must contain the keys `build_model` needs) atomically to `path`."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`; anything else raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint; run `dvc repro train` first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint of this project ({first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (format != {FORMAT})")
    return state
