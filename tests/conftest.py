"""Shared by every test module."""

import os

import pytest


@pytest.fixture(autouse=True)
def _environment_restored():
    """MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ (for the
    subprocesses it starts), past monkeypatch: restore the environment after every test so one
    test's store never becomes the next one's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
