"""What training's checkpoints hold: model.pt for inference, last.pt/best.pt for resume too."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fabricate import CLASSES, make_processed, train_settings, write_params
from helpers.processes import with_store
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typer.testing import CliRunner

from stages import params
from stages import train as train_module
from stages.cli import app
from stages.core import checkpoint
from stages.core.checkpoint import INFERENCE_KEYS, RESUME_KEYS, CheckpointError
from stages.core.runlog import RunLog
from stages.data.stream import Resident
from stages.engine.device import Speed
from stages.engine.distributed import Dist
from stages.engine.loop import TrainingError, run_epoch
from stages.engine.losses import make_loss
from stages.engine.model import load_trained
from stages.engine.schedules import Schedule
from stages.engine.state import RunState
from stages.params import TrainParams

METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """Tiny processed data and a params.yaml in the working directory, a private MLflow store;
    the slow MLflow model export is skipped."""
    make_processed(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setattr(RunLog, "model", lambda *args: None)
    return tmp_path


def rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_model_pt_holds_exactly_the_inference_keys_and_loads_for_inference(run_dir):
    write_params(run_dir, epochs=2, ema_decay=0.9)
    train_module.train(params.load("params.yaml"))

    model = checkpoint.load(Path("out/train/model.pt"))
    assert set(model) == {"format", *INFERENCE_KEYS}
    assert not {"optimizer", "rng", "raw_model", "history", "ema"} & set(model)
    last = checkpoint.load(Path("out/train/last.pt"))
    assert set(last) == {"format", *INFERENCE_KEYS, *RESUME_KEYS}
    # model.pt's weights are the EMA's, not the raw model's.
    torch.testing.assert_close(model["model"], last["model"])
    ema_weights = {
        k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"
    }
    torch.testing.assert_close(model["model"], ema_weights)
    assert any(not torch.equal(v, last["raw_model"][k]) for k, v in model["model"].items())
    assert model["epoch"] == 2 and model["metrics"] == last["history"][-1]
    assert model["data"]["train_count"] == 96 and model["params"]["train"]["epochs"] == 2

    images = np.load("out/processed/val_images.npy")
    for name in ("model.pt", "best.pt"):  # best.pt serves predict/evaluate as it is
        trained = load_trained(Path("out/train") / name, "cpu")
        probs = trained.predict(images, crops=1)
        assert probs.shape == (40, 4)
        torch.testing.assert_close(probs.sum(1), torch.ones(40))
    assert trained.classes == CLASSES and trained.crop_size == 12


def poison(monkeypatch, step: int) -> None:
    """Training's loss turns NaN at its `step`-th call (96 images / 16: 6 steps an epoch)."""
    calls = {"n": 0}
    real = train_module.make_loss

    def poisoned(name, smoothing):
        loss = real(name, smoothing)

        def fn(logits, labels):
            calls["n"] += 1
            value = loss(logits, labels)
            return value * float("nan") if calls["n"] == step else value

        return fn

    monkeypatch.setattr(train_module, "make_loss", poisoned)


def test_an_interrupted_run_leaves_the_previous_model_and_keeps_its_history_in_last_pt(
    run_dir, monkeypatch
):
    """model.pt stays the previous run's; history.csv holds the new run's finished epochs,
    exactly the history last.pt resumes with."""
    write_params(run_dir, epochs=1)
    train_module.train(params.load("params.yaml"))
    model_before = Path("out/train/model.pt").read_bytes()
    assert len(rows(Path("out/train/history.csv"))) == 1

    # A new run (other params: it starts fresh) that dies in its second epoch.
    poison(monkeypatch, 8)  # epoch 2, step 2
    with pytest.raises(TrainingError, match="at epoch 2, step 2/6"):
        train_module.train(params.load("params.yaml", ["train.epochs=3", "train.lr=0.02"]))
    assert Path("out/train/model.pt").read_bytes() == model_before
    last = checkpoint.load(Path("out/train/last.pt"), require=INFERENCE_KEYS + RESUME_KEYS)
    assert last["params"]["train"]["epochs"] == 3 and not last["complete"]
    assert [row["epoch"] for row in last["history"]] == [1]
    assert last["history"][0]["lr"] == pytest.approx(0.02)
    assert rows(Path("out/train/history.csv")) == [
        {k: float(v) for k, v in row.items()} for row in last["history"]
    ]


def test_history_csv_grows_every_epoch_and_ends_as_the_stages_file(run_dir, monkeypatch):
    """What `dvc plots show` finds while training runs: history.csv holds every finished epoch
    (none before the first). A run that stops, with history.csv deleted as `dvc repro` deletes
    its outputs, finds its rows back when it resumes; after the last epoch the file is, byte
    for byte, the one the stage ends with, each row as written when its epoch ended."""
    write_params(run_dir, epochs=4)
    history = Path("out/train/history.csv")
    seen: list[bytes | None] = []  # the file as each epoch starts, and as the stage finishes
    real_epoch, real_finish = train_module.run_epoch, train_module._finish

    def epoch(*args, **kwargs):
        seen.append(history.read_bytes() if history.exists() else None)
        return real_epoch(*args, **kwargs)

    def finish(*args, **kwargs):
        seen.append(history.read_bytes())
        real_finish(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", epoch)
    monkeypatch.setattr(train_module, "_finish", finish)
    poison(monkeypatch, 14)  # epoch 3, step 2: epochs 1 and 2 are done
    with pytest.raises(TrainingError, match="at epoch 3"):
        train_module.train(params.load("params.yaml"))
    stopped = history.read_bytes()
    assert seen[0] is None and len(rows(history)) == 2
    assert seen[1].splitlines() == stopped.splitlines()[:2]  # header + epoch 1

    history.unlink()  # `dvc repro` deletes a stage's outputs before running it
    seen.clear()
    monkeypatch.setattr(train_module, "make_loss", make_loss)  # the real one again
    train_module.train(params.load("params.yaml"))  # resumes at epoch 3
    final = history.read_bytes()
    assert seen[0] == stopped  # back at once, from last.pt
    assert seen[-1] == final  # after the last epoch: the stage's file, byte for byte
    assert [len(part.splitlines()) - 1 for part in seen] == [2, 3, 4]
    lines = final.splitlines()
    assert all(part.splitlines() == lines[: len(part.splitlines())] for part in seen)
    assert [r["epoch"] for r in rows(history)] == [1, 2, 3, 4]


def _run_state(seed: int, settings: TrainParams) -> RunState:
    """A small dropout net with every part of the state on: EMA, plateau schedule, momentum."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 12 * 12, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    return RunState(
        model, model, optimizer, Schedule(optimizer, settings, 4),
        torch.amp.GradScaler("cpu", enabled=False), ema, torch.Generator().manual_seed(seed),
        make_loss("cross_entropy"), Speed(torch.device("cpu")), Dist(),
    )  # fmt: skip


@pytest.mark.parametrize("old_schedule", [False, True], ids=["now", "schedule-before-torch"])
def test_run_state_round_trip_continues_exactly_like_an_uninterrupted_run(old_schedule):
    """Also from a last.pt whose schedule state predates torch's schedulers."""
    t = train_settings(epochs=2, batch_size=8, crop_size=12, lr=0.1, warmup_epochs=0,
                    schedule="plateau", plateau_patience=1)  # fmt: skip
    gen = np.random.default_rng(0)
    images = torch.from_numpy(gen.integers(0, 255, (32, 16, 16, 3), dtype=np.uint8))
    labels = torch.arange(32) % 4
    val = (images[:12].numpy(), labels[:12].numpy())
    train = Resident(images.numpy(), labels.numpy(), torch.device("cpu"))

    s = _run_state(0, t)
    s.end_epoch(1, run_epoch(s, train, val, t, 8, 1))
    buffer = io.BytesIO()
    saved = s.state_dict()
    if old_schedule:
        plateau = s.schedule.plateau
        saved["schedule"] = {"step_count": 4, "plateau": 1.0, "best": plateau.best,
                             "bad_epochs": plateau.num_bad_epochs}  # fmt: skip
    torch.save(saved, buffer)  # as last.pt does
    assert set(s.state_dict()) == set(RESUME_KEYS)
    s.end_epoch(2, run_epoch(s, train, val, t, 8, 2))  # the uninterrupted run

    torch.manual_seed(123)  # another process: other RNG states, other initial weights
    s2 = _run_state(1, t)
    buffer.seek(0)
    s2.load_state_dict(torch.load(buffer, weights_only=True))
    assert s2.epoch == 1 and s2.since_best == 0
    s2.end_epoch(2, run_epoch(s2, train, val, t, 8, 2))

    for a, b in ((s.model, s2.model), (s.ema, s2.ema)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    if not old_schedule:
        assert s2.schedule.state_dict() == s.schedule.state_dict()
    assert s2.schedule.lr == s.schedule.lr
    assert s2.schedule.plateau.num_bad_epochs == s.schedule.plateau.num_bad_epochs
    assert (s2.best, s2.since_best, s2.epoch) == (s.best, s.since_best, 2)
    assert [{k: r[k] for k in METRICS} for r in s2.history] == [
        {k: r[k] for k in METRICS} for r in s.history
    ]
    assert torch.equal(s2.generator.get_state(), s.generator.get_state())


def _inference_without(key: str) -> dict:
    state = checkpoint.Inference(
        net="mlp", net_options={"hidden": 8}, num_classes=4, image_size=12, stored_size=16,
        classes=["a", "b", "c", "d"], precision="fp32", memory_format="contiguous",
        model={}, params={}, metrics={}, epoch=1, mlflow_run_id=None, data={},
    ).to_dict()  # fmt: skip
    del state[key]
    return {"format": checkpoint.FORMAT, **state}


def test_a_checkpoint_with_the_format_tag_but_a_missing_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_inference_without("classes"), path)
    with pytest.raises(CheckpointError) as err:
        load_trained(path, "cpu")
    assert str(err.value) == f"{path}: incomplete checkpoint, missing key 'classes'"
    with pytest.raises(ValueError, match="lacks classes"):  # and none is ever written
        checkpoint.save(tmp_path / "other.pt", _inference_without("classes"))
    assert not (tmp_path / "other.pt").exists()


def test_a_last_pt_without_the_resume_state_stops_training_with_one_line(tmp_path, monkeypatch):
    make_processed(tmp_path)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("out/train").mkdir(parents=True)
    torch.save(_inference_without("epoch") | dict.fromkeys(RESUME_KEYS), "out/train/last.pt")
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert "out/train/last.pt: incomplete checkpoint, missing key 'epoch'" in result.output
    assert "train.resume=false" in result.output and "Traceback" not in result.output
