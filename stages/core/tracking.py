"""MLflow: where the store lives, checking and creating it safely, and how runs are named.

The store is `sqlite:///$DVC_ROOT/mlflow.db` with artifacts in `$DVC_ROOT/mlartifacts`: DVC sets
DVC_ROOT to the main repository even for queued and --temp experiments, whose own workspace is
deleted afterwards, so every run lands in one place. Outside DVC the current directory is the
root. MLFLOW_TRACKING_URI, when set, wins; a server keeps the artifacts itself.

Every stage checks at its start that the store answers (`setup`), and stops with one line if it
does not: a sqlite store another process holds locked, a server that is down or hangs. Only what
can be seen is called a lock; MLflow's own first connection (imports, migrations: a minute on a
busy machine) is never timed. Then the stage writes through `stages.core.runlog.run_log`, which
never lets the store stop it.
Only MLflow's public API is used: its own tables are never written to directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import torch
from filelock import FileLock

from stages.core.errors import PipelineError
from stages.core.files import write_trouble

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
# While a stage checks the store at its start, a server that does not answer fails within
# seconds instead of after MLflow's default ~250 s of retries. A user's own setting of any of
# these is kept.
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
}
# How long a server may take to answer `setup`'s first question (one that hangs may never
# answer), and how long a sqlite store may stay locked by another process's write.
PROBE_SECONDS = 10
THREADS = "mlflow-"  # the names of this project's threads that talk to the store begin so
# MLflow's and urllib3's own messages about the failures of those threads (a traceback per
# attempt) are dropped: the writer says once that the store fails, and when it is back; the
# probe's failure is the stage's one line.
for _name in ("mlflow.store.db.utils", "urllib3.connectionpool", "mlflow.utils.rest_utils"):
    logging.getLogger(_name).addFilter(lambda record: not record.threadName.startswith(THREADS))


class TrackingError(PipelineError):
    """The MLflow store does not answer (a server that is down, a corrupt or locked sqlite)."""


def root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_uri() -> str:
    """The repository's own store: mlflow.db at its root."""
    return f"sqlite:///{root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def cause(err: BaseException) -> str:
    """The root of an exception chain in one short line ("[Errno 111] Connection refused",
    "database is locked"): MLflow wraps the reason in several layers of long messages."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:300]


def _fix(uri: str, reason: str) -> str:
    """What to do about store `uri` failing with `reason`: advice for that cause only. Moving a
    sqlite file aside hides every run in it, so that is said for a damaged file alone."""
    elsewhere = "or point MLFLOW_TRACKING_URI at another store"
    said = reason.lower()
    if uri.startswith(("http:", "https:")):
        hangs = "no answer" in said
        return f"{'restart' if hangs else 'start'} the server, {elsewhere}"
    if not uri.startswith("sqlite:"):
        return f"check it, {elsewhere}"
    if "locked" in said:
        return f"wait for (or stop) the process that holds it, {elsewhere}"
    if "not a database" in said or "malformed" in said:
        return (
            "the file is damaged: move it aside (a new, empty store is made; the runs stay in"
            f" the moved file), {elsewhere}"
        )
    path = Path(uri.removeprefix("sqlite:///"))
    if any(w in said for w in ("disk is full", "i/o error", "readonly", "unable to open")):
        return f"{write_trouble(path)}, {elsewhere}"
    return f"check it, {elsewhere}"


@contextlib.contextmanager
def answering(uri: str | None = None) -> Iterator[None]:
    """Run the block against a store that must answer now: HTTP retries cut to seconds (see
    QUICK_HTTP) and any failure turned into a TrackingError naming the store and the cause."""
    uri = uri or tracking_uri()
    added = {key: value for key, value in QUICK_HTTP.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        reason = cause(err)
        raise TrackingError(f"MLflow store {uri}: {reason}; {_fix(uri, reason)}") from None
    finally:
        for key in added:
            os.environ.pop(key, None)


def _probe(uri: str) -> None:
    """A sqlite store: take its write lock for an instant (sqlite waits up to PROBE_SECONDS for
    another process's write to end; a hot journal a killed writer left is rolled back). Else ask
    the server for one experiment, waiting at most PROBE_SECONDS for the answer (in a thread left
    behind if it hangs: it ends with the process); its client is made first, untimed."""
    if uri.startswith("sqlite:///"):
        db = sqlite3.connect(uri.removeprefix("sqlite:///"), PROBE_SECONDS, isolation_level=None)
        with contextlib.closing(db):
            db.execute("BEGIN IMMEDIATE")  # "database is locked" while another process holds it
            db.execute("ROLLBACK")
        return
    answer: list[Exception | None] = []
    client = mlflow.MlflowClient(uri)

    def ask() -> None:
        try:
            client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - raised in the stage's thread below
            answer.append(err)
        else:
            answer.append(None)

    thread = threading.Thread(target=ask, name=f"{THREADS}probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    if not answer:
        reason = f"no answer within {PROBE_SECONDS} s"
        raise TrackingError(f"MLflow store {uri}: {reason}; {_fix(uri, reason)}")
    if answer[0] is not None:
        raise answer[0]


def setup() -> str:
    """Point MLflow at the store and return the experiment id, creating both if needed; a store
    that does not answer is a TrackingError within seconds.

    Parallel queued runs racing to create a fresh sqlite store fail in its schema migration,
    so creation is serialised by a file lock beside the store. A server chooses where the
    artifacts go; a database store keeps them in the repository's mlartifacts/.
    """
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with answering(uri), FileLock(root() / ".mlflow.lock"):
        # A new sqlite store is made below, which runs its migrations: seconds under load.
        if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
            _probe(uri)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # A tracking server keeps the artifacts where it is told to (`mlflow server
            # --serve-artifacts`), for every machine; a store this process writes itself keeps
            # them beside it, in the main repository.
            served = uri.startswith(("http:", "https:", "databricks"))
            location = None if served else (root() / "mlartifacts").as_uri()
            return mlflow.create_experiment(name, location, tags=EXPERIMENT_TAGS)
        # MLflow records artifact locations as absolute paths and has no API to change them:
        # the repository's own store, moved or copied, would write into the old place.
        location = experiment.artifact_location
        old = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
        own = location.startswith("file:") and old.name == "mlartifacts"
        if uri == default_uri() and own and old.resolve() != (root() / old.name).resolve():
            raise TrackingError(
                f"MLflow store {uri}: keeps its artifacts in {old}, not in this repository (was"
                " it moved or copied?): new runs would write outside the repository; see"
                " 'Moving a repository with its MLflow store' in docs/troubleshooting.md"
            )
        return experiment.experiment_id


def git(*args: str) -> str:
    """What `git ARGS` prints ("" outside git, without git, or when it fails)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def git_commit() -> str:
    """The commit the code came from ("" outside git)."""
    return git("rev-parse", "HEAD")


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

    The training loop logs them once per epoch instead of through MLflow's own monitor
    (`log_system_metrics`), a thread that writes to the store every few seconds: the values
    line up with epochs, and they wait in the training's log like every other write.
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


def find_run(run_id: str, uri: str | None = None) -> mlflow.entities.Run | None:
    """Run `run_id`, or None when the store does not hold it (inside `answering`: a store that
    fails raises)."""
    try:
        return mlflow.MlflowClient(uri or tracking_uri()).get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
