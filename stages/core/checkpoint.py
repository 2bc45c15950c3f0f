"""Self-describing checkpoints: plain dicts of primitives and state dicts, written atomically.

One loader serves evaluate, report, predict and resume. Files load with
`torch.load(weights_only=True)`, so a checkpoint can never run code when it is opened.

What the files hold is defined here once:
  model.pt            `Inference`: exactly INFERENCE_KEYS, what running the model needs
  last.pt, best.pt    INFERENCE_KEYS + RESUME_KEYS (stages.engine.state.RunState.state_dict()),
                      so a run resumes from them and predict/evaluate can use them as they are
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import PipelineError
from stages.core.files import atomic_path

FORMAT = "convnet-pipeline/checkpoint/1"


class CheckpointError(PipelineError):
    """A checkpoint file that is missing, unreadable or not one of this project's."""


@dataclass(frozen=True)
class Inference:
    """What a trained model's checkpoint holds for inference (all of model.pt).

    stages.engine.model.load_trained rebuilds and runs the network from the first nine; evaluate
    and report log to `mlflow_run_id`; the rest says what the weights came from.
    """

    net: str  # the nets registry's name (params.yaml's `model`)
    net_options: dict[str, Any]  # the `net` options the network was built with
    num_classes: int
    image_size: int  # the side of the crops the network takes (train.crop_size)
    stored_size: int  # the side of the processed images the crops are cut from
    classes: list[str]  # class names, in output order
    precision: str  # fp32 | bf16 | fp16: inference runs in the training's precision
    memory_format: str  # channels_last | contiguous
    model: dict[str, torch.Tensor]  # the weights (the EMA's when train.ema_decay is on)
    params: dict[str, Any]  # the whole params.yaml of the training
    metrics: dict[str, float]  # the last epoch's row of history.csv
    epoch: int  # the last finished epoch
    mlflow_run_id: str | None  # the training's MLflow run
    data: dict[str, Any]  # out/processed/info.json of the data it was trained on

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


INFERENCE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Inference))
# What last.pt and best.pt hold besides INFERENCE_KEYS: the run's state, for resume.
RESUME_KEYS: tuple[str, ...] = (
    "raw_model", "optimizer", "schedule", "scaler", "ema", "rng", "history", "best",
    "since_best", "mlflow_run_id", "world", "complete",
)  # fmt: skip


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (at least INFERENCE_KEYS) atomically to `path`."""
    missing = [key for key in INFERENCE_KEYS if key not in state]
    if missing:  # a bug, not a user's error: a checkpoint that could not be loaded again
        raise ValueError(f"checkpoint for {path} lacks {', '.join(missing)}")
    # Serialised in memory first: its size is known before a byte reaches the disk, and a
    # full disk is then an OSError that names the path (torch.save writing straight to the
    # file reports it as an opaque RuntimeError from its zip writer).
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getbuffer()
    with atomic_path(path, need=len(data)) as tmp:
        tmp.write_bytes(data)


def load(
    path: Path,
    map_location: str | torch.device = "cpu",
    require: Iterable[str] = INFERENCE_KEYS,
) -> dict[str, Any]:
    """Read a checkpoint written by `save` holding every key in `require`.

    Anything else (no file, not a torch file, another format, a missing key) raises
    CheckpointError, one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint; run `dvc repro train` first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the bytes make torch.load raise
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and named:
            # weights_only=True refused to import a Python object, which is how a pickle runs
            # code. torch's message then suggests weights_only=False: for a downloaded file that
            # advice runs whatever the file carries, so it is not repeated.
            raise CheckpointError(
                f"{path}: refused: the file asks to run code when opened ({named[1]}), which no"
                " checkpoint of this project does; do not open it with pickle or"
                " torch.load(weights_only=False)"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint of this project ({first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (format != {FORMAT})")
    missing = [key for key in require if key not in state]
    if missing:
        keys = "key" if len(missing) == 1 else "keys"
        raise CheckpointError(
            f"{path}: incomplete checkpoint, missing {keys} {', '.join(map(repr, missing))}"
        )
    return state
