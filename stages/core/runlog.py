"""A training's MLflow run, whose store can never cost the training.

`training_run` starts (or reopens) the run at once: a store that does not answer stops the stage
there, before any work, with one line. Every later write (params, metrics, dataset inputs,
files, the model, the run's end) is a `Record` of plain data put in a queue that a background
thread writes in order, retrying while the store fails (a sqlite lock, a server restarting):
training never waits for the store. At the end the log waits for its queue; if the store has
taken nothing for WAIT_SECONDS, what is left is saved in out/train/mlflow-pending/<run id>.json
and the last line says what the run lacks; `convnet log-pending` (or the next training) logs it.
A pending file is checked when read, record by record: what can never be logged (a key missing,
a name leading out of its folder, a run the store lacks) is set aside in one line, once, instead
of being retried and blamed on the store.

Signals reach only the main thread, so no write of the thread is ever cut half-way by Ctrl-C or
SIGTERM; an interrupted training queues the run's end as FAILED like any other write (a
second Ctrl-C stops waiting for the store), so a run never stays RUNNING where the store answers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from matplotlib.figure import Figure
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context import registry as context_registry

from stages.core import checkpoint, paths
from stages.core.errors import Interrupted, PipelineError, held
from stages.core.files import atomic_path, is_inner_path, is_plain_name, only_one, write_json
from stages.core.tracking import (
    TrackingError,
    answering,
    cause,
    find_run,
    root,
    setup,
    tracking_uri,
)

WAIT_SECONDS = 60  # at the end, how long the store may take no write before the rest is saved
WRITER = "mlflow-writer"  # the thread's name
# Errors a retry cannot fix (a value the store rejects, a run deleted meanwhile): the record
# is dropped with a line saying so, instead of blocking the ones after it.
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
# What `RunLog.model` logs, made by stages.engine.serving.package (core imports no engine):
# checkpoint file, its content -> the keyword arguments of `mlflow.models.Model.log`.
Package = Callable[[Path, dict[str, Any]], dict[str, Any]]


class _Quiet(logging.Filter):
    """Drops MLflow's and urllib3's own messages about failed attempts of the writer thread
    (a traceback per attempt): the log says once that the store fails, and when it is back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != WRITER


for _name in ("mlflow.store.db.utils", "urllib3.connectionpool", "mlflow.utils.rest_utils"):
    logging.getLogger(_name).addFilter(_Quiet())


def _now() -> int:
    return int(time.time() * 1000)


@dataclass
class Record:
    """One write: `what` it holds, in words (per epoch `step` when there is one), its `kind`
    (batch, input, file, model, end) and its data, plain JSON."""

    what: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    step: int | None = None


def describe(records: list[Record]) -> str:
    """What the records hold: 'the params and tags, the metrics (epochs 4-6, 9) and the model'."""
    steps: dict[str, list[int]] = {}
    for record in records:
        steps.setdefault(record.what, [])
        if record.step is not None:
            steps[record.what].append(record.step)
    parts = [f"{what} ({_epochs(s)})" if s else what for what, s in steps.items()]
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _epochs(steps: list[int]) -> str:
    runs: list[list[int]] = []
    for step in sorted(set(steps)):
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    spans = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return f"epoch{'s' if len(steps) > 1 else ''} {spans}"


class RunLog:
    """The writes to MLflow run `run_id` of store `uri`, in order, by a background thread.

    Records the run left in its pending file earlier are written first. `package` turns a
    checkpoint into the MLflow model that `model` logs.
    """

    def __init__(self, uri: str, run_id: str, package: Package) -> None:
        self.uri, self.run_id, self.package = uri, run_id, package
        self.client = mlflow.MlflowClient(uri)
        self.file = pending_folder() / f"{run_id}.json"
        self.model_copy = self.file.with_suffix(".model.pt")  # model.pt, if its log waits
        kept = _read_pending(self.file, _say) if self.file.exists() else None
        self._queue = deque(kept[1] if kept else [])
        self._cond = threading.Condition()
        self._stopped = False
        self.failure: str | None = None  # the store's last error, until a write succeeds
        self._progress = time.monotonic()  # when a write last succeeded or the queue filled
        self._exporting = False  # the model is being logged: that may take minutes
        self.left: list[Record] = []  # what close() saved as pending
        self._thread = threading.Thread(target=self._write, name=WRITER, daemon=True)
        self._thread.start()

    # The writes a training makes; each returns at once.

    def batch(
        self, what: str, step: int | None = None, metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Metrics (at `step`, timed now), params and tags."""
        values = {"metrics": metrics or {}, "params": params or {}, "tags": tags or {}}
        self._add(Record(what, "batch", values | {"time": _now()}, step))

    def steps(self, key: str) -> set[int] | None:
        """The steps at which the store holds metric `key` now (None: it does not answer)."""
        try:
            with answering(self.uri):
                return {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except TrackingError:
            return None

    def input(self, dataset: mlflow.data.dataset.Dataset, context: str) -> None:
        """A dataset input (`mlflow.data.from_numpy(...)`), e.g. context "training"."""
        self._add(Record(f"the {context} dataset", "input", {"dataset": dataset.to_dict(),
                                                             "context": context}))  # fmt: skip

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file as it is now (read at once: a later change does not reach the run)."""
        self._file(path.name, path.read_bytes(), artifact_path)

    def figure(self, fig: Figure, artifact_file: str, step: int | None = None) -> None:
        """A matplotlib figure as a PNG artifact (what `mlflow.log_figure` writes)."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        folder, _, name = artifact_file.rpartition("/")
        self._file(name, buffer.getvalue(), folder or None, what=f"the {folder or name}", step=step)

    def model(self, file: Path, dataset: str, model: str, register: bool) -> None:
        """Checkpoint `file` as the run's MLflow model `<dataset>-<model>` (see `package`)."""
        data = {"checkpoint": str(file.resolve()), "dataset": dataset, "model": model,
                "register": register}  # fmt: skip
        self._add(Record("the model", "model", data))

    def _file(self, name: str, content: bytes, folder: str | None, what: str = "",
              step: int | None = None) -> None:  # fmt: skip
        data = {"name": name, "folder": folder, "bytes": base64.b64encode(content).decode()}
        self._add(Record(what or name, "file", data, step))

    def _add(self, record: Record) -> None:
        with held(), self._cond:  # never cut while holding the lock the thread needs
            if not self._queue:
                self._progress = time.monotonic()
            self._queue.append(record)
            self._cond.notify_all()

    # The thread.

    def _write(self) -> None:
        """Write the records in order; after a failure wait (1 s, doubling up to 10 s) and
        try the same record again."""
        delay = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                record = self._queue[0]
                self._exporting = record.kind == "model"
            try:
                self._apply(record)
            except Exception as err:
                with self._cond:
                    self._exporting = False
                    if _refused(err):
                        print(f"MLflow: {record.what} cannot be written ({cause(err)});"
                              " dropped", flush=True)  # fmt: skip
                        self._done()
                        continue
                    if self.failure is None:
                        print(
                            f"MLflow: the store {self.uri} does not answer ({cause(err)});"
                            " its writes wait and are retried in the background",
                            flush=True,
                        )
                    self.failure = cause(err)
                    self._cond.wait(delay)  # a stop wakes it
                delay = min(2 * delay, 10.0)
                continue
            with self._cond:
                if self._stopped:  # given up meanwhile: the record is saved as pending too
                    return
                if self.failure is not None:
                    print("MLflow: the store answers again; the waiting writes follow", flush=True)
                    self.failure = None
                self._done()
            delay = 1.0

    def _done(self) -> None:
        self._queue.popleft()
        self._exporting = False
        self._progress = time.monotonic()
        self._cond.notify_all()

    def _apply(self, record: Record) -> None:
        data, run_id, client = record.data, self.run_id, self.client
        if record.kind == "batch":
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, data["time"], record.step or 0)
                         for k, v in data["metrics"].items()],
                params=[Param(k, str(v)) for k, v in data["params"].items()],
                tags=[RunTag(k, str(v)) for k, v in data["tags"].items()],
            )  # fmt: skip
        elif record.kind == "input":
            context = InputTag(mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, data["context"])
            client.log_inputs(run_id, [DatasetInput(Dataset(**data["dataset"]), [context])])
        elif record.kind == "file":
            if not is_plain_name(data["name"]):  # never written outside the temporary folder
                raise PipelineError(f"{data['name']!r} is not a plain file name")
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / data["name"]
                path.write_bytes(base64.b64decode(data["bytes"]))
                client.log_artifact(run_id, str(path), data["folder"])
        elif record.kind == "model":
            file = self.file.parent / data["checkpoint"]  # a copy's name, or absolute
            state = checkpoint.load(file)
            if state["mlflow_run_id"] != run_id:
                raise PipelineError(f"{file} now holds run {state['mlflow_run_id']}")
            _log_model(self, file, state, data)
        elif record.kind == "end":
            client.set_terminated(run_id, data["status"], end_time=data["time"])
        else:
            raise PipelineError(f"unknown kind of record {record.kind!r}")

    # The end.

    def close(self) -> list[Record]:
        """Wait until every record is written or the store has taken none for WAIT_SECONDS,
        then stop the thread; what is left goes to the pending file and is returned.

        Ctrl-C or SIGTERM while waiting stops the waiting; it is raised once the file is saved.
        """
        stopped = None
        try:
            self._wait()
        except Interrupted as err:
            stopped = err
        with held():
            with self._cond:
                self._stopped = True
                rest = list(self._queue)
                self._cond.notify_all()
            self.left = rest
            if rest:
                self._keep_model(rest)
                save_pending(self.file, self.uri, rest)
            else:
                self.file.unlink(missing_ok=True)
                self.model_copy.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # the folder goes once it is empty
                    self.file.parent.rmdir()
        if stopped is not None:
            raise stopped
        return rest

    def _keep_model(self, rest: list[Record]) -> None:
        """A waiting model is logged later from a copy of its checkpoint beside the pending
        file: out/train/model.pt may be a new training's by then, or (a queued experiment)
        gone with its temporary workspace."""
        for record in rest:
            source = self.file.parent / record.data.get("checkpoint", "")
            if record.kind == "model" and source != self.model_copy and source.is_file():
                with atomic_path(self.model_copy) as tmp:
                    shutil.copyfile(source, tmp)
                record.data["checkpoint"] = self.model_copy.name

    def _wait(self) -> None:
        """Until the queue is empty or the store has taken nothing for WAIT_SECONDS since the
        wait began (logging the model may take longer, as long as it does not fail)."""
        began, told = time.monotonic(), False
        with self._cond:
            while self._queue:
                idle = time.monotonic() - max(self._progress, began)
                stalled = 0.0 if self._exporting else idle
                if stalled >= WAIT_SECONDS:
                    return
                if not told and (self.failure is not None or stalled >= 5):
                    print(
                        f"MLflow: waiting up to {WAIT_SECONDS} s for the store to take the"
                        f" last {len(self._queue)} writes (Ctrl-C stops waiting)",
                        flush=True,
                    )
                    told = True
                self._cond.wait(1.0)

    def end(self, status: str) -> None:
        """End the run FINISHED or FAILED; if the store did not take everything, the last line
        says what the run lacks and how to log it."""
        self._add(Record(f"its end ({status})", "end", {"status": status, "time": _now()}))
        try:
            self.close()
        except Interrupted:
            if status == "FINISHED":  # else the interrupt that failed the run is the one told
                raise
        finally:
            if self.left:
                print(f"MLflow: run {self.run_id} lacks {describe(self.left)}: the store {self.uri}"
                      f" did not take them ({self.failure or 'no answer yet'}); they wait in"
                      f" {_shown(self.file)}: `convnet log-pending` logs them once the store"
                      " answers",
                      flush=True)  # fmt: skip


def _shown(path: Path) -> Path:
    """`path` relative to the current directory when it is under it."""
    with contextlib.suppress(ValueError):
        return path.relative_to(Path.cwd())
    return path


def _refused(err: Exception) -> bool:
    return isinstance(err, PipelineError) or (
        isinstance(err, MlflowException) and err.error_code in REFUSED
    )


def _log_model(log: RunLog, file: Path, state: dict[str, Any], data: dict[str, Any]) -> None:
    """Checkpoint `file` (holding `state`) as an MLflow model of the run, named
    `<dataset>-<model>` (registered as `convnet-<dataset>-<model>` with train.register_model);
    one line says how to serve it."""
    run = log.client.get_run(log.run_id)
    # The model goes to the active experiment and tracking URI, which are global in MLflow.
    mlflow.set_tracking_uri(log.uri)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    name = f"{data['dataset']}-{data['model']}"
    registered = f"convnet-{name}" if data["register"] else None
    content = log.package(file, state)
    content["metadata"] = content.get("metadata", {}) | {
        "dataset": data["dataset"], "model": data["model"]
    }  # fmt: skip
    # Model.log: mlflow.pyfunc.log_model with a run id (it logs to the active run only).
    info = mlflow.models.Model.log(
        artifact_path=None, name=name, run_id=log.run_id, registered_model_name=registered,
        **content,
    )  # fmt: skip
    version = info.registered_model_version
    uri = f"models:/{registered}/{version}" if registered and version else info.model_uri
    # MLflow's own default store is ./mlflow.db: from the repository root the URI is enough.
    here = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    store = "" if log.uri == here else f"MLFLOW_TRACKING_URI={shlex.quote(log.uri)} "
    print(f"MLflow: model {name} logged as {uri}; serve it with"
          f" `{store}mlflow models serve -m {uri} --env-manager local`", flush=True)  # fmt: skip


def pending_folder() -> Path:
    """out/train/mlflow-pending of the main repository (a queued experiment's own workspace
    is deleted once it ends)."""
    return root() / paths.MLFLOW_PENDING


# Beside the pending files: what can never be logged, kept for a look instead of being retried
# forever (a record's key missing, a name leading out of its folder, a run the store lacks).
SET_ASIDE = "set-aside"
# What each kind of record holds in `data`: key -> the JSON types its value may have.
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "batch": {"metrics": (dict,), "params": (dict,), "tags": (dict,), "time": (int,)},
    "input": {"dataset": (dict,), "context": (str,)},
    "file": {"name": (str,), "folder": (str, type(None)), "bytes": (str,)},
    "model": {"checkpoint": (str,), "dataset": (str,), "model": (str,), "register": (bool,)},
    "end": {"status": (str,), "time": (int,)},
}
_ENDS = ("FINISHED", "FAILED", "KILLED")


def _say(line: str) -> None:
    print(f"MLflow: {line}", flush=True)


def _wrong(raw: Any, run_id: str) -> str | None:
    """Why the saved record `raw` (of run `run_id`'s pending file) can never be logged, or None.

    Every path in a record stays in its folder: a file's name is a plain name, its artifact
    folder a relative path of plain names, and a model's checkpoint the copy beside the
    pending file.
    """
    if not isinstance(raw, dict) or set(raw) - {"what", "kind", "data", "step"}:
        return "not a record"
    kind, data, step = raw.get("kind"), raw.get("data"), raw.get("step")
    if kind not in _FIELDS or not isinstance(raw.get("what"), str) or not isinstance(data, dict):
        return f"not a record of a known kind ({', '.join(_FIELDS)})"
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        return f"its step {step!r} is not a number"
    for key, types in _FIELDS[kind].items():
        if key not in data:
            return f"a {kind} record without {key!r}"
        if not isinstance(data[key], types) or (bool not in types and isinstance(data[key], bool)):
            return f"its {key!r} is {type(data[key]).__name__}"
    if kind == "batch":
        odd = [k for k, v in data["metrics"].items() if not isinstance(v, int | float)]
        if odd:
            return f"metric {odd[0]!r} is not a number"
    elif kind == "input":
        try:
            Dataset(**data["dataset"])
        except TypeError:
            return "its dataset is not an MLflow dataset"
    elif kind == "file":
        if not is_plain_name(data["name"]):
            return f"its file name {data['name']!r} leads out of its folder"
        if data["folder"] is not None and not is_inner_path(data["folder"]):
            return f"its artifact folder {data['folder']!r} leads out of the run's artifacts"
        try:
            base64.b64decode(data["bytes"], validate=True)
        except ValueError:
            return "its content is not base64"
    elif kind == "model" and data["checkpoint"] != f"{run_id}.model.pt":
        return f"its checkpoint {data['checkpoint']!r} is not the copy beside the pending file"
    elif kind == "end" and data["status"] not in _ENDS:
        return f"its status {data['status']!r} is not one of {', '.join(_ENDS)}"
    return None


def _store_exists(uri: str) -> bool:
    """False for a store on this machine (a sqlite file, a file store's folder) that is not
    there: logging to it would make a new, empty one wherever the URI points."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).exists()
    if uri.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)).exists()
    return True  # a server, another database: it says itself whether it has the run


def _aside(file: Path) -> Path:
    """A new name in the set-aside folder for what comes from `file`."""
    folder = file.parent / SET_ASIDE
    folder.mkdir(exist_ok=True)
    target, n = folder / file.name, 1
    while target.exists():
        n += 1
        target = folder / f"{file.stem}.{n}{file.suffix}"
    return target


def _set_file_aside(file: Path, why: str, say: Callable[[str], None]) -> None:
    """Move a pending file (and its model's copy) to the set-aside folder, saying why, once."""
    target = _aside(file)
    os.replace(file, target)
    copy = file.with_suffix(".model.pt")
    if copy.exists():
        os.replace(copy, target.with_suffix(".model.pt"))
    say(f"{_shown(file)}: {why}; set aside in {_shown(target)}")


def _read_pending(file: Path, say: Callable[[str], None]) -> tuple[str, list[Record]] | None:
    """A pending file's store URI and records; the records that can never be logged are set
    aside first (the whole file when it is not a pending log at all), each said in one line.
    None when nothing of the file is left to log."""
    try:
        saved = json.loads(file.read_text())
        uri, raws = saved["uri"], saved["records"]
        if not isinstance(uri, str) or not isinstance(raws, list):
            raise TypeError("'uri' must be text and 'records' a list")
    except (OSError, ValueError, KeyError, TypeError) as err:
        _set_file_aside(file, f"not a pending MLflow log ({cause(err)})", say)
        return None
    if not _store_exists(uri):
        _set_file_aside(file, f"its store {uri} does not exist (moved or deleted)", say)
        return None
    wrong = [(i, why) for i, raw in enumerate(raws) if (why := _wrong(raw, file.stem))]
    if wrong:
        bad = {i for i, _ in wrong}
        target = _aside(file)
        write_json(target, {"uri": uri, "records": [raws[i] for i in sorted(bad)],
                            "why": {str(i + 1): why for i, why in wrong}})  # fmt: skip
        first, why = wrong[0]
        some = f"records {', '.join(str(i + 1) for i in sorted(bad))}" if len(bad) > 1 else (
            f"record {first + 1}"
        )  # fmt: skip
        say(f"{_shown(file)}: {some} of {len(raws)} can never be logged (record {first + 1}:"
            f" {why}); set aside in {_shown(target)}")  # fmt: skip
        raws = [raw for i, raw in enumerate(raws) if i not in bad]
        if not raws:
            file.unlink()
            file.with_suffix(".model.pt").unlink(missing_ok=True)
            return None
        save_pending(file, uri, [Record(**raw) for raw in raws])
    return uri, [Record(**raw) for raw in raws]


def save_pending(file: Path, uri: str, records: list[Record]) -> None:
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps({"uri": uri, "records": [asdict(r) for r in records]}))


def log_pending(package: Package, say: Callable[[str], None] = _say) -> list[str]:
    """Write what earlier trainings left in out/train/mlflow-pending/ to their runs (the command
    `convnet log-pending`); returns a line per run. What can never be logged is set aside (see
    SET_ASIDE), said through `say`. TrackingError if a store still fails; BusyError while
    another process logs them (a queued experiment starting meanwhile would log them twice)."""
    folder = pending_folder()
    if not folder.is_dir():
        return []
    done = []
    with only_one(folder, "logging these to MLflow"):
        files = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime)
        for file in files:
            if (read := _read_pending(file, say)) is None:
                continue
            uri, records = read
            with answering(uri):  # the store answers, or one line at once
                known = find_run(file.stem, uri) is not None
            if not known:
                _set_file_aside(file, f"run {file.stem} is not in the store {uri}", say)
                continue
            log = RunLog(uri, file.stem, package)
            if rest := log.close():
                raise TrackingError(
                    f"MLflow store {uri}: {log.failure or 'no answer yet'}; run {file.stem} still"
                    f" lacks {describe(rest)} (in {_shown(file)}): run `convnet log-pending` again"
                    " once it answers"
                )
            done.append(f"MLflow: run {file.stem} now has {describe(records)}")
    return done


@contextlib.contextmanager
def training_run(
    package: Package, run_id: str | None = None, run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[RunLog]:  # fmt: skip
    """Start a run (or reopen `run_id`) and yield its log; it ends FINISHED, or FAILED on any
    exception, Ctrl-C or SIGTERM. What earlier trainings left pending is logged first."""
    experiment_id, uri = setup(), tracking_uri()
    if any(pending_folder().glob("*.json")):
        try:
            print("\n".join(log_pending(package)))
        except PipelineError as err:  # an earlier run's store, or its folder: training goes on
            print(err)
    client, log = mlflow.MlflowClient(uri), None
    try:
        with held():  # an interrupt held here is raised inside `try`: the run ends FAILED
            with answering(uri):
                run_id = _start(client, experiment_id, run_id, run_name, tags or {})
            log = RunLog(uri, run_id, package)
        yield log
    except BaseException:
        if log is not None:
            log.end("FAILED")
        raise
    log.end("FINISHED")


def _start(
    client: mlflow.MlflowClient, experiment_id: str, run_id: str | None, name: str | None,
    tags: dict[str, str],
) -> str:  # fmt: skip
    """Reopen run `run_id` (RUNNING again) if the store has it, else create one."""
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            print(f"MLflow: run {run_id} is not in this store; starting a new run")
        else:
            client.update_run(run_id, "RUNNING")
            return run_id
    # The tags `mlflow.start_run` adds (user, source, git commit), ours winning.
    run = client.create_run(experiment_id, tags=context_registry.resolve_tags(tags),
                            run_name=name)  # fmt: skip
    return run.info.run_id
