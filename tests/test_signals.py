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


# `python -m stages train` with Ctrl-C pressed the moment `module` starts importing: a finder
# first on sys.meta_path sends the signal and lets the import go on, so the interrupt lands
# inside that import whatever the machine's load (a timed signal can miss the window).
CTRL_C_WHILE_IMPORTING = """
import os, runpy, signal, sys
module = sys.argv[1]
# Ctrl-C as a shell leaves it to a command: Python's handler, the signal not blocked (a test
# runner's worker may have passed it on ignored or blocked, and the signal would never land).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
assert module not in sys.modules, module + " is imported already: no Ctrl-C would land in it"
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv[1:] = ["train"]
runpy.run_module("stages", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "module",
    ["pydantic_core", "torch"],
    ids=["importing the cli (its handler not yet installed)", "importing the stage (torch)"],
)
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, module):
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING, module], cwd=tmp_path, env=env(tmp_path),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == ["error: interrupted by Ctrl-C (SIGINT)"], done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()
