"""The `results` command: the best run per (dataset, model) in the MLflow store, in one table.

"Did I reproduce the paper?" in one command. For each (dataset, model), the FINISHED training
run with the highest 10-crop top-1 (so only runs the evaluate stage has scored; lr-find runs
are left out): its single-crop and 10-crop accuracy, the 10-crop gain, the epochs it trained,
its wall time, device and run, and the published result for that pair beside it with the gap
in points (our 10-crop top-1 / top-5 minus the published one). Markdown or CSV.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from stages.commands import published
from stages.core import tracking
from stages.core.errors import PipelineError
from stages.core.files import atomic_path, output_file

SQLITE = "sqlite:///"


# (CSV column, Markdown header); accuracies and gaps in percent / points.
COLUMNS = [
    ("dataset", "dataset"),
    ("model", "model"),
    ("single_crop_top1", "top-1"),
    ("single_crop_top5", "top-5"),
    ("ten_crop_top1", "10-crop top-1"),
    ("ten_crop_top5", "10-crop top-5"),
    ("ten_crop_gain_top1", "10-crop gain"),
    ("epochs", "epochs"),
    ("wall_seconds", "wall time"),
    ("device", "device"),
    ("run", "run"),
    ("published_top1", "published top-1"),
    ("gap_top1", "gap top-1"),
    ("published_top5", "published top-5"),
    ("gap_top5", "gap top-5"),
]


class NoRuns(PipelineError):
    """The store holds no finished, evaluated training run (matching the filters)."""


@dataclass
class Row:
    """One (dataset, model): its best run's numbers (fractions as logged; None: not logged)."""

    dataset: str
    model: str
    metrics: dict[str, float]
    epochs: int | None
    seconds: float | None
    device: str
    run_name: str
    run_id: str
    params: dict[str, str]  # the run's params as MLflow keeps them (flat, as text)

    @property
    def reference(self) -> published.Reference | None:
        return published.lookup(self.dataset, self.model, self.params)

    def values(self) -> dict[str, float | int | str | None]:
        """The row by CSV column: accuracies in percent, gaps and the gain in points."""
        pct = {k: 100 * v for k, v in self.metrics.items()}
        ref = self.reference
        top1, top5 = pct.get("ten_crop_top1"), pct.get("ten_crop_top5")
        published1, published5 = (ref.top1, ref.top5) if ref else (None, None)
        return {
            "dataset": self.dataset,
            "model": self.model,
            **{k: pct.get(k) for k, _ in COLUMNS[2:7]},
            "epochs": self.epochs,
            "wall_seconds": self.seconds,
            "device": self.device,
            "run": f"{self.run_name} {self.run_id[:8]}".strip(),
            "published_top1": published1,
            "gap_top1": _gap(top1, published1),
            "published_top5": published5,
            "gap_top5": _gap(top5, published5),
        }


def _gap(ours: float | None, published: float | None) -> float | None:
    return None if ours is None or published is None else ours - published


def _store_missing(uri: str) -> bool:
    """True for a sqlite store whose file does not exist (opening it would create one)."""
    return uri.startswith(SQLITE) and not Path(uri[len(SQLITE) :]).exists()


def _finished_runs(uri: str, experiment: str) -> list[Run]:
    """The experiment's FINISHED runs (none when the store or the experiment does not exist)."""
    if _store_missing(uri):
        return []
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        output_format="list",
    )


def best_runs(runs: list[Run], datasets=(), models=()) -> dict[tuple[str, str], Run]:
    """The run with the highest 10-crop top-1 per (dataset, model); ties go to the latest.

    Runs without a 10-crop result in [0, 1] (not evaluated, NaN, infinite) and lr-find runs are left
    out; `datasets` / `models` keep only those named (empty: all).
    """
    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        # An accuracy outside [0, 1] is no result: NaN (which compares false with everything,
        # so it would stay "best" once held) or infinite (MLflow stores it as the largest float).
        if tags.get("kind") == "lr-find" or not 0 <= metrics.get("ten_crop_top1", -1) <= 1:
            continue
        key = (tags.get("dataset", ""), tags.get("model", ""))
        if (datasets and key[0] not in datasets) or (models and key[1] not in models):
            continue
        rank = (metrics["ten_crop_top1"], run.info.start_time or 0)
        held = best.get(key)
        if held is None or rank > (held.data.metrics["ten_crop_top1"], held.info.start_time or 0):
            best[key] = run
    return best


def _row(key: tuple[str, str], run: Run, client: MlflowClient) -> Row:
    """The table's row for `run`: epochs and wall time from its per-epoch `epoch_seconds`."""
    # A resumed run may log an epoch twice (killed between logging and checkpointing): the
    # last value per step counts.
    seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
    params = run.data.params
    if seconds:
        epochs: int | None = max(seconds)
        wall: float | None = sum(seconds.values())
    else:  # no per-epoch timing: the run's own clock (the training's: evaluate and report
        # add to the run without reopening it)
        epochs = int(params["train.epochs"]) if params.get("train.epochs", "").isdigit() else None
        end, start = run.info.end_time, run.info.start_time
        wall = (end - start) / 1000 if end and start else None
    metrics = {k: run.data.metrics[k] for k, _ in COLUMNS[2:7] if k in run.data.metrics}
    return Row(
        key[0], key[1], metrics, epochs, wall, run.data.tags.get("device", ""),
        run.info.run_name or "", run.info.run_id, params,
    )  # fmt: skip


def collect(datasets=(), models=()) -> list[Row]:
    """The best run per (dataset, model) in the store `tracking` points at, sorted by both."""
    uri = tracking.tracking_uri()
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.EXPERIMENT)
    # A store that does not answer is one line within seconds, as in the stages (not after
    # MLflow's ~250 s of HTTP retries).
    with tracking.answering(uri):
        return _collect(uri, experiment, datasets, models)


def _collect(uri: str, experiment: str, datasets: tuple, models: tuple) -> list[Row]:
    best = best_runs(_finished_runs(uri, experiment), datasets, models)
    if not best:
        only = ", ".join(f"{name} {', '.join(v)}" for name, v in
                         (("dataset", datasets), ("model", models)) if v)  # fmt: skip
        raise NoRuns(
            f"no finished runs with 10-crop results in {uri} (experiment {experiment}"
            f"{'; ' + only if only else ''}); `dvc repro` trains and evaluates one"
        )
    client = MlflowClient()
    return [_row(key, best[key], client) for key in sorted(best)]


def duration(seconds: float) -> str:
    """`38 s`, `13 min 47 s`, `11 h 06 min`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _cell(key: str, value: float | int | str | None) -> str:
    if value is None or value == "":
        return ""
    if key.startswith(("gap_", "ten_crop_gain")):
        return f"{value:+.1f}"
    if key == "wall_seconds":
        return duration(float(value))
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[Row]) -> str:
    """The table, then the source of each published result it shows."""
    lines = [
        "| " + " | ".join(header for _, header in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        values = row.values()
        lines.append("| " + " | ".join(_cell(k, values[k]) for k, _ in COLUMNS) + " |")
    notes = [
        f"- {row.dataset} {row.model}: {row.reference.note}; {row.reference.source.cite()}"
        for row in rows
        if row.reference
    ]
    if notes:
        lines += ["", "Published results (gap: our 10-crop minus published, in points):", *notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """One line per row; accuracies in percent and gaps in points to 2 decimals, wall time in
    seconds, empty where nothing was logged or published."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([key for key, _ in COLUMNS])
    for row in rows:
        values = row.values()
        writer.writerow(_csv_value(values[k]) for k, _ in COLUMNS)
    return out.getvalue()


def _csv_value(value: float | int | str | None) -> str | int:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else value


def results(
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    as_csv: bool = False,
    out: Path | None = None,
) -> str:
    """Print the table (Markdown, or CSV with `as_csv`), also to `out` when given; returns it.

    No finished, evaluated run raises NoRuns (one line, exit code 1 in the CLI).
    """
    if out is not None:
        out = output_file(out, "--out")
    rows = collect(tuple(datasets or ()), tuple(models or ()))
    text = to_csv(rows) if as_csv else markdown(rows)
    print(text, end="")
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(text)
    return text
