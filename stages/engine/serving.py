"""The MLflow model a training logs: image files in, the top-k class names with probabilities out.

`ImageClassifier` is an MLflow pyfunc whose one artifact is the checkpoint (model.pt). Each
image is decoded by the reader `convnet predict` uses (stages.data.images: `decode_image` for
bytes, `read_image` for a path) and classified by the same `Trained.predict` (centre crop or
10 crops), so the served answer is predict's. Input: a DataFrame column `image`:

- through `mlflow models serve`: base64 of the file's bytes in JSON (`dataframe_split`,
  `dataframe_records` or `inputs`); the server turns it into bytes for the `binary` column;
- in Python (`mlflow.pyfunc.load_model(...).predict(...)`): the bytes, or a path.

A string is a path only in Python: while serving it is base64, never a file name, so a client
cannot make the server open its files. Output: one row per image, `classes` (the top-k names,
most likely first) and `probabilities`. `top` and `crops` are params (defaults 5 and 10, as
predict's). An image that cannot be decoded fails the request with MLflow's
INVALID_PARAMETER_VALUE: HTTP 400, the message ending in one line naming the image, no traceback.

Memory: the scoring server runs requests in threads, and decoding is the one step whose memory
grows with what a client sends (4 to 12 bytes a decoded pixel, up to Pillow's limit of 89.5 M
pixels an image, whatever the file's size). A budget of decoded pixels in flight, one for the
process (`CONVNET_SERVE_PIXELS`, default one image at that limit), bounds it: an image decodes
once its pixels fit in what the other decodes leave, in turn; a request that waits half of
MLflow's request timeout for it is answered 503 (TEMPORARILY_UNAVAILABLE), and an image larger
than the whole budget 400 (images given as paths, in Python, are read outside it). A decoded
image's memory goes back to the system once it is freed (`_large_blocks_mapped`), and the
network runs one request's images at a time.

The served model needs this project installed (`--env-manager local`): the logged model's code
is stages/engine/pyfunc_code.py, which imports this module.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import ctypes
import functools
import io
import os
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from stages.data.images import (
    MAX_PIXELS,
    ImageFileError,
    decode_image,
    decoded_pixels,
    read_image,
)
from stages.engine.model import Trained, load_trained

COLUMN = "image"  # the input column
TOP, CROPS = 5, 10  # the defaults of `convnet predict --top --crops`
# Set by `mlflow models serve` (and `mlflow models predict`) in the process that runs the model;
# MLflow's own name for it (mlflow.environment_variables._MLFLOW_IS_IN_SERVING_ENVIRONMENT).
SERVING = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
# Decoded pixels in flight in the process; by default one image at Pillow's limit (MAX_PIXELS).
PIXELS = "CONVNET_SERVE_PIXELS"

SIGNATURE = ModelSignature(
    # binary: the scoring server base64-decodes the column's JSON strings into bytes.
    inputs=Schema([ColSpec("binary", COLUMN)]),
    outputs=Schema(
        [ColSpec(Array("string"), "classes"), ColSpec(Array("double"), "probabilities")]
    ),
    params=ParamSchema([ParamSpec("top", "long", TOP), ParamSpec("crops", "long", CROPS)]),
)


def _refuse(message: str) -> MlflowException:
    """A request the model cannot answer: HTTP 400 with `message`, no traceback."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _serving() -> bool:
    return os.environ.get(SERVING, "").lower() in ("true", "1")


class Busy(Exception):
    """No room in the budget of decoded pixels within the time a request may wait."""


class PixelBudget:
    """Decoded pixels in flight, shared by the threads that run requests. An image decodes once
    its pixels fit in what is left, in the order the images asked (first come, first served: a
    large image is not passed over by a stream of small ones)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = self.free = pixels
        self._line: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, deadline: float) -> Iterator[None]:
        """`pixels` of the budget, held while the block runs; waited for until `deadline` (a
        time.monotonic() time), then Busy."""
        turn = object()
        with self._changed:
            self._line.append(turn)
            fits = lambda: self._line[0] is turn and self.free >= pixels  # noqa: E731
            if not self._changed.wait_for(fits, max(0.0, deadline - time.monotonic())):
                self._line.remove(turn)
                self._changed.notify_all()  # the next in line may fit now
                raise Busy
            self._line.popleft()
            self.free -= pixels
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.free += pixels
                self._changed.notify_all()


@functools.cache
def _budget() -> PixelBudget:
    """The process's budget, from CONVNET_SERVE_PIXELS (read once)."""
    text = os.environ.get(PIXELS, "").strip()
    try:
        pixels = int(text) if text else MAX_PIXELS
    except ValueError:
        pixels = 0
    if pixels < 1:
        raise MlflowException(f"{PIXELS} must be a positive number of pixels, got {text!r}")
    return PixelBudget(pixels)


# glibc's mallopt parameter (malloc.h): allocations of at least this many bytes get pages of
# their own (mmap), handed back to the system when freed.
M_MMAP_THRESHOLD = -3


@functools.cache
def _large_blocks_mapped() -> None:
    """Decoded images' memory handed back to the system as soon as they are freed (once, in the
    server). glibc serves an allocation below its mmap threshold from the calling thread's
    arena and keeps it there once freed, and it raises that threshold (up to 32 MiB) as large
    blocks are freed: Pillow holds an image in blocks of up to 16 MiB, so each of the server's
    threads kept the images it had decoded (GBs, long after the requests). A fixed threshold
    of 4 MiB maps every block of a large image on its own (and stops the raising)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; absent elsewhere
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 4 << 20)


def _file_bytes(data: bytes) -> bytes:
    """An image file's bytes, from the file's bytes or from base64 of them on one line (the
    scoring server passes the `inputs` and `instances` formats' strings on undecoded, as
    bytes). An image file is never strict base64: binary formats hold bytes outside its
    alphabet, text ones (ASCII PNM) whitespace between their numbers."""
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return data


def _decode(data: bytes, size: int, deadline: float) -> np.ndarray:
    """decode_image(data, size), its pixels held in the process's budget while it decodes."""
    budget = _budget()
    pixels = decoded_pixels(data, size)  # from the header, nothing decoded yet
    if pixels > budget.pixels:
        raise ImageFileError(
            "", f"decodes to {pixels:,} pixels, more than the {budget.pixels:,} this server"
            f" decodes at once ({PIXELS}); make it smaller"
        )  # fmt: skip
    with budget.hold(pixels, deadline):
        return decode_image(data, size)


def _pixels(value: object, size: int, serving: bool, deadline: float) -> np.ndarray:
    """One input value -> (size, size, 3) uint8, read as `convnet predict` reads the file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(_file_bytes(bytes(value)), size, deadline)
    if isinstance(value, str) and serving:  # never a path: the client's own files are not here
        return _decode(_file_bytes(value.encode("ascii", "replace")), size, deadline)
    if isinstance(value, (str, Path)):
        return read_image(value, size)
    kind = type(value).__name__
    raise ImageFileError("", f"expected an image file's bytes or a path, got {kind}")


def _images(model_input: pd.DataFrame) -> list[object]:
    """The values of the `image` column (MLflow has made the input a DataFrame by the schema)."""
    if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input.columns:
        raise _refuse(f"the input must be a DataFrame with a column {COLUMN!r}")
    return list(model_input[COLUMN])


def _count(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _refuse(f"param {key!r} must be an integer, got {value!r}")
    return int(value)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Top-k class names and probabilities for image files, from a checkpoint (the artifact
    `checkpoint`), on the GPU if there is one."""

    trained: Trained

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        _budget()  # a bad CONVNET_SERVE_PIXELS stops the server before it listens
        self.trained = load_trained(Path(context.artifacts["checkpoint"]))
        # One request's images through the network at a time: torch already spreads one over
        # every core, and each holds the activations of a batch (256 images, 10 crops each).
        self.running = threading.Lock()

    # pd.DataFrame: a hint MLflow infers no signature from (SIGNATURE is the signature), so the
    # scoring server still parses the JSON by it (base64 -> bytes for the binary column).
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """One row per image: `classes` (top-k names) and `probabilities`, most likely first."""
        params = params or {}
        top, crops = _count(params, "top", TOP), _count(params, "crops", CROPS)
        if top < 1:
            raise _refuse(f"param 'top' must be a positive integer, got {top}")
        if crops not in (1, 10):
            raise _refuse(f"param 'crops' must be 1 or 10, got {crops}")
        trained, serving = self.trained, _serving()
        if serving:
            _large_blocks_mapped()
        # Waiting for room to decode ends before MLflow's own timeout (a 504 that leaves the
        # work running): the client hears why, in a 503.
        patience = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() / 2
        deadline = time.monotonic() + patience
        arrays = []
        for i, value in enumerate(_images(model_input)):
            try:
                arrays.append(_pixels(value, trained.stored_size, serving, deadline))
            except ImageFileError as err:
                name = err.path if isinstance(value, (str, Path)) and not serving else ""
                raise _refuse(f"image {i}{f' ({name})' if name else ''}: {err.reason}") from None
            except Busy:
                budget = _budget().pixels
                raise MlflowException(
                    f"image {i}: the server is busy decoding other images (at most {budget:,}"
                    f" pixels at once, {PIXELS}) and had no room for it within {patience:g} s;"
                    " retry later",
                    error_code=TEMPORARILY_UNAVAILABLE,
                ) from None
        if not arrays:
            return pd.DataFrame({"classes": [], "probabilities": []})
        with self.running:
            probs = trained.predict(np.stack(arrays), crops)  # (N, K), as `convnet predict`
        p, idx = probs.topk(min(top, len(trained.classes)), dim=1)  # (N, k) each
        names = [[trained.classes[j] for j in row] for row in idx.tolist()]
        return pd.DataFrame({"classes": names, "probabilities": p.double().tolist()})


def _example(state: dict[str, Any]) -> bytes:
    """A PNG of the stored size for the model's input example: the training set's mean image
    (a grey square when the checkpoint holds a per-channel mean only)."""
    size = int(state["stored_size"])
    mean = state["model"].get("normalize.mean")  # (3, H, W) in [0, 1]
    if mean is not None and mean.dim() == 3 and mean.shape[1:] == (size, size):
        pixels = (mean.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    else:
        img = Image.new("RGB", (size, size), (128, 128, 128))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def package(file: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `mlflow.models.Model.log` (flavor pyfunc) that log checkpoint `file`
    (holding `state`) as an `ImageClassifier`; the caller adds the name and the run."""
    classes, size = list(state["classes"]), int(state["stored_size"])
    metadata = {
        "classes": classes,
        "input": (
            f"column `{COLUMN}`: an image file's bytes (base64 in JSON; a path in Python), any"
            f" size and mode, read as `convnet predict` reads it (resized to {size} px, then the"
            f" centre crop or 10 crops of {state['image_size']} px)"
        ),
        "output": "per image: `classes` (the top-k names, most likely first), `probabilities`",
        "params": f"top (default {TOP}), crops: 1 or 10 (default {CROPS})",
        "requires": "the convnet-pipeline package: serve with --env-manager local",
    }
    # Named here, MLflow skips inferring them (a subprocess: ~10 s a run). The project itself
    # is not on PyPI, so it cannot be listed: the model is served where it is installed.
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={version('torchvision').split('+')[0]}",  # not imported: seconds
        f"pillow=={PIL.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]
    return {
        "flavor": mlflow.pyfunc,
        "python_model": str(Path(__file__).with_name("pyfunc_code.py")),
        "artifacts": {"checkpoint": str(file)},
        "signature": SIGNATURE,
        "input_example": pd.DataFrame({COLUMN: [_example(state)]}),
        "pip_requirements": requirements,
        "metadata": metadata,
    }
