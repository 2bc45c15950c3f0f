"""The training engine's faults: SIGKILL + resume, determinism, NaN stop, bad checkpoint, DDP."""

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.fabricate import SLOW_EPOCH, setup
from helpers.processes import METRICS, env, history, with_store
from typer.testing import CliRunner

from stages import params
from stages import train as train_module
from stages.cli import app
from stages.core import checkpoint
from stages.core.runlog import RunLog


def runs(root: Path) -> int:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


@pytest.fixture
def quiet(monkeypatch):
    """In-process runs skip the slow MLflow model export (a subprocess test covers it)."""
    monkeypatch.setattr(RunLog, "model", lambda *args: None)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_same_metrics(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    for root in (full, killed):
        setup(root, n_train=SLOW_EPOCH, epochs=3, ema_decay=0.9, schedule="plateau")
    cmd = [sys.executable, "-m", "stages", "train"]
    subprocess.run(cmd, cwd=full, env=env(full), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(cmd, cwd=killed, env=env(killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    last = killed / "out/train/last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = checkpoint.load(last)
    done = partial["epoch"]
    assert done < 3, "the run finished before it could be killed"
    assert not (killed / "out/train/model.pt").exists()
    assert [row["epoch"] for row in partial["history"]] == list(range(1, done + 1))
    # history.csv follows last.pt (written after it): the epochs it holds, or one fewer when
    # the kill fell between the two writes; never an epoch last.pt lacks.
    if (killed / "out/train/history.csv").exists():
        assert [r["epoch"] for r in history(killed)] in (list(range(1, done + 1)),
                                                         list(range(1, done)))  # fmt: skip

    again = subprocess.run(cmd, cwd=killed, env=env(killed), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resuming at epoch {done + 1}" in again.stdout
    assert history(killed) == history(full)  # every epoch, bit for bit
    assert runs(killed) == 1  # the MLflow run was reopened, not duplicated
    state = checkpoint.load(killed / "out/train/model.pt")
    torch.testing.assert_close(
        state["model"], checkpoint.load(full / "out/train/model.pt")["model"]
    )


def test_same_seed_same_metrics_and_changed_params_start_fresh(tmp_path, monkeypatch, quiet):
    results = []
    for name in ("a", "b"):
        root = tmp_path / name
        setup(root, epochs=2, brightness=0.3, cutout=3, vflip=True, optimizer="adamw")
        monkeypatch.chdir(root)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(root)}")
        results.append(train_module.train(params.load("params.yaml")))
    for key in METRICS:
        assert results[0][key] == results[1][key], key
    # Finished run: a rerun with other params (and even the same ones) starts over.
    out = train_module.train(params.load("params.yaml", ["train.lr=0.01", "train.epochs=1"]))
    assert out["epoch"] == 1 and checkpoint.load(Path("out/train/last.pt"))["complete"]


def test_nan_loss_stops_with_epoch_step_lr_and_keeps_last_good(tmp_path, monkeypatch, quiet):
    root = tmp_path / "nan"
    setup(root, epochs=3, schedule="constant")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(root)}")
    calls = {"n": 0}
    real = train_module.make_loss

    def poisoned(name, smoothing):
        loss = real(name, smoothing)

        def fn(logits, labels):
            calls["n"] += 1  # 480 images / 16 = 30 steps per epoch: the 35th is epoch 2 step 5
            value = loss(logits, labels)
            return value * float("nan") if calls["n"] == 35 else value

        return fn

    monkeypatch.setattr(train_module, "make_loss", poisoned)
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert "loss is nan at epoch 2, step 5/30 (learning rate 0.05)" in result.output
    assert "Traceback" not in result.output
    assert checkpoint.load(Path("out/train/last.pt"))["epoch"] == 1
    assert not Path("out/train/model.pt").exists()


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "junk"
    setup(root)
    monkeypatch.chdir(root)
    Path("out/train").mkdir(parents=True)
    Path("out/train/last.pt").write_text("not a checkpoint")
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert "out/train/last.pt: not a readable checkpoint of this project" in result.output
    assert "train.resume=false" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_torchrun_two_gloo_processes_one_run_one_checkpoint(tmp_path):
    root = tmp_path / "ddp"
    setup(root, epochs=2, sync_batchnorm=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "stages", "train"]  # fmt: skip
    e = env(root) | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=root, env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stdout
    assert out.stdout.count("epoch   2/2") == 1  # only rank 0 prints
    assert runs(root) == 1
    files = sorted(p.name for p in (root / "out/train").iterdir())
    assert files == ["best.pt", "history.csv", "last.pt", "model.pt", "run.json"]
    rows = history(root)
    # The two ranks learn the fabricated quadrants together: measured 1.0 after each epoch.
    assert len(rows) == 2 and rows[-1]["val_top1"] >= 0.9
