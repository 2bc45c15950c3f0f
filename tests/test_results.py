"""`convnet results` on real MLflow runs in a temporary sqlite store, logged as train and
evaluate log them: the best run per (dataset, model), published results and gaps, CSV."""

from __future__ import annotations

import csv
import io
import os
import time

import mlflow
import pytest
from helpers.processes import with_store
from helpers.remote_data import closed_port_url
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from stages.cli import app
from stages.core.runlog import run_log


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


def log_run(
    dataset: str, model: str, top1: float | None, top5: float = 0.7, single: float = 0.45,
    seconds: tuple[float, ...] = (1.0, 2.0, 3.0), epochs: int = 3, failed: bool = False,
    tags: dict | None = None,
) -> str:  # fmt: skip
    """A training run (params, per-epoch metrics) then, for `top1`, the evaluate stage's
    metrics added to it, both through run_log as the stages write; `failed`: the training fails,
    which ends its run FAILED. Returns the run id."""
    run_tags = {"dataset": dataset, "model": model, "dvc_exp_name": "test-exp", "device": "cpu"}
    try:
        with run_log(None, run_name=model, tags=run_tags | (tags or {})) as training:
            training.batch("the params", params={"train.epochs": epochs, "model": model})
            for epoch, s in enumerate(seconds, start=1):
                training.batch("the metrics", epoch, {"epoch_seconds": s, "val_top1": 0.1 * epoch})
            if failed:
                raise OSError("disk full while saving the checkpoint")
    except OSError:
        pass
    if top1 is not None:
        with run_log(None, training.run_id, attach=True) as evaluation:  # as evaluate adds to it
            evaluation.batch("the metrics", metrics={
                "single_crop_top1": single, "single_crop_top5": top5 - 0.01,
                "ten_crop_top1": top1, "ten_crop_top5": top5,
                "ten_crop_gain_top1": top1 - single,
            })  # fmt: skip
        assert evaluation.run_id == training.run_id
    status = mlflow.get_run(training.run_id).info.status
    assert status == ("FAILED" if failed else "FINISHED")  # as the training left it
    return training.run_id


def table(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """Markdown table rows by (dataset, model), each as {header: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    return {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in rows}


def invoke(*args: str):
    return CliRunner().invoke(app, ["results", *args])


def test_best_finished_run_per_dataset_and_model_beside_the_published_result(store):
    log_run("tiny-imagenet", "vgg16", 0.45)
    best = log_run("tiny-imagenet", "vgg16", 0.50, top5=0.75, single=0.48)
    log_run("tiny-imagenet", "vgg16", 0.60, failed=True)  # FAILED: ignored, though evaluated
    log_run("tiny-imagenet", "vgg16", None)  # trained, never evaluated: ignored
    log_run("tiny-imagenet", "vgg16", 0.90, tags={"kind": "lr-find"})  # not a training
    log_run("tiny-imagenet", "alexnet", 0.40, seconds=(30.0, 45.5))
    log_run("digits", "mlp", 0.96, top5=1.0, single=0.95, seconds=(), epochs=10)

    result = invoke()
    assert result.exit_code == 0, result.output
    rows = table(result.stdout)
    pairs = [("digits", "mlp"), ("tiny-imagenet", "alexnet"), ("tiny-imagenet", "vgg16")]
    assert list(rows) == pairs  # one row per (dataset, model), sorted by both

    vgg = rows[("tiny-imagenet", "vgg16")]
    assert vgg["10-crop top-1"] == "50.0" and vgg["10-crop top-5"] == "75.0"
    assert vgg["top-1"] == "48.0" and vgg["top-5"] == "74.0"
    assert vgg["10-crop gain"] == "+2.0"
    # published.yaml: Coady's VGG-16, 52.2% / 77.2%
    assert vgg["published top-1"] == "52.2" and vgg["gap top-1"] == "-2.2"
    assert vgg["published top-5"] == "77.2" and vgg["gap top-5"] == "-2.2"
    assert vgg["epochs"] == "3" and vgg["wall time"] == "6 s"  # 1 + 2 + 3 epoch_seconds
    assert vgg["device"] == "cpu" and vgg["run"] == f"vgg16 {best[:8]}"

    alex = rows[("tiny-imagenet", "alexnet")]
    assert alex["published top-1"] == "45.0" and alex["gap top-1"] == "-5.0"
    assert alex["published top-5"] == "" and alex["gap top-5"] == ""  # no top-5 published
    assert alex["epochs"] == "2" and alex["wall time"] == "1 min 16 s"

    mlp = rows[("digits", "mlp")]  # no published result for digits; no per-epoch timing
    assert mlp["published top-1"] == mlp["gap top-1"] == mlp["published top-5"] == ""
    assert mlp["epochs"] == "10"  # train.epochs
    assert mlp["wall time"].endswith(" s")  # the run's end - start

    # The source of each published row: author, title, where in it, address.
    assert "- tiny-imagenet vgg16: VGG-16 for 56 px crops" in result.stdout
    assert '"VGGNet and Tiny ImageNet" (2017), Table 1' in result.stdout
    assert "digits mlp:" not in result.stdout


def test_csv_parses_filters_apply_and_out_gets_a_copy(store):
    log_run("tiny-imagenet", "vgg16", 0.50, top5=0.75, single=0.48)
    log_run("digits", "mlp", 0.96, top5=1.0)

    result = invoke("--csv", "--out", "results.csv")
    assert result.exit_code == 0, result.output
    assert (store / "results.csv").read_text() == result.stdout
    rows = {(r["dataset"], r["model"]): r for r in csv.DictReader(io.StringIO(result.stdout))}
    vgg = rows[("tiny-imagenet", "vgg16")]
    assert float(vgg["ten_crop_top1"]) == pytest.approx(50.0)
    assert float(vgg["published_top1"]) == 52.2 and float(vgg["gap_top1"]) == pytest.approx(-2.2)
    assert float(vgg["ten_crop_gain_top1"]) == pytest.approx(2.0)
    assert int(vgg["epochs"]) == 3 and float(vgg["wall_seconds"]) == pytest.approx(6.0)
    assert rows[("digits", "mlp")]["published_top1"] == ""

    only = invoke("--csv", "--dataset", "digits")
    assert only.exit_code == 0, only.output
    assert [r["model"] for r in csv.DictReader(io.StringIO(only.stdout))] == ["mlp"]
    assert "tiny-imagenet" not in only.stdout


def test_no_finished_run_is_one_line_and_exit_1(store):
    (store / "mlflow.db").unlink()
    result = invoke()  # no store at all: none is created by looking
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no finished runs" in result.stderr
    assert "dvc repro" in result.stderr and "Traceback" not in result.output
    assert not (store / "mlflow.db").exists()

    log_run("digits", "mlp", 0.9, failed=True)
    log_run("digits", "mlp", 0.9, tags={"kind": "lr-find"})
    result = invoke("--csv")
    assert result.exit_code == 1 and result.stdout == ""
    assert "no finished runs" in result.stderr

    log_run("digits", "mlp", 0.9)
    result = invoke("--model", "vgg16")  # the filter matches nothing
    assert result.exit_code == 1 and "model vgg16" in result.stderr


def test_a_server_that_does_not_answer_is_one_line_within_seconds(store, monkeypatch):
    """Not after MLflow's ~250 s of HTTP retries: the stages' bound, and their advice."""
    url = closed_port_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    began = time.monotonic()
    result = invoke()
    assert time.monotonic() - began < 30
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: MLflow store {url}: ")
    assert "Connection refused" in result.stderr and "start the server" in result.stderr
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the bound is not left behind


def test_a_nan_score_is_never_the_best_run(store):
    """A FINISHED run whose 10-crop top-1 is NaN (or infinite) does not hide the real one."""
    real = log_run("digits", "mlp", 0.96, top5=1.0)
    client = MlflowClient()
    for bad in (float("nan"), float("inf")):
        run_id = log_run("digits", "mlp", None)
        client.log_metric(run_id, "ten_crop_top1", bad)
    result = invoke()
    assert result.exit_code == 0, result.output
    [row] = table(result.stdout).values()
    assert row["10-crop top-1"] == "96.0" and row["run"].endswith(real[:8])
