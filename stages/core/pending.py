"""What a run's log writes (a record: each kind, and how it is written to the run), and the file
that keeps what the store did not take.

What the store has not taken when a stage ends waits in out/train/mlflow-pending/<run id>.json (a
waiting model's checkpoint copied beside it, <run id>.model.pt) until `convnet log-pending` or the
next training logs it. A pending file is checked record by record when read: what can never be
logged (a field missing, a path leading out of its folder, a store that is gone) is set aside in
set-aside/ beside it, said in one line once, instead of being retried and blamed on the store.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from stages.core import checkpoint, paths, tracking
from stages.core.errors import PipelineError
from stages.core.files import atomic_path, is_inner_path, is_plain_name, write_json


def _now() -> int:
    return int(time.time() * 1000)


def _dataset(fields: dict[str, Any]) -> Dataset:
    return Dataset(**fields)


def _rule(why: str, test: Callable[[Any], object]) -> AfterValidator:
    """A value read from a pending file can never be logged (`why`; `{}`: the value) unless
    `test(value)` is true."""

    def check(value: Any) -> Any:
        with contextlib.suppress(TypeError, ValueError):
            if test(value):
                return value
        raise ValueError(why.format(repr(value)))

    return AfterValidator(check)


# The records: what each write holds, and how it is written to the run of `log` (a
# stages.core.runlog.RunLog). A stage makes them with `model_construct` (its own values); a
# pending file's are validated.
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    what: str  # in words: "the metrics", "history.csv", "its end (FINISHED)"
    step: int | None = None  # the epoch, when there is one


class Batch(_Record):
    kind: Literal["batch"] = "batch"
    metrics: dict[str, float] = {}
    params: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    time: int = Field(default_factory=_now)

    def write(self, log: Any) -> None:
        metrics = [Metric(k, v, self.time, self.step or 0) for k, v in self.metrics.items()]
        params = [Param(k, str(v)) for k, v in self.params.items()]
        log.client.log_batch(log.run_id, metrics, params, [RunTag(k, str(v)) for k, v in
                                                           self.tags.items()])  # fmt: skip


class Input(_Record):  # a dataset input (`mlflow.data.from_numpy(...).to_dict()`)
    kind: Literal["input"] = "input"
    dataset: Annotated[dict[str, Any], _rule("its dataset is no MLflow dataset", _dataset)]
    context: str  # training, validation

    def write(self, log: Any) -> None:
        tag = InputTag(MLFLOW_DATASET_CONTEXT, self.context)
        log.client.log_inputs(log.run_id, [DatasetInput(Dataset(**self.dataset), [tag])])


class File(_Record):  # a file at `path` (relative, plain names) in the artifacts, in base64
    kind: Literal["file"] = "file"
    path: Annotated[str, _rule("its path {} leads out of the run's artifacts", is_inner_path)]
    content: Annotated[str, _rule("its content is not base64", lambda c: decode(c) is not None)]

    def write(self, log: Any) -> None:
        folder, _, name = self.path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(decode(self.content))
            log.client.log_artifact(log.run_id, str(Path(tmp) / name), folder or None)


class Model(_Record):  # a checkpoint as the run's MLflow model `<dataset>-<model>`
    kind: Literal["model"] = "model"
    # Absolute; in a pending file, the copy beside it.
    file: Annotated[str, _rule("its checkpoint {} is not the copy beside the pending file",
                               lambda f: is_plain_name(f) and f.endswith(".model.pt"))]  # fmt: skip
    dataset: str
    model: str
    registered: bool  # as convnet-<dataset>-<model>

    def write(self, log: Any) -> None:
        """Log the model `log.package` describes; one line says how to serve it."""
        file = log.file.parent / self.file  # absolute, or the copy beside the pending file
        if (state := checkpoint.load(file))["mlflow_run_id"] != log.run_id:
            raise PipelineError(f"{file} now holds run {state['mlflow_run_id']}")
        # A model goes to the active experiment and tracking URI, which are global in MLflow.
        mlflow.set_tracking_uri(log.uri)
        mlflow.set_experiment(experiment_id=log.client.get_run(log.run_id).info.experiment_id)
        name, content = f"{self.dataset}-{self.model}", log.package(file, state)
        content["metadata"] |= {"dataset": self.dataset, "model": self.model}
        entry = f"convnet-{name}" if self.registered else None  # in the model registry
        info = mlflow.models.Model.log(  # pyfunc.log_model would log to the active run only
            artifact_path=None, name=name, run_id=log.run_id, registered_model_name=entry,
            **content,
        )  # fmt: skip
        version = info.registered_model_version
        uri = f"models:/{entry}/{version}" if entry and version else info.model_uri
        # MLflow's own default store is ./mlflow.db: from the repository root the URI is enough.
        here = log.uri == f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
        store = "" if here else f"MLFLOW_TRACKING_URI={shlex.quote(log.uri)} "
        print(f"MLflow: model {name} logged as {uri}; serve it with `{store}mlflow models serve"
              f" -m {uri} --env-manager local`", flush=True)  # fmt: skip


class End(_Record):
    kind: Literal["end"] = "end"
    status: Literal["FINISHED", "FAILED", "KILLED"]
    time: int = Field(default_factory=_now)

    def write(self, log: Any) -> None:
        log.client.set_terminated(log.run_id, self.status, end_time=self.time)


Record = Annotated[Batch | Input | File | Model | End, Field(discriminator="kind")]
_RECORD: TypeAdapter[Record] = TypeAdapter(Record)


class _Pending(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    records: list[Any]  # each checked on its own


def decode(content: str) -> bytes:
    return base64.b64decode(content, validate=True)


def folder() -> Path:
    """out/train/mlflow-pending of the main repository (a queued experiment's own workspace is
    deleted once it ends)."""
    return tracking.root() / paths.MLFLOW_PENDING


def shown(path: Path) -> Path:
    """`path` relative to the current directory when it is under it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def describe(records: list[Record]) -> str:
    """What the records hold: 'the params and tags, the metrics (epochs 4-6) and the model'."""
    steps: dict[str, set[int]] = {}
    for record in records:
        steps.setdefault(record.what, set()).update([] if record.step is None else [record.step])
    parts = [f"{what} ({_epochs(s)})" if s else what for what, s in steps.items()]
    return ", ".join(parts[:-1]) + " and " * (len(parts) > 1) + parts[-1]


def _epochs(steps: set[int]) -> str:
    """'epoch 4', 'epochs 4-6', 'epochs 4-9 (5 of them)'."""
    first, last = min(steps), max(steps)
    gaps = f" ({len(steps)} of them)" if len(steps) <= last - first else ""
    return f"epoch {first}" if first == last else f"epochs {first}-{last}{gaps}"


def save(file: Path, uri: str, records: list[Record]) -> None:
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps({"uri": uri, "records": [r.model_dump() for r in records]}))


def _why(err: Exception) -> str:
    """What a read or a validation found wrong first, in one line."""
    if not isinstance(err, ValidationError):
        return tracking.cause(err)
    first = err.errors(include_url=False)[0]
    if first["type"] == "value_error":  # a _rule's own words
        return str(first["ctx"]["error"])
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]


def set_aside(file: Path, why: str, say: Callable[[str], None], bad: Any = None) -> None:
    """Put `bad` (None: the whole file, and its model's copy) in the set-aside folder beside
    `file`, under a new name, saying `why` once."""
    (aside := file.parent / "set-aside").mkdir(exist_ok=True)
    target, n = aside / file.name, 1
    while target.exists():
        n += 1
        target = aside / f"{file.stem}.{n}{file.suffix}"
    if bad is not None:
        write_json(target, bad)
    else:
        os.replace(file, target)
        with contextlib.suppress(FileNotFoundError):
            os.replace(file.with_suffix(".model.pt"), target.with_suffix(".model.pt"))
    say(f"{shown(file)}: {why}; set aside in {shown(target)}")


def read(file: Path, say: Callable[[str], None]) -> tuple[str, list[Record]] | None:
    """A pending file's store and records, once what can never be logged is set aside; None when
    nothing is left to log."""
    try:
        saved = _Pending.model_validate_json(file.read_bytes(), strict=True)
    except (OSError, ValidationError) as err:
        return set_aside(file, f"not a pending MLflow log ({_why(err)})", say)
    uri, db = saved.uri, Path(saved.uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not db.exists():  # logging would make a new, empty store
        return set_aside(file, f"its store {uri} does not exist (moved or deleted)", say)
    records, why = [], {}
    for i, raw in enumerate(saved.records, 1):
        try:
            records.append(_RECORD.validate_python(raw, strict=True))
        except ValidationError as err:
            why[i] = _why(err)
    if why:
        bad = {"uri": uri, "records": [saved.records[i - 1] for i in why], "why": why}
        first = next(iter(why))
        set_aside(file, f"record{'s' * (len(why) > 1)} {', '.join(map(str, why))} of"
                  f" {len(saved.records)} can never be logged (record {first}: {why[first]})",
                  say, bad)  # fmt: skip
    if not records:
        file.unlink()
        file.with_suffix(".model.pt").unlink(missing_ok=True)
        return None
    if why:
        save(file, uri, records)
    return uri, records
