"""The command line: one thin command per stage (`convnet train` == `python -m stages train`).

Each stage command loads and validates params.yaml once (plus `--set key=value` overrides, the
same syntax as `dvc exp run -S`) and calls the stage function. Errors a user can cause end with
one line on stderr and a non-zero exit: 2 for bad parameters, 1 for missing or bad data, 128 +
the signal number for Ctrl-C (130) and SIGTERM. Each command imports what it runs only when it
runs, so a bad value is refused before torch and MLflow are imported.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from stages.core.errors import Interrupted, ParamsError, PipelineError, on_signal
from stages.params import Params, compose, conf_dir, drift, load, read, validate, yaml_text
from stages.params.registries import check as registries

app = typer.Typer(
    help="Train convolutional networks from scratch: download -> preprocess -> train -> evaluate."
    " Normally driven by `dvc repro`; each command runs one stage with params.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # keeps `dvc queue logs` readable
)

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameter file to read.")
SET = typer.Option(
    [],
    "--set",
    "-S",
    help="Override a parameter as `dvc exp run -S` does: -S train.epochs=3 changes that value"
    " of params.yaml; -S model=mlp (or dataset=, recipe=) composes conf/ with that choice.",
)


def _guard(action: Callable[[], Any]) -> None:
    """Run a command: user errors become one line on stderr and the documented exit code."""
    try:
        action()
    except ParamsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except PipelineError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(128 + err.signum) from None
    except OSError as err:  # a write the system refuses where no result's name was at hand
        from stages.core.files import is_write_error, write_failure

        if not is_write_error(err):
            raise
        typer.echo(f"error: {write_failure(err)}", err=True)
        raise typer.Exit(1) from None


def _run(stage: Callable[[Params], Any], params: Path, overrides: list[str]) -> None:
    """Load and check params.yaml (+ overrides), then run `stage` under `_guard`."""

    def action() -> None:
        p = load(params, overrides, registries)  # its errors name the file
        _note_drift(params, p, overrides)
        stage(p)

    _guard(action)


def _note_drift(params: Path, p: Params, overrides: list[str]) -> None:
    """One line when params.yaml holds values conf/ does not give (a hand edit, or an earlier
    `dvc exp run -S`): the next `dvc exp run` recomposes params.yaml from conf/ without them.
    Said outside experiments only: inside one, DVC has just composed params.yaml."""
    if overrides or os.environ.get("DVC_EXP_NAME"):
        return
    keys = drift(params, p)
    if keys:
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        typer.echo(
            f"note: {params} differs from conf/ at {shown}; `dvc repro` runs it as it stands,"
            " `dvc exp run` recomposes it from conf/ without them (edit conf/ to keep them)",
            err=True,
        )


# The stages, in pipeline order: `convnet NAME` runs the function NAME of stages/NAME.py, the
# module dvc.yaml's `python -m stages NAME` names (tools/dvc_deps.py lists its imports).
STAGES = {
    "inputs": "Make sure the data folder (download.data_dir) exists, with a README if it is new."
    " First in dvc.yaml, it depends on every param: a bad value stops the pipeline here.",
    "download": "Fetch the raw files of `dataset` into out/raw/ (embedded sets need no network).",
    "preprocess": "Decode out/raw/ into packed uint8 arrays, a validation split and the mean"
    " image.",
    "train": "Train `model` and write out/train/model.pt; logs one MLflow run.",
    "evaluate": "Single-crop and 10-crop accuracy, confusion matrix, metrics.json.",
    "report": "Saliency, filters, augmentation preview, curves, confused pairs -> out/report/ +"
    " MLflow.",
}


def _stage_command(name: str) -> Callable[..., None]:
    def command(params: Path = PARAMS, set_: list[str] = SET) -> None:
        def stage(p: Params) -> Any:  # imported once the params are known to be good
            return getattr(importlib.import_module(f"stages.{name}"), name)(p)

        _run(stage, params, set_)

    return command


for _name, _help in STAGES.items():
    app.command(_name, help=_help)(_stage_command(_name))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (any size and mode)."),
    checkpoint: Path = typer.Option(Path("out/train/model.pt"), help="Checkpoint to use."),
    top: int = typer.Option(5, help="How many classes to print per image."),
    crops: int = typer.Option(10, help="1 (centre crop) or 10 (corners, centre, mirrors)."),
    saliency: Path | None = typer.Option(
        None, help="Also write the picture with SmoothGrad saliency maps here."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Top-k classes with probabilities for each image file, from the checkpoint alone."""
    from stages.commands.predict import predict as command

    _guard(lambda: command(images, checkpoint, top, crops, saliency, device))


@app.command()
def export(
    formats: list[str] = typer.Option(
        ["onnx", "exported-program"],
        "--format",
        "-f",
        help="onnx (model.onnx, for onnxruntime) or exported-program (model.pt2, for"
        " torch.export.load); repeat for both (the default).",
    ),
    checkpoint: Path = typer.Option(Path("out/train/model.pt"), help="Checkpoint to export."),
    out: Path = typer.Option(Path("out/export"), help="Folder to write the files into."),
    crops: int = typer.Option(
        10, help="1 (centre crop) or 10 (corners, centre, mirrors; softmax averaged), as predict."
    ),
) -> None:
    """Write the model as files that run without this project (ONNX, torch.export): uint8 RGB
    images (batch, S, S, 3) in, S the training images' size (32 for digits), class
    probabilities out; the crops, normalisation and softmax are inside, classes.json beside
    names the classes. See docs/deploy.md."""
    from stages.commands.export import export as command

    _guard(lambda: command(checkpoint, out, formats, crops))


@app.command("lr-find")
def lr_find(
    params: Path = PARAMS,
    set_: list[str] = SET,
    start: float = typer.Option(1e-6, help="First learning rate."),
    end: float = typer.Option(
        10.0, help="Last learning rate (the test stops earlier if the loss diverges)."
    ),
    steps: int = typer.Option(
        100, help="Mini-batches over which the rate grows from start to end."
    ),
) -> None:
    """Learning-rate range test for params.yaml's model: plot + suggested train.lr."""

    def command(p: Params) -> None:  # imported once the params are known to be good
        from stages.commands.lrfind import lr_find

        lr_find(p, start, end, steps)

    _run(command, params, set_)


@app.command()
def ensemble(
    members: list[str] = typer.Argument(..., help="Checkpoint files or MLflow run ids."),
    crops: int = typer.Option(10, help="1 (centre crop) or 10 crops per image."),
    out: Path | None = typer.Option(None, help="Also write the metrics as JSON here."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Average the members' softmax on the validation set; top-1/5 of each and of the mean."""
    from stages.commands.ensemble import ensemble as command

    _guard(lambda: command(members, crops, out, device))


@app.command()
def submit(
    images: Path = typer.Option(
        Path("out/raw/tiny-imagenet-200/test/images"), help="Folder of unlabeled test images."
    ),
    checkpoint: Path = typer.Option(Path("out/train/model.pt"), help="Checkpoint to use."),
    out: Path = typer.Option(Path("out/submission.txt"), help="Submission file to write."),
    crops: int = typer.Option(10, help="1 (centre crop) or 10 crops per image."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Tiny ImageNet challenge file: one line per test image, `file_name wnid`."""
    from stages.commands.submit import submit as command

    _guard(lambda: command(images, checkpoint, out, crops, device))


@app.command()
def results(
    dataset: list[str] = typer.Option([], help="Only this dataset (repeat for several)."),
    model: list[str] = typer.Option([], help="Only this model (repeat for several)."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV instead of a Markdown table."),
    out: Path | None = typer.Option(None, help="Also write the table to this file."),
) -> None:
    """Best run per (dataset, model) in MLflow, beside the published results; exit 1: none."""
    from stages.commands.results import results as command

    _guard(lambda: command(dataset, model, as_csv, out))


@app.command()
def record(
    name: str = typer.Argument(..., help="The record's name: records/NAME.json."),
) -> None:
    """Keep the workspace's last run as records/NAME.json: its metrics, params, dvc.lock
    entries, commit, lock file, machine, speed settings, time and the one command that repeats
    it; then rewrite the results tables of README.md and docs/ (`convnet tables`)."""
    from stages.commands.records import record as command
    from stages.commands.records import tables

    def action() -> None:
        typer.echo(f"record: wrote {command(name)}")
        for doc in tables():
            typer.echo(f"record: rewrote the tables of {doc}")

    _guard(action)


@app.command("tables")
def tables_command(
    check: bool = typer.Option(
        False, "--check", help="Only say which files' tables differ from records/; exit 1 if any."
    ),
) -> None:
    """Rewrite every results table of README.md and docs/*.md from records/ (a table sits
    between `<!-- records: PATTERN -->` and `<!-- end records -->`)."""
    from stages.commands.records import RecordError, tables

    def action() -> None:
        stale = tables(check=check)
        if check and stale:
            raise RecordError(
                f"tables differ from records/ in {', '.join(map(str, stale))}: `convnet tables`"
            )
        typer.echo(
            "\n".join(f"tables: {'stale' if check else 'rewrote'} {d}" for d in stale)
            or "tables: all match records/"
        )

    _guard(action)


@app.command("log-pending")
def log_pending() -> None:
    """Log to MLflow what a training could not while the store failed (out/train/mlflow-pending)."""
    from stages.core.runlog import log_pending as command
    from stages.engine.serving import package

    def action() -> None:
        aside: list[str] = []  # what can never be logged: the error line, once it is set aside
        try:
            done = command(package, aside.append)
        except PipelineError:
            for line in aside:
                typer.echo(f"MLflow: {line}", err=True)
            raise
        if done or not aside:
            typer.echo("\n".join(done) or "MLflow: nothing waits")
        if aside:
            raise PipelineError("; ".join(aside))

    _guard(action)


@app.command()
def models() -> None:
    """List the models: each one's options and training values, from conf/model/<model>.yaml."""
    import nets

    def action() -> None:
        conf = conf_dir("params.yaml")
        typer.echo(
            f"Each model's options (net.*) and training values come from {conf}/model/<model>"
            ".yaml; a recipe (conf/recipe/) or -S overrides them."
        )
        for name in nets.names():
            values = read(conf / "model" / f"{name}.yaml")
            opts = ", ".join(f"{k}={v!r}" for k, v in (values.get("net") or {}).items())
            train = ", ".join(f"{k}={v!r}" for k, v in values.get("train", {}).items())
            typer.echo(f"{name:10s} net:   {opts or '-'}\n{'':10s} train: {train or '-'}")

    _guard(action)


@app.command(name="compose")
def compose_params(
    set_: list[str] = SET,
    write: bool = typer.Option(
        False, "--write", help="Replace params.yaml with it (as `dvc exp run` would)."
    ),
    params: Path = PARAMS,
) -> None:
    """Compose params.yaml from conf/ as `dvc exp run -S ...` does, and print it: what a
    recipe or model sets, or params.yaml made anew after editing conf/ (for `dvc repro`)."""
    from stages.core.files import atomic_path

    def action() -> None:
        data = compose(conf_dir(params), set_)
        validate(data, registries)  # what a stage would refuse is said now, before writing
        if not write:
            typer.echo(yaml_text(data), nl=False)
            return
        with atomic_path(params) as tmp:
            tmp.write_text(yaml_text(data))
        typer.echo(f"wrote {params}", err=True)

    _guard(action)


def main() -> None:
    # Ctrl-C and SIGTERM (`dvc queue kill`) unwind like an exception, so the MLflow run is
    # marked FAILED and temporary files are removed instead of being left behind.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        app(prog_name="convnet")
    except Interrupted as err:  # arrived outside a command's _guard (parsing the command line)
        typer.echo(f"error: {err}", err=True)
        sys.exit(128 + err.signum)
