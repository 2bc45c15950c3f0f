"""MLflow: where the store lives, creating it safely, and the lifecycle of one run.

The store is `sqlite:///$DVC_ROOT/mlflow.db` with artifacts in `$DVC_ROOT/mlartifacts`: DVC sets
DVC_ROOT to the main repository even for queued and --temp experiments, whose own workspace is
deleted afterwards, so every run lands in one place. Outside DVC the current directory is the
root. MLFLOW_TRACKING_URI, when set, wins; a server keeps the artifacts itself.

Every stage checks at its start that the store answers (`setup`), and stops with one line if it
does not. A training then writes through `stages.core.runlog.RunLog`, which never lets the
store stop it; the other stages write at once inside `run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import torch

from stages.core.errors import PipelineError, held
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
        return f"start the server, {elsewhere}"
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


def _check_sqlite(uri: str) -> None:
    """Read an existing sqlite store's schema, waiting at most 3 s for a lock: MLflow itself
    waits 20 s per statement and retries opening a store it cannot read for over a minute."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not path.exists():
        return  # another kind of store, or a new one
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=3)) as db:
        db.execute("select count(*) from sqlite_master").fetchone()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    with answering(uri), _file_lock(root() / ".mlflow.lock"):
        _check_sqlite(uri)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # A tracking server keeps the artifacts where it is told to (`mlflow server
            # --serve-artifacts`), for every machine; a store this process writes itself keeps
            # them beside it, in the main repository.
            served = uri.startswith(("http:", "https:", "databricks"))
            location = None if served else (root() / "mlartifacts").as_uri()
            return mlflow.create_experiment(name, location, tags=EXPERIMENT_TAGS)
        if uri == default_uri():
            _follow_move(uri, experiment.artifact_location)
        for key, value in EXPERIMENT_TAGS.items():  # a store made before the tags existed
            if key not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id


# Where the sqlite store records artifact paths (MLflow stores them absolute, whatever it is
# given: a relative location is resolved against the current directory when it is created).
_LOCATIONS = {
    "experiments": "artifact_location",
    "runs": "artifact_uri",
    "logged_models": "artifact_location",
    "model_versions": "storage_location",
}


def _follow_move(uri: str, location: str) -> None:
    """After the repository (with mlflow.db and mlartifacts/) moved or was copied, point every
    artifact path the store holds at the new place, so that new runs write inside the
    repository and old runs' artifacts still open, instead of writing to (and re-creating)
    the old path."""
    new = root() / "mlartifacts"
    if not location.startswith("file://") or not location.endswith("/mlartifacts"):
        return  # not the repository's own layout: leave it as the user made it
    if location == new.as_uri():
        return
    old_uri = location.removesuffix("mlartifacts")  # file:///old/repo/ (percent-encoded)
    old_path = urllib.parse.unquote(urllib.parse.urlparse(old_uri).path)  # /old/repo/
    pairs = ((old_uri, root().as_uri() + "/"), (old_path, f"{root()}/"))
    db = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=20)
    with contextlib.closing(db), db:  # one transaction
        for table, column in _LOCATIONS.items():
            for old, moved in pairs:
                db.execute(
                    f"update {table} set {column} = ? || substr({column}, ?)"
                    f" where substr({column}, 1, ?) = ?",
                    (moved, len(old) + 1, len(old), old),
                )
    print(f"MLflow: the repository moved from {old_path} to {root()}; the store's artifact"
          " paths now point into it")  # fmt: skip


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


def shielded() -> contextlib.AbstractContextManager[None]:
    """Hold Ctrl-C and SIGTERM until the block ends; wrap every write to the MLflow store.

    An interrupt raised inside a write would leave the sqlite store's transaction open (its
    session rolls back on Exception only, and interrupts are BaseExceptions): the store stays
    locked and the run could not even be marked FAILED. Held, the interrupt is raised the
    moment the block ends.
    """
    return held()


def find_run(run_id: str, uri: str | None = None) -> mlflow.entities.Run | None:
    """Run `run_id`, or None when the store does not hold it (inside `answering`: a store that
    fails raises)."""
    try:
        return mlflow.MlflowClient(uri or tracking_uri()).get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Write to the store now: Ctrl-C and SIGTERM held (see `shielded`), a store that does not
    answer one line within seconds (see `answering`)."""
    with shielded(), answering():
        yield


@contextlib.contextmanager
def run(run_id: str | None = None, **kwargs) -> Iterator[mlflow.entities.Run]:
    """The run a stage writes to, at once (inside `writing()`, passing its `run_id` to each
    `mlflow.log_*`): evaluate, report and lr-find, whose writes are few and come after their
    work is saved. A training uses RunLog instead.

    With `run_id` of a run the store holds (the training's, which evaluate and report add to),
    that run as it is: it is not reopened, so its status and end stay the training's whatever
    happens here (an interrupt in one stage never changes another stage's run). Otherwise a new
    run of this stage (`kwargs` for `mlflow.start_run`), which ends FAILED on any exception,
    Ctrl-C or SIGTERM, FINISHED otherwise.
    """
    active = None
    try:
        with shielded():  # an interrupt held here is raised inside `try`: the run ends FAILED
            experiment_id = setup()
            with answering():
                found = find_run(run_id) if run_id else None
                if found is None:
                    if run_id:
                        print(f"MLflow: run {run_id} is not in the store {tracking_uri()} (the"
                              " model was trained with another); logging to a new run")  # fmt: skip
                    active = found = mlflow.start_run(experiment_id=experiment_id, **kwargs)
        yield found
    except BaseException:
        if active is not None:
            with shielded(), contextlib.suppress(PipelineError), answering():
                mlflow.end_run("FAILED")
        raise
    if active is not None:
        with writing():
            mlflow.end_run("FINISHED")
