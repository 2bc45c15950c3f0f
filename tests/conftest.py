"""Shared by every test module; the helpers themselves are in tests/helpers/."""

import os

import mlflow
import pytest
import torch
from helpers import processes
from helpers.processes import clone

from stages.data.images import available_cores

# pytest-xdist runs one worker per core (pyproject.toml): each worker, and every process its tests
# start, gets its share of the cores for torch's threads instead of all of them (two workers of
# two threads on two cores stall in each other's thread barriers).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, available_cores() // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (in their usual order), so the workers share them out early and no
    worker is left running one long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _cache_of_the_session(tmp_path_factory):
    """Libraries keep caches in the user's cache folder (torch hub's weights, matplotlib's font
    list): the tests keep theirs in a folder of the session's, never in the home folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _store_template(tmp_path_factory):
    """One migrated, empty MLflow store for the session (see processes.with_store)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    processes.STORE_TEMPLATE = db


@pytest.fixture(autouse=True)
def _environment_restored():
    """MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ (for the
    subprocesses it starts), past monkeypatch: restore the environment after every test so one
    test's store never becomes the next one's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple:
    """A fresh git repository of this checkout, reduced (see processes.clone), and its env."""
    dest = tmp_path_factory.mktemp("clone")
    return dest, clone(dest)
