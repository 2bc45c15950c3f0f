"""The MLflow run a stage writes to, whose store can never cost the stage's work.

`run_log` opens the run at once: a store that does not answer stops the stage there, before any
work, with one line. Every later write (params, metrics, dataset inputs, files, the model, the
run's end) is a `Record` put in a queue that a background thread writes in order, retrying
while the store fails (a sqlite lock, a server restarting): the stage never waits for the store.
At the end the log waits for its queue; if the store has taken nothing for WAIT_SECONDS, what
is left is saved in out/train/mlflow-pending/<run id>.json and the last line says what the run
lacks; `convnet log-pending` (or the next training) logs it. A pending file is checked when
read, record by record: what can never be logged (a field missing, a name leading out of its
folder, a run the store lacks) is set aside in one line, once, instead of being retried and
blamed on the store.

A training and lr-find end their own runs; evaluate and report add to the training's run and
never change its status or end (an interrupt in one stage never changes another's run). Signals
reach only the main thread, so no write of the thread is ever cut half-way by Ctrl-C or SIGTERM;
an interrupted stage queues its run's end as FAILED like any other write (a second Ctrl-C stops
waiting for the store), so a run never stays RUNNING where the store answers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
from matplotlib.figure import Figure
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from stages.core import checkpoint, paths, tracking
from stages.core.errors import Interrupted, PipelineError, held
from stages.core.files import atomic_path, is_inner_path, only_one, write_json
from stages.core.tracking import TrackingError, answering, cause

WAIT_SECONDS = 60  # at the end, how long the store may take no write before the rest is saved
# Errors a retry cannot fix (a value the store rejects, a run deleted meanwhile): the record
# is dropped with a line saying so, instead of blocking the ones after it.
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
# What `RunLog.model` logs, made by stages.engine.serving.package (core imports no engine):
# checkpoint file, its content -> the keyword arguments of `mlflow.models.Model.log`.
Package = Callable[[Path, dict[str, Any]], dict[str, Any]]
# Beside the pending files: what can never be logged, kept for a look instead of being retried.
SET_ASIDE = "set-aside"


def _now() -> int:
    return int(time.time() * 1000)


def _bytes(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _rule(why: str, test: Callable[[Any], object]) -> AfterValidator:
    """A check of a field read from a pending file: `why` (`{}`: the value) it can never be
    logged when `test(value)` is false or raises."""

    def check(value: Any) -> Any:
        with contextlib.suppress(TypeError, ValueError):
            if test(value):
                return value
        raise ValueError(why.format(repr(value)))

    return AfterValidator(check)


# The kinds of Record. A stage makes them with `model_construct` (its own values, unchecked); a
# pending file's are validated strictly, and every name in one stays inside its folder.
class _Record(BaseModel):
    """One write: `what` it holds, in words (per epoch `step` when there is one)."""

    model_config = ConfigDict(extra="forbid")
    what: str
    step: int | None = None


class Batch(_Record):
    """Metrics (at `step`), params and tags."""

    kind: Literal["batch"] = "batch"
    metrics: dict[str, float] = {}
    params: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    time: int = Field(default_factory=_now)

    def write(self, log: RunLog) -> None:
        log.client.log_batch(
            log.run_id, [Metric(k, v, self.time, self.step or 0) for k, v in self.metrics.items()],
            [Param(k, str(v)) for k, v in self.params.items()],
            [RunTag(k, str(v)) for k, v in self.tags.items()],
        )  # fmt: skip


class Input(_Record):
    """A dataset input (`mlflow.data.from_numpy(...).to_dict()`), its `context` e.g. training."""

    kind: Literal["input"] = "input"
    dataset: Annotated[
        dict[str, Any], _rule("its dataset is not an MLflow dataset", lambda d: Dataset(**d))
    ]
    context: str

    def write(self, log: RunLog) -> None:
        tag = InputTag(MLFLOW_DATASET_CONTEXT, self.context)
        log.client.log_inputs(log.run_id, [DatasetInput(Dataset(**self.dataset), [tag])])


class File(_Record):
    """A file at `path` in the run's artifacts, its bytes in base64. The path is relative, of
    plain names: it leads out of neither the artifacts nor the temporary folder it is written to."""

    kind: Literal["file"] = "file"
    path: Annotated[str, _rule("its path {} leads out of the run's artifacts", is_inner_path)]
    content: Annotated[str, _rule("its content is not base64", lambda c: _bytes(c) is not None)]

    def write(self, log: RunLog) -> None:
        if not is_inner_path(self.path):  # made by this process: never checked when read
            raise PipelineError(f"{self.path!r} leads out of the run's artifacts")
        folder, _, name = self.path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(_bytes(self.content))
            log.client.log_artifact(log.run_id, str(Path(tmp) / name), folder or None)


class Model(_Record):
    """Checkpoint `file` (absolute; in a pending file, the copy beside it) as the run's MLflow
    model `<dataset>-<model>`, registered as `convnet-<dataset>-<model>` when `registered`."""

    kind: Literal["model"] = "model"
    file: str
    dataset: str
    model: str
    registered: bool

    def write(self, log: RunLog) -> None:
        """Logs the model (see `RunLog.package`); one line says how to serve it."""
        file = log.file.parent / self.file
        state = checkpoint.load(file)
        if state["mlflow_run_id"] != log.run_id:
            raise PipelineError(f"{file} now holds run {state['mlflow_run_id']}")
        # The model goes to the active experiment and tracking URI, which are global in MLflow.
        mlflow.set_tracking_uri(log.uri)
        mlflow.set_experiment(experiment_id=log.client.get_run(log.run_id).info.experiment_id)
        name = f"{self.dataset}-{self.model}"
        entry = f"convnet-{name}" if self.registered else None  # in the model registry
        content = log.package(file, state)
        content["metadata"] = content.get("metadata", {}) | {"dataset": self.dataset,
                                                             "model": self.model}  # fmt: skip
        # Model.log: mlflow.pyfunc.log_model with a run id (it logs to the active run only).
        info = mlflow.models.Model.log(
            artifact_path=None, name=name, run_id=log.run_id, registered_model_name=entry,
            **content,
        )  # fmt: skip
        version = info.registered_model_version
        uri = f"models:/{entry}/{version}" if entry and version else info.model_uri
        # MLflow's own default store is ./mlflow.db: from the repository root the URI is enough.
        here = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
        store = "" if log.uri == here else f"MLFLOW_TRACKING_URI={shlex.quote(log.uri)} "
        serve = f"`{store}mlflow models serve -m {uri} --env-manager local`"
        print(f"MLflow: model {name} logged as {uri}; serve it with {serve}", flush=True)


class End(_Record):
    """The run's end."""

    kind: Literal["end"] = "end"
    status: Literal["FINISHED", "FAILED", "KILLED"]
    time: int = Field(default_factory=_now)

    def write(self, log: RunLog) -> None:
        log.client.set_terminated(log.run_id, self.status, end_time=self.time)


Record = Annotated[Batch | Input | File | Model | End, Field(discriminator="kind")]
_RECORD: TypeAdapter[Record] = TypeAdapter(Record)


class _Pending(BaseModel):
    """A pending file: its store and its records, each checked on its own (`_checked`)."""

    model_config = ConfigDict(extra="forbid")
    uri: str
    records: list[Any]


def describe(records: list[Record]) -> str:
    """What the records hold: 'the params and tags, the metrics (epochs 4-6, 9) and the model'."""
    steps: dict[str, set[int]] = {}
    for record in records:
        steps.setdefault(record.what, set()).update([] if record.step is None else [record.step])
    parts = [f"{what} ({_epochs(sorted(s))})" if s else what for what, s in steps.items()]
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _epochs(steps: list[int]) -> str:
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    shown = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return f"epoch{'s' if len(steps) > 1 else ''} {shown}"


class RunLog:
    """The writes to MLflow run `run_id` of store `uri`, in order, by a background thread.

    `package` turns a checkpoint into the MLflow model that `model` logs. With a package, the
    records the run left in its pending file earlier are written first; without one (a stage
    that logs no model), that file is left as it is, and what this log leaves goes after it.
    """

    def __init__(self, uri: str, run_id: str, package: Package | None) -> None:
        self.uri, self.run_id, self.package = uri, run_id, package
        self.client = mlflow.MlflowClient(uri)
        self.file = pending_folder() / f"{run_id}.json"
        self.model_copy = self.file.with_suffix(".model.pt")  # model.pt, if its log waits
        self._owns_file = package is not None and self.file.exists()
        kept = _read_pending(self.file, _say) if self._owns_file else None
        self._queue: deque[Record] = deque(kept[1] if kept else [])
        self._cond = threading.Condition()
        self._stopped = False
        self.failure: str | None = None  # the store's last error, until a write succeeds
        self._progress = time.monotonic()  # when a write last succeeded or the queue filled
        self._exporting = False  # the model is being logged: that may take minutes
        self.left: list[Record] = []  # what close() saved as pending
        threading.Thread(target=self._write, name=f"{tracking.THREADS}writer", daemon=True).start()

    # The writes a stage makes; each returns at once.

    def batch(
        self, what: str, step: int | None = None, metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Metrics (at `step`, timed now), params and tags."""
        self._add(Batch.model_construct(what=what, step=step, metrics=metrics or {},
                                        params=params or {}, tags=tags or {}))  # fmt: skip

    def steps(self, key: str) -> set[int] | None:
        """The steps at which the store holds metric `key` now (None: it does not answer)."""
        try:
            with answering(self.uri):
                return {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except TrackingError:
            return None

    def input(self, dataset: mlflow.data.dataset.Dataset, context: str) -> None:
        """A dataset input (`mlflow.data.from_numpy(...)`), e.g. context "training"."""
        self._add(Input.model_construct(what=f"the {context} dataset", dataset=dataset.to_dict(),
                                        context=context))  # fmt: skip

    def artifact(self, path: Path, artifact_path: str | None = None, what: str = "") -> None:
        """A file as it is now (read at once: a later change does not reach the run)."""
        where = f"{artifact_path}/{path.name}" if artifact_path else path.name
        self._file(where, path.read_bytes(), what or path.name)

    def artifacts(self, folder: Path, artifact_path: str) -> None:
        """Each file of `folder` (not its subfolders) as it is now, under `artifact_path`."""
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            self.artifact(path, artifact_path, f"the {artifact_path} files")

    def figure(self, fig: Figure, artifact_file: str, step: int | None = None) -> None:
        """A matplotlib figure as a PNG artifact (what `mlflow.log_figure` writes)."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        what = f"the {artifact_file.rpartition('/')[0] or artifact_file}"
        self._file(artifact_file, buffer.getvalue(), what, step)

    def model(self, file: Path, dataset: str, model: str, register: bool) -> None:
        """Checkpoint `file` as the run's MLflow model `<dataset>-<model>` (see `Model`)."""
        self._add(Model.model_construct(what="the model", file=str(file.resolve()),
                                        dataset=dataset, model=model,
                                        registered=register))  # fmt: skip

    def _file(self, path: str, content: bytes, what: str, step: int | None = None) -> None:
        encoded = base64.b64encode(content).decode()
        self._add(File.model_construct(what=what, step=step, path=path, content=encoded))

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
                record.write(self)
                error = None
            except Exception as err:  # noqa: BLE001 - the store's failure, whatever it is
                error = err
            with self._cond:
                self._exporting = False
                if self._stopped:  # given up meanwhile: the record is saved as pending too
                    return
                if error is not None and not _refused(error):
                    if self.failure is None:
                        print(f"MLflow: the store {self.uri} does not answer ({cause(error)});"
                              " its writes wait and are retried in the background",
                              flush=True)  # fmt: skip
                    self.failure = cause(error)
                    self._cond.wait(delay)  # a stop wakes it
                    delay = min(2 * delay, 10.0)
                    continue
                if error is not None:
                    print(f"MLflow: {record.what} cannot be written ({cause(error)}); dropped",
                          flush=True)  # fmt: skip
                elif self.failure is not None:
                    print("MLflow: the store answers again; the waiting writes follow", flush=True)
                    self.failure = None
                self._queue.popleft()
                self._progress, delay = time.monotonic(), 1.0
                self._cond.notify_all()

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
                rest = self.left = list(self._queue)
                self._cond.notify_all()
            if rest:
                self._keep_model(rest)
                # Another log's records for this run (the training's, when evaluate leaves
                # some too) were made first: they stay first.
                theirs = not self._owns_file and self.file.exists()
                kept = _read_pending(self.file, _say) if theirs else None
                save_pending(self.file, self.uri, (kept[1] if kept else []) + rest)
            elif self._owns_file:
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
        for record in (r for r in rest if isinstance(r, Model)):
            source = self.file.parent / record.file  # absolute, or already the copy
            if source != self.model_copy and source.is_file():
                with atomic_path(self.model_copy) as tmp:
                    shutil.copyfile(source, tmp)
                record.file = self.model_copy.name

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
                    print(f"MLflow: waiting up to {WAIT_SECONDS} s for the store to take the last"
                          f" {len(self._queue)} writes (Ctrl-C stops waiting)",
                          flush=True)  # fmt: skip
                    told = True
                self._cond.wait(1.0)

    def finish(self, status: str | None) -> None:
        """End the run FINISHED or FAILED (None: leave it as it is), then `close`; if the store
        did not take everything, the last line says what the run lacks and how to log it."""
        if status:
            self._add(End.model_construct(what=f"its end ({status})", status=status))
        try:
            self.close()
        finally:
            if self.left:
                print(f"MLflow: run {self.run_id} lacks {describe(self.left)}: the store {self.uri}"
                      f" did not take them ({self.failure or 'no answer yet'}); they wait in"
                      f" {_shown(self.file)}: `convnet log-pending` logs them once the store"
                      " answers", flush=True)  # fmt: skip


def _shown(path: Path) -> Path:
    """`path` relative to the current directory when it is under it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _refused(err: Exception) -> bool:
    return isinstance(err, PipelineError) or getattr(err, "error_code", None) in REFUSED


def pending_folder() -> Path:
    """out/train/mlflow-pending of the main repository (a queued experiment's own workspace
    is deleted once it ends)."""
    return tracking.root() / paths.MLFLOW_PENDING


def _say(line: str) -> None:
    print(f"MLflow: {line}", flush=True)


def _why(err: ValidationError) -> str:
    """The first thing a validation found wrong, in one line (where: what)."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "value_error":  # a _rule's own words
        return str(first["ctx"]["error"])
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]


def _checked(raw: Any, run_id: str) -> Record | str:
    """Record `raw` of run `run_id`'s pending file, or why it can never be logged."""
    try:
        record = _RECORD.validate_python(raw, strict=True)
    except ValidationError as err:
        return _why(err)
    if isinstance(record, Model) and record.file != f"{run_id}.model.pt":
        return f"its checkpoint {record.file!r} is not the copy beside the pending file"
    return record


def _aside(file: Path) -> Path:
    """A new name in the set-aside folder for what comes from `file`."""
    folder = file.parent / SET_ASIDE
    folder.mkdir(exist_ok=True)
    target, n = folder / file.name, 1
    while target.exists():
        n += 1
        target = folder / f"{file.stem}.{n}{file.suffix}"
    return target


def _set_aside(file: Path, why: str, say: Callable[[str], None]) -> None:
    """Move a pending file (and its model's copy) to the set-aside folder, saying why, once."""
    target = _aside(file)
    os.replace(file, target)
    with contextlib.suppress(FileNotFoundError):
        os.replace(file.with_suffix(".model.pt"), target.with_suffix(".model.pt"))
    say(f"{_shown(file)}: {why}; set aside in {_shown(target)}")


def _read_pending(file: Path, say: Callable[[str], None]) -> tuple[str, list[Record]] | None:
    """A pending file's store URI and records; the records that can never be logged are set
    aside first (the whole file when it is not a pending log at all), each said in one line.
    None when nothing of the file is left to log."""
    try:
        saved = _Pending.model_validate_json(file.read_bytes(), strict=True)
    except (OSError, ValidationError) as err:
        why = _why(err) if isinstance(err, ValidationError) else cause(err)
        _set_aside(file, f"not a pending MLflow log ({why})", say)
        return None
    uri = saved.uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # Logging to it would make a new, empty store wherever the URI points.
        _set_aside(file, f"its store {uri} does not exist (moved or deleted)", say)
        return None
    checked = [_checked(raw, file.stem) for raw in saved.records]
    if bad := [i for i, record in enumerate(checked) if isinstance(record, str)]:
        target = _aside(file)
        write_json(target, {"uri": uri, "records": [saved.records[i] for i in bad],
                            "why": {str(i + 1): checked[i] for i in bad}})  # fmt: skip
        numbers = ", ".join(str(i + 1) for i in bad)
        say(f"{_shown(file)}: record{'s' if len(bad) > 1 else ''} {numbers} of {len(checked)} can"
            f" never be logged (record {bad[0] + 1}: {checked[bad[0]]}); set aside in"
            f" {_shown(target)}")  # fmt: skip
        checked = [record for record in checked if not isinstance(record, str)]
        if not checked:
            file.unlink()
            file.with_suffix(".model.pt").unlink(missing_ok=True)
            return None
        save_pending(file, uri, checked)
    return uri, checked


def save_pending(file: Path, uri: str, records: list[Record]) -> None:
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps({"uri": uri, "records": [r.model_dump() for r in records]}))


def log_pending(package: Package, say: Callable[[str], None] = _say) -> list[str]:
    """Write what earlier runs left in out/train/mlflow-pending/ to them (the command `convnet
    log-pending`); returns a line per run. What can never be logged is set aside (see
    SET_ASIDE), said through `say`. TrackingError if a store still fails; BusyError while
    another process logs them (a queued experiment starting meanwhile would log them twice)."""
    folder = pending_folder()
    if not folder.is_dir():
        return []
    done = []
    with only_one(folder, "logging these to MLflow"):
        for file in sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime):
            if (read := _read_pending(file, say)) is None:
                continue
            uri, records = read
            with answering(uri):  # the store answers, or one line at once
                if tracking.find_run(file.stem, uri) is None:
                    _set_aside(file, f"run {file.stem} is not in the store {uri}", say)
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
def run_log(
    package: Package | None, run_id: str | None = None, run_name: str | None = None,
    tags: dict[str, str] | None = None, attach: bool = False,
) -> Iterator[RunLog]:  # fmt: skip
    """The log of the run a stage writes to, opened now (see the module's docstring).

    Run `run_id` reopened (RUNNING again) when the store holds it, else a new run named
    `run_name` with `tags`; it ends FINISHED, or FAILED on any exception, Ctrl-C or SIGTERM.
    With `attach` (evaluate and report add to the training's run), run `run_id` is written to
    as it is and never reopened or ended: its status and end stay the training's whatever
    happens here; a run the store lacks is replaced by a new one, ended as above. With a
    `package` (a training), what earlier runs left pending is logged first.
    """
    experiment_id, uri = tracking.setup(), tracking.tracking_uri()
    if package is not None and any(pending_folder().glob("*.json")):
        try:
            print("\n".join(log_pending(package)))
        except PipelineError as err:  # an earlier run's store, or its folder: the stage goes on
            print(err)
    client, log, ends = mlflow.MlflowClient(uri), None, True
    try:
        with held():  # an interrupt held here is raised inside `try`: the run ends FAILED
            with answering(uri):
                if run_id and tracking.find_run(run_id, uri) is not None:
                    ends = not attach
                    if ends:
                        client.update_run(run_id, "RUNNING")
                else:
                    if run_id:
                        print(
                            f"MLflow: run {run_id} is not in the store {uri}; logging to a new run"
                        )
                    # The tags `mlflow.start_run` adds (user, source, git commit), ours winning.
                    tags = context_registry.resolve_tags(tags or {})
                    run_id = client.create_run(
                        experiment_id, tags=tags, run_name=run_name
                    ).info.run_id
            log = RunLog(uri, run_id, package)
        yield log
    except BaseException:
        if log is not None:
            with contextlib.suppress(Interrupted):  # the exception that stopped the stage is told
                log.finish("FAILED" if ends else None)
        raise
    log.finish("FINISHED" if ends else None)
