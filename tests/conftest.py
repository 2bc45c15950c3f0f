"""Shared by every test module."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_of_the_session(tmp_path_factory):
    """Training measures speed settings and keeps them in the user's cache folder: the tests
    keep theirs in a folder of the session's, never in the home folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _environment_restored():
    """MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ (for the
    subprocesses it starts), past monkeypatch: restore the environment after every test so one
    test's store never becomes the next one's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
