"""Ctrl-C / SIGTERM inside a held block (an MLflow write) wait for the block to end."""

import os
import signal
import time

import mlflow
import pytest

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
