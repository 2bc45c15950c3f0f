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

The served model needs this project installed (`--env-manager local`): the logged model's code
is stages/engine/pyfunc_code.py, which imports this module.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from stages.data.images import ImageFileError, decode_image, read_image
from stages.engine.model import Trained, load_trained

COLUMN = "image"  # the input column
TOP, CROPS = 5, 10  # the defaults of `convnet predict --top --crops`
# Set by `mlflow models serve` (and `mlflow models predict`) in the process that runs the model;
# MLflow's own name for it (mlflow.environment_variables._MLFLOW_IS_IN_SERVING_ENVIRONMENT).
SERVING = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"

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


def _file_bytes(data: bytes) -> bytes:
    """An image file's bytes, from the file's bytes or from base64 of them on one line (the
    scoring server passes the `inputs` and `instances` formats' strings on undecoded, as
    bytes). An image file is never strict base64: binary formats hold bytes outside its
    alphabet, text ones (ASCII PNM) whitespace between their numbers."""
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return data


def _pixels(value: object, size: int, serving: bool) -> np.ndarray:
    """One input value -> (size, size, 3) uint8, read as `convnet predict` reads the file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(_file_bytes(bytes(value)), size)
    if isinstance(value, str) and serving:  # never a path: the client's own files are not here
        return decode_image(_file_bytes(value.encode("ascii", "replace")), size)
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
        self.trained = load_trained(Path(context.artifacts["checkpoint"]))

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
        arrays = []
        for i, value in enumerate(_images(model_input)):
            try:
                arrays.append(_pixels(value, trained.stored_size, serving))
            except ImageFileError as err:
                name = err.path if isinstance(value, (str, Path)) and not serving else ""
                raise _refuse(f"image {i}{f' ({name})' if name else ''}: {err.reason}") from None
        if not arrays:
            return pd.DataFrame({"classes": [], "probabilities": []})
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
        f"torchvision=={torchvision.__version__.split('+')[0]}",
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
