"""`convnet export`: ONNX and torch.export files that give `convnet predict`'s probabilities,
for every registered net; bad options and paths end in one line and leave nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fabricate
from helpers.fabricate import make_processed, write_params
from helpers.processes import with_store
from PIL import Image
from typer.testing import CliRunner

import nets
from stages import params
from stages import train as train_module
from stages.cli import app
from stages.commands.export import export
from stages.commands.predict import predict
from stages.core import checkpoint
from stages.core.runlog import RunLog
from stages.engine.model import load_trained

ort = pytest.importorskip("onnxruntime")  # a dev dependency: pip install -e ".[dev]"
STORED, CROP, CLASSES = 36, 32, ["ant", "bee", "cat"]


def spread(model: torch.nn.Module) -> None:
    """Make a fresh net answer like a trained one: batch norm with statistics and scales of its
    own (fresh: 0, 1, and a ResNet block's last scale 0), and the head rescaled so the logits
    of random images spread over about +-2. A fresh net gives nearly the same probabilities
    for every image, or 1.0 for one class: a crop, mean or std handled wrongly would not show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.8, 1.2)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
        model.eval()
        logits = model(torch.rand(8, 3, CROP, CROP))  # (8, K)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = 2 / logits.std().clamp_min(1e-6)
        head.weight.mul_(scale)
        head.bias.sub_(logits.mean(0)).mul_(scale)


def save_net(path: Path, name: str) -> None:
    """A model.pt of net `name` (random weights, 3 classes, 32 px crops of 36 px images) with a
    mean image and std, as training writes it."""
    torch.manual_seed(0)
    mean = torch.rand(3, STORED, STORED) * 0.5  # (3, S, S): InputNorm cuts its centre crop
    model = nets.build(name, len(CLASSES), CROP, mean=mean, std=torch.tensor([0.2, 0.25, 0.3]))
    spread(model)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    state = checkpoint.Inference(
        net=name, net_options={}, num_classes=len(CLASSES), image_size=CROP, stored_size=STORED,
        classes=CLASSES, precision="fp32",
        memory_format="channels_last" if conv else "contiguous", model=model.state_dict(),
        params=fabricate.p().to_dict(), metrics={}, epoch=1, mlflow_run_id=None, data={},
    )  # fmt: skip
    checkpoint.save(path, state.to_dict())


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def run_program(path: Path, images: np.ndarray) -> np.ndarray:
    program = torch.export.load(path)
    with torch.inference_mode():
        return program.module()(torch.from_numpy(images)).numpy()


# Tracing a ResNet takes 20-50 s on 2 cores: those run in the full suite, not the fast loop.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n for n in nets.names()]
)
def test_every_net_exports_with_predicts_probabilities(name, tmp_path, capsys):
    """Both files, 10 crops, batches of 3 and 1 (the export traced 2: the batch is dynamic)."""
    save_net(tmp_path / "model.pt", name)
    written = export(tmp_path / "model.pt", tmp_path / "export", ["onnx", "exported-program"])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "classes.json", "model.onnx", "model.pt2",
    ]  # fmt: skip
    assert json.loads((tmp_path / "export/classes.json").read_text()) == CLASSES
    assert "input uint8 (batch, 36, 36, 3)" in capsys.readouterr().out
    images = np.random.default_rng(0).integers(0, 256, (3, STORED, STORED, 3), dtype=np.uint8)
    expected = load_trained(tmp_path / "model.pt", "cpu").predict(images, crops=10).numpy()
    for batch in (images, images[:1]):
        np.testing.assert_allclose(run_onnx(written["onnx"], batch), expected[: len(batch)],
                                   atol=1e-4, rtol=0)  # fmt: skip
        got = run_program(written["exported-program"], batch)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)


def test_a_trained_checkpoint_through_the_command_answers_as_predict(tmp_path, monkeypatch):
    """`convnet export --crops 1` on a training's model.pt: image files read the way predict
    reads them give predict's probabilities, named by classes.json."""
    make_processed(tmp_path)
    write_params(tmp_path, epochs=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setattr(RunLog, "model", lambda *args: None)  # not needed here
    train_module.train(params.load("params.yaml"))
    result = CliRunner().invoke(app, ["export", "--crops", "1"])  # defaults: model.pt, both
    assert result.exit_code == 0, result.output
    out = tmp_path / "out/export"
    assert f"export: {Path('out/export/model.onnx')}" in result.output

    rng = np.random.default_rng(2)
    files = []
    for i, shape in enumerate([(16, 16, 3), (40, 24, 3), (9, 30)]):  # any size and mode
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(files[-1])
    classes = json.loads((out / "classes.json").read_text())
    wanted = predict(files, Path("out/train/model.pt"), top=len(classes), crops=1, device="cpu")
    from stages.data.images import read_image  # what a client does before the model

    stored = load_trained(Path("out/train/model.pt"), "cpu").stored_size
    images = np.stack([read_image(f, stored) for f in files])  # (3, S, S, 3) uint8
    for got in (run_onnx(out / "model.onnx", images), run_program(out / "model.pt2", images)):
        for row, prediction in zip(got, wanted, strict=True):
            named = {classes[k]: float(p) for k, p in enumerate(row)}
            for name, p in prediction.top:
                assert named[name] == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format tflite: must be one of onnx, exported-program"),
        (["--crops", "5"], "--crops must be 1 or 10, got 5"),
        (["--checkpoint", "missing.pt"], "missing.pt: no checkpoint"),
        (["--out", "a-file"], "--out a-file: is a file; give a folder"),
        (["--out", "a-file/sub"], "--out a-file/sub: cannot create it (Not a directory)"),
    ],
)
def test_bad_options_and_paths_are_one_line_and_leave_nothing(tmp_path, monkeypatch, args,
                                                              message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    save_net(tmp_path / "model.pt", "logreg")
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["export", "--checkpoint", "model.pt", *args])
    assert result.exit_code == 1
    [line] = result.output.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and message in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no file, no out/export
