"""MLflow: where the store lives, creating it safely, and the lifecycle of one run.

The store is `sqlite:///$DVC_ROOT/mlflow.db` with artifacts in `$DVC_ROOT/mlartifacts`: DVC sets
DVC_ROOT to the main repository even for queued and --temp experiments, whose own workspace is
deleted afterwards, so every run lands in one place. Outside DVC the current directory is the
root. MLFLOW_TRACKING_URI, when set, wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import torch

from stages.core.errors import held

EXPERIMENT = "convnet-pipeline"
# MLflow 3 reads `mlflow.experimentKind` to tell model-training experiments from GenAI ones;
# the description (`mlflow.note.content`) heads the experiment's page.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "One run per `dvc repro` / `dvc exp run` training: convolutional networks trained from"
        " scratch by convnet-pipeline. Compare runs in the chart view (val_top1, ten_crop_top1"
        " per run), or tick runs and press Compare; `convnet results` prints the best run per"
        " dataset and model beside the published results."
    ),
}


def root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root() / 'mlflow.db'}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup() -> str:
    """Point MLflow at the store and return the experiment id, creating both if needed.

    Parallel queued runs racing to create a fresh sqlite store fail in its schema migration,
    so creation is serialised by a file lock beside the store.
    """
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    mlflow.set_tracking_uri(tracking_uri())
    with _file_lock(root() / ".mlflow.lock"):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # A tracking server (http[s]://) keeps the artifacts where it is told to (`mlflow
            # server --serve-artifacts`), for every machine; a store this process writes
            # itself keeps them beside it, in the main repository.
            served = tracking_uri().startswith(("http://", "https://"))
            location = None if served else (root() / "mlartifacts").as_uri()
            return mlflow.create_experiment(name, location, tags=EXPERIMENT_TAGS)
        for key, value in EXPERIMENT_TAGS.items():  # a store made before the tags existed
            if key not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id


def git_commit() -> str:
    """The commit the code came from ("" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def run_name(dataset: str, model: str) -> str:
    """`digits/alexnet`, plus the DVC experiment's name under `dvc exp run` (`/lucid-pogo`)."""
    return "/".join(part for part in (dataset, model, os.environ.get("DVC_EXP_NAME")) if part)


def run_tags(dataset: str, model: str, source: str) -> dict[str, str]:
    """Tags that let the MLflow UI filter runs by dataset, model and DVC experiment; `source`
    (the code that made the run) replaces MLflow's guess, which is `__main__.py` every time."""
    return {
        "mlflow.source.name": source,
        "dataset": dataset,
        "model": model,
        "git_commit": git_commit(),
        # DVC names each experiment (e.g. "lucid-pogo"); MLflow's own git tag only sees the
        # baseline commit, so this tag is what ties a run to `dvc exp show`.
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }


def system_metrics(device: torch.device) -> dict[str, float]:
    """CPU use since the last call, memory in use, and on CUDA the GPU's peak memory since the
    last call and its utilisation: MLflow's `system/` metrics (its UI groups them apart).

    The training loop logs them once per epoch, from the main thread, instead of through
    MLflow's own monitor (`log_system_metrics`), a thread that writes to the sqlite store every
    few seconds beside the main thread's writes: one writer, and the values line up with epochs.
    """
    memory = psutil.virtual_memory()
    metrics = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(),  # since the last call
        "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
        "system/system_memory_usage_percentage": memory.percent,
        "system/process_memory_megabytes": psutil.Process().memory_info().rss / 2**20,
    }
    if device.type == "cuda":
        i = torch.cuda.current_device() if device.index is None else device.index
        metrics[f"system/gpu_{i}_memory_usage_megabytes"] = (
            torch.cuda.max_memory_reserved(i) / 2**20
        )
        torch.cuda.reset_peak_memory_stats(i)
        with contextlib.suppress(Exception):  # needs nvidia-ml-py and a driver that answers
            metrics[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
    return metrics


def shielded() -> contextlib.AbstractContextManager[None]:
    """Hold Ctrl-C and SIGTERM until the block ends; wrap every write to the MLflow store.

    An interrupt raised inside a write would leave the sqlite store's transaction open (its
    session rolls back on Exception only, and interrupts are BaseExceptions): the store stays
    locked and the run could not even be marked FAILED. Held, the interrupt is raised the
    moment the block ends.
    """
    return held()


@contextlib.contextmanager
def run(run_id: str | None = None, **kwargs) -> Iterator[mlflow.ActiveRun]:
    """Start (or reopen, with `run_id`) a run; any exception, Ctrl-C or SIGTERM ends it FAILED."""
    with shielded():
        experiment_id = setup()
        active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, **kwargs)
    try:
        yield active
    except BaseException:
        with shielded():
            mlflow.end_run("FAILED")
        raise
    with shielded():
        mlflow.end_run("FINISHED")
