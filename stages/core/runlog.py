"""The MLflow run a stage writes to, whose store can never cost the stage's work.

`run_log` opens the run at once: a store that does not answer stops the stage there, with one
line. Every later write (params, metrics, dataset inputs, files, the model, the run's end) is a
record (stages.core.pending) that a background thread writes in order, retrying while the store
fails (a sqlite lock, a server restarting): the stage never waits for the store. What the store
has not taken WAIT_SECONDS after it last took something, once the stage ends, waits in a pending
file, and the last line says what the run lacks. (MLflow's own asynchronous logging drops a
batch the store fails on, and carries no files, models or run end.)

A training and lr-find end their own runs FINISHED, or FAILED on any error, Ctrl-C or SIGTERM
(queued like any write; a second Ctrl-C stops waiting for the store); evaluate and report add to
the training's run and never change its status. Signals reach only the main thread, so no write
is cut half-way. A training killed outright leaves its run RUNNING: the next one ends it KILLED.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking.context import registry as context_registry

from stages.core import pending, tracking
from stages.core.errors import Interrupted, PipelineError, held
from stages.core.files import atomic_path, only_one
from stages.core.pending import Batch, End, File, Input, Model, Record, describe, shown
from stages.core.tracking import TrackingError, answering, cause

WAIT_SECONDS = 60  # at the end, how long the store may take no write before the rest is saved
# Errors a retry cannot fix (a value the store rejects, a run deleted meanwhile): the record is
# dropped with a line saying so instead of blocking the ones after it.
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
# stages.engine.serving.package (core imports no engine): a checkpoint file and its content ->
# the keyword arguments of `mlflow.models.Model.log` that log it as the run's model.
Package = Callable[[Path, dict[str, Any]], dict[str, Any]]


def _say(line: str) -> None:
    print(f"MLflow: {line}", flush=True)


def _refused(err: Exception) -> bool:
    return isinstance(err, PipelineError) or getattr(err, "error_code", None) in REFUSED


class RunLog:
    """The writes to MLflow run `run_id` of store `uri` (each method returns at once), made in
    order by a background thread. With a `package` (a training, or log-pending), what the run
    left pending earlier goes first; without one, that file is left as it is and what this log
    leaves goes after it."""

    def __init__(self, uri: str, run_id: str, package: Package | None) -> None:
        self.uri, self.run_id, self.package = uri, run_id, package
        self.client = mlflow.MlflowClient(uri)
        self.file = pending.folder() / f"{run_id}.json"
        self.model_copy = self.file.with_suffix(".model.pt")  # model.pt, if its log waits
        kept = pending.read(self.file, _say) if package and self.file.exists() else None
        self._queue: deque[Record] = deque(kept[1] if kept else [])
        self._cond = threading.Condition()
        self._stopped = self._exporting = False  # exporting: a model, which may take minutes
        self.failure: str | None = None  # the store's last error, until a write succeeds
        self._progress = time.monotonic()  # when a write last succeeded or the queue filled
        self.left: list[Record] = []  # what close() saved as pending
        threading.Thread(target=self._write, name=f"{tracking.THREADS}writer", daemon=True).start()

    def batch(
        self, what: str, step: int | None = None, metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Metrics (at `step`, timed now), params and tags."""
        self._add(Batch.model_construct(what=what, step=step, metrics=metrics or {},
                                        params=params or {}, tags=tags or {}))  # fmt: skip

    def input(self, dataset: mlflow.data.dataset.Dataset, context: str) -> None:
        """A dataset input (`mlflow.data.from_numpy(...)`), e.g. context "training"."""
        self._add(Input.model_construct(what=f"the {context} dataset", dataset=dataset.to_dict(),
                                        context=context))  # fmt: skip

    def artifact(self, path: Path, folder: str | None = None, what: str = "") -> None:
        """A file as it is now (read at once: a later change does not reach the run)."""
        self._file(f"{folder}/{path.name}" if folder else path.name, path.read_bytes(),
                   what or path.name)  # fmt: skip

    def artifacts(self, folder: Path, artifact_path: str) -> None:
        """Each file of `folder` (not its subfolders) as it is now, under `artifact_path`."""
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            self.artifact(path, artifact_path, f"the {artifact_path} files")

    def figure(self, fig: Any, name: str, step: int | None = None) -> None:
        """A matplotlib figure as a PNG artifact (what `mlflow.log_figure` writes)."""
        fig.savefig(buffer := io.BytesIO(), format="png")
        self._file(name, buffer.getvalue(), f"the {name.rpartition('/')[0] or name}", step)

    def model(self, file: Path, dataset: str, model: str, register: bool) -> None:
        """Checkpoint `file` as the run's MLflow model `<dataset>-<model>`, registered as
        `convnet-<dataset>-<model>` with `register`."""
        self._add(Model.model_construct(what="the model", file=str(file.resolve()), model=model,
                                        dataset=dataset, registered=register))  # fmt: skip

    def steps(self, key: str) -> set[int] | None:
        """The steps at which the store holds metric `key` now (None: it does not answer)."""
        with contextlib.suppress(TrackingError), answering(self.uri):
            return {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return None

    def _file(self, path: str, content: bytes, what: str, step: int | None = None) -> None:
        encoded = base64.b64encode(content).decode()
        self._add(File.model_construct(what=what, step=step, path=path, content=encoded))

    def _add(self, record: Record) -> None:
        with held(), self._cond:  # never cut while holding the lock the thread needs
            if not self._queue:
                self._progress = time.monotonic()
            self._queue.append(record)
            self._cond.notify_all()

    def _write(self) -> None:
        """Write the records in order; after a failure wait (1 s, doubling up to 10 s) and try
        the same record again."""
        delay = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                record, self._exporting = self._queue[0], isinstance(self._queue[0], Model)
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
                        _say(f"the store {self.uri} does not answer ({cause(error)}); its writes"
                             " wait and are retried in the background")  # fmt: skip
                    self.failure = cause(error)
                    self._cond.wait(delay)  # a stop wakes it
                    delay = min(2 * delay, 10.0)
                    continue
                if error is not None:
                    _say(f"{record.what} cannot be written ({cause(error)}); dropped")
                elif self.failure is not None:
                    _say("the store answers again; the waiting writes follow")
                    self.failure = None
                self._queue.popleft()
                self._progress, delay = time.monotonic(), 1.0
                self._cond.notify_all()

    def close(self) -> list[Record]:
        """Wait until every record is written or the store has taken none for WAIT_SECONDS (a
        model being logged may take longer), then stop the thread; what is left goes to the
        pending file and is returned. An interrupt stops the waiting, and is raised once the file
        is saved."""
        stopped, began, told = None, time.monotonic(), False
        try:
            with self._cond:
                while self._queue:
                    idle = 0.0 if self._exporting else time.monotonic() - max(self._progress, began)
                    if idle >= WAIT_SECONDS:
                        break
                    if not told and (self.failure or idle >= 5):
                        _say(f"waiting up to {WAIT_SECONDS} s for the store to take the last"
                             f" {len(self._queue)} writes (Ctrl-C stops waiting)")  # fmt: skip
                        told = True
                    self._cond.wait(1.0)
        except Interrupted as err:
            stopped = err
        with held():
            with self._cond:
                self._stopped = True
                rest = self.left = list(self._queue)
                self._cond.notify_all()
            if rest:
                # A waiting model is logged from a copy: out/train/model.pt may be a new
                # training's by then, or (a queued experiment) gone with its workspace.
                for record in (r for r in rest if isinstance(r, Model)):
                    source = self.file.parent / record.file  # absolute, or already the copy
                    if source != self.model_copy and source.is_file():
                        with atomic_path(self.model_copy) as tmp:
                            shutil.copyfile(source, tmp)
                        record.file = self.model_copy.name
                # Another log's records for this run (the training's, before evaluate's) go first.
                theirs = not self.package and self.file.exists()
                kept = pending.read(self.file, _say) if theirs else None
                pending.save(self.file, self.uri, (kept[1] if kept else []) + rest)
            elif self.package:
                self.file.unlink(missing_ok=True)
                self.model_copy.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # the folder goes once it is empty
                    self.file.parent.rmdir()
        if stopped is not None:
            raise stopped
        return rest

    def finish(self, status: str | None) -> None:
        """End the run FINISHED or FAILED (None: leave it as it is), then `close`; if the store
        did not take everything, the last line says what the run lacks and how to log it."""
        if status:
            self._add(End.model_construct(what=f"its end ({status})", status=status))
        try:
            self.close()
        finally:
            if self.left:
                _say(f"run {self.run_id} lacks {describe(self.left)}: the store {self.uri} did"
                     f" not take them ({self.failure or 'no answer yet'}); they wait in"
                     f" {shown(self.file)}: `convnet log-pending` logs them once the store"
                     " answers")  # fmt: skip


def log_pending(package: Package, say: Callable[[str], None] = _say) -> list[str]:
    """Write what earlier runs left in out/train/mlflow-pending/ (`convnet log-pending`); a line
    per run. What can never be logged is set aside, said through `say`. TrackingError if a store
    still fails; BusyError while another process logs them."""
    folder, done = pending.folder(), []
    if not folder.is_dir():
        return []
    with only_one(folder, "logging these to MLflow"):  # a queued experiment may start meanwhile
        for file in sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime):
            if (read := pending.read(file, say)) is None:
                continue
            uri, records = read
            with answering(uri):  # the store answers, or one line at once
                if tracking.find_run(file.stem, uri) is None:
                    pending.set_aside(file, f"run {file.stem} is not in the store {uri}", say)
                    continue
            if rest := (log := RunLog(uri, file.stem, package)).close():
                raise TrackingError(
                    f"MLflow store {uri}: {log.failure or 'no answer yet'}; run {file.stem} still"
                    f" lacks {describe(rest)} (in {shown(file)}): run `convnet log-pending` again"
                    " once it answers"
                )
            done.append(f"MLflow: run {file.stem} now has {describe(records)}")
    return done


@contextlib.contextmanager
def run_log(
    package: Package | None, run_id: str | None = None, run_name: str | None = None,
    tags: dict[str, str] | None = None, attach: bool = False, open_run: Path | None = None,
) -> Iterator[RunLog]:  # fmt: skip
    """The log of the run a stage writes to, opened now: run `run_id` reopened (RUNNING again)
    when the store holds it, else a new run named `run_name` with `tags`. With `attach`
    (evaluate, report), run `run_id` is written to as it is, never reopened or ended. With a
    `package` (a training), what earlier runs left pending is logged first. `open_run` (in the
    out/train a training holds) names the run while it is open: a run it names at the next
    start was killed outright, and is ended KILLED if it is still RUNNING."""
    experiment_id, uri = tracking.setup(), tracking.tracking_uri()
    if package is not None and any(pending.folder().glob("*.json")):
        try:
            print("\n".join(log_pending(package)))
        except PipelineError as err:  # an earlier run's store, or its folder: the stage goes on
            print(err)
    client, log, ends = mlflow.MlflowClient(uri), None, True
    try:
        with held():  # an interrupt held here is raised inside `try`: the run ends FAILED
            with answering(uri):
                killed = open_run.read_text() if open_run and open_run.exists() else ""
                old = tracking.find_run(killed, uri) if killed not in ("", run_id) else None
                if old and old.info.status == "RUNNING":
                    client.set_terminated(killed, "KILLED")
                    _say(f"run {killed}, left RUNNING by a training killed outright: KILLED")
                if run_id and tracking.find_run(run_id, uri) is not None:
                    if ends := not attach:
                        client.update_run(run_id, "RUNNING")
                else:
                    if run_id:
                        _say(f"run {run_id} is not in the store {uri}; logging to a new run")
                    # The tags `mlflow.start_run` adds (user, source, git commit), ours winning.
                    tags = context_registry.resolve_tags(tags or {})
                    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
                    run_id = run.info.run_id
            log = RunLog(uri, run_id, package)
            if open_run is not None:  # a failure to write it ends the run FAILED
                open_run.write_text(run_id)
        yield log
    except BaseException:
        if log is not None:
            with contextlib.suppress(Interrupted):  # the exception that stopped the stage is told
                log.finish("FAILED" if ends else None)
        raise
    else:
        log.finish("FINISHED" if ends else None)
    finally:
        if log is not None and open_run is not None:
            open_run.unlink(missing_ok=True)  # its end is written, or waits in a pending file
