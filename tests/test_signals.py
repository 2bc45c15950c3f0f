"""Ctrl-C / SIGTERM inside a held block (an MLflow write) wait for the block to end; Ctrl-C
while a command still imports its modules is one line and exit 130."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from helpers.processes import env

from stages.core import errors, tracking
from stages.core.errors import Interrupted
from stages.core.runlog import run_log


@pytest.fixture
def handler():
    old = signal.signal(signal.SIGTERM, errors.on_signal)
    yield
    signal.signal(signal.SIGTERM, old)


def test_a_signal_inside_a_held_block_is_raised_when_the_block_ends(handler):
    steps = []
    with pytest.raises(Interrupted) as caught, errors.held():
        with errors.held():  # nested: only the outermost end raises
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now
            steps.append("inner")
        steps.append("outer")
    assert steps == ["inner", "outer"] and caught.value.signum == signal.SIGTERM


def test_outside_a_held_block_the_signal_interrupts_at_once(handler):
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    with errors.held():  # nothing pending is left over from before
        pass


@pytest.mark.parametrize("attach", [False, True], ids=["own run", "attached, run not in store"])
def test_an_interrupt_while_the_run_is_created_ends_it_failed(tmp_path, monkeypatch, attach):
    """SIGTERM arriving while MLflow creates the run is held until the run exists, then ends
    it FAILED (it used to stay open and end FINISHED when the process exited). A stage that
    attaches to a run the store lacks (evaluate with another store's model) owns its new run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    create_run = mlflow.MlflowClient.create_run

    def create_run_and_signal(self, *args, **kwargs):  # the real one, with a signal inside
        os.kill(os.getpid(), signal.SIGTERM)
        return create_run(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run_and_signal)
    old = signal.signal(signal.SIGTERM, errors.on_signal)
    try:
        opened = run_log(None, "f" * 32 if attach else None, attach=attach)
        with pytest.raises(Interrupted), opened:
            pytest.fail("the block ran")
    finally:
        signal.signal(signal.SIGTERM, old)
    [run] = mlflow.MlflowClient(uri).search_runs(
        [mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id]
    )
    assert run.info.status == "FAILED"


# --- Ctrl-C while a command is still importing its modules --------------------------------

REPO = Path(__file__).resolve().parents[1]


def mapped(pid: int, library: str) -> bool:
    """Whether process `pid` has loaded a shared library whose path holds `library`."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has ended
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize(
    "library",
    ["_pydantic_core", "libtorch_cpu"],
    ids=["importing the cli (its handler not yet installed)", "importing the stage (torch)"],
)
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, library):
    """A signal at a set moment (0.3 s) lands anywhere on a busy machine, Python's own start
    included; the moment is taken from the libraries the process has loaded instead."""
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    child = subprocess.Popen(
        [sys.executable, "-m", "stages", "train"], cwd=tmp_path, env=env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not mapped(child.pid, library) and child.poll() is None:
        assert time.monotonic() < deadline, f"{library} never loaded"
        time.sleep(0.002)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert err.splitlines() == ["error: interrupted by Ctrl-C (SIGINT)"], err
    assert out == "" and not (tmp_path / "out").exists()
