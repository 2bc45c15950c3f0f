"""The `export` command: a trained model as a file that runs without this project.

Formats: `onnx` (model.onnx, for onnxruntime and any ONNX runtime, in any language) and
`exported-program` (model.pt2, a torch.export program: `torch.export.load(...).module()`, torch
only). Either file holds everything `convnet predict` does after reading the image:

    uint8 images (batch, S, S, 3), RGB, S = the stored size (the checkpoint's `stored_size`)
    -> the centre crop or the 10 crops (`--crops`), as float in [0, 1]
    -> the training set's mean image subtracted and the std divided (the model's InputNorm)
    -> the network -> softmax (averaged over the 10 crops)
    -> float32 probabilities (batch, K), the classes in the order of classes.json

The batch dimension is dynamic. What stays outside is reading the file: decoding, EXIF
rotation, the short side resized to S (bicubic) and the centre S x S square cut
(stages.data.images.read_image). The files are fp32 whatever precision the training used; a
model trained in bf16 or fp16 therefore differs from `predict` on a GPU by that precision.

Every file is built in memory first and written atomically: an error leaves no file, and a
failure in the second format leaves the first format's file complete.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from stages.core.errors import PipelineError
from stages.core.files import atomic_path, write_json
from stages.engine.inference import Probabilities
from stages.engine.model import load_trained

FILES = {"onnx": "model.onnx", "exported-program": "model.pt2"}
INPUT, OUTPUT = "images", "probabilities"  # the graph's input and output names


class ExportError(PipelineError):
    """A format, an option or an output folder that cannot be used."""


def _formats(formats: list[str], crops: int) -> list[str]:
    """The formats to write, in a fixed order, once they and `crops` are checked."""
    unknown = [f for f in formats if f not in FILES]
    if unknown or not formats:
        raise ExportError(
            f"--format {unknown[0] if unknown else '(none)'}: must be one of {', '.join(FILES)}"
        )
    if crops not in (1, 10):
        raise ExportError(f"--crops must be 1 or 10, got {crops}")
    if "onnx" in formats:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(
                f"--format onnx needs the package(s) {', '.join(missing)} (torch's ONNX"
                " exporter): pip install onnx onnxscript, or pip install -e '.[export]'"
            )
    return [f for f in FILES if f in formats]


def _folder(out: Path) -> None:
    """Make `out` (a folder the files go into), or one line why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: not writable")


def _program(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`module` traced by torch.export, the batch dimension dynamic."""
    batch = Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={INPUT: {0: batch}})


def _pt2(program: torch.export.ExportedProgram, extra: dict[str, str]) -> bytes:
    """The program's .pt2 bytes; `extra` travels as extra files
    (`torch.export.load(path, extra_files={"classes.json": ""})` fills them in)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    return buffer.getvalue()


def _onnx(program: torch.export.ExportedProgram, metadata: dict[str, str]) -> bytes:
    """The program as ONNX bytes (torch's dynamo exporter); `metadata` goes into its
    metadata_props (onnxruntime: `get_modelmeta().custom_metadata_map`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            verbose=False,
            dynamic_shapes={INPUT: {0: "batch"}},  # a name: the exporter renames the axis
        )
    onnx_program.model.metadata_props.update(metadata)
    return onnx_program.model_proto.SerializeToString()


def export(
    checkpoint_path: Path, out: Path, formats: list[str], crops: int = 10
) -> dict[str, Path]:
    """Write the checkpoint's model in each of `formats` into `out`, with classes.json; prints
    one line per file and returns {format: path}."""
    out = Path(out)
    formats = _formats(formats, crops)
    if out.exists() and not out.is_dir():  # before the work; _folder makes it after
        raise ExportError(f"--out {out}: is a file; give a folder (the files go inside)")
    trained = load_trained(checkpoint_path, "cpu")
    model = trained.model.float().to(memory_format=torch.contiguous_format).eval()
    module = Probabilities(model, trained.crop_size, crops, trained.mirrored).eval()
    size, classes = trained.stored_size, trained.classes
    # A batch of 2: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # (B, S, S, 3)
    metadata = {
        "classes": json.dumps(classes),
        "input": f"uint8 ({INPUT}: batch, {size}, {size}, 3), RGB, read as convnet predict",
        "output": f"float32 ({OUTPUT}: batch, {len(classes)}), in the order of classes",
        "crops": str(crops),
        "net": trained.state["net"],
    }
    extra = {"classes.json": json.dumps(classes), "convnet.json": json.dumps(metadata)}
    built: dict[str, bytes] = {}
    fmt = formats[0]
    try:
        program = _program(module, example)
        for fmt in formats:
            built[fmt] = _onnx(program, metadata) if fmt == "onnx" else _pt2(program, extra)
    except Exception as err:  # noqa: BLE001 - a net the exporter cannot trace: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(
            f"{checkpoint_path}: {trained.state['net']} cannot be exported as {fmt} ({first})"
        ) from None
    _folder(out)  # made only now: a bad checkpoint or a failed export leaves no folder
    written = {}
    for fmt in formats:
        path = out / FILES[fmt]
        with atomic_path(path, need=len(built[fmt])) as tmp:
            tmp.write_bytes(built[fmt])
        written[fmt] = path
        print(f"export: {path} ({len(built[fmt]) / 2**20:.1f} MiB)")
    write_json(out / "classes.json", classes)
    print(
        f"export: {out / 'classes.json'} ({len(classes)} classes); input uint8 (batch, {size},"
        f" {size}, 3) RGB, output probabilities (batch, {len(classes)}), {crops} crop(s)"
    )
    return written
