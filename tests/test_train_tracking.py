"""What a training run records in MLflow: names, params, data, system metrics and the model."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.fabricate import CLASSES, make_processed, write_params
from helpers.processes import with_store
from PIL import Image

from stages import params
from stages import train as train_module
from stages.commands.ensemble import load_member
from stages.commands.predict import predict
from stages.core import checkpoint, runlog, tracking
from stages.data.writer import digest
from stages.engine import serving

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Tiny processed data, params for a 2-epoch mlp, and a private MLflow store."""
    make_processed(tmp_path)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def _only_run() -> mlflow.entities.Run:
    [run] = mlflow.search_runs(experiment_names=["convnet-pipeline"], output_format="list")
    return run


def test_skipped_images_from_preprocess_are_a_metric_of_the_run(store, monkeypatch):
    info_file = store / "out" / "processed" / "info.json"
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"skipped_images": 3}))
    monkeypatch.setattr(runlog.RunLog, "model", lambda *args: None)  # slow, not needed
    train_module.train(params.load("params.yaml"))
    assert _only_run().data.metrics["data_skipped_images"] == 3


def test_run_is_named_tagged_and_logs_only_what_it_used(store, monkeypatch):
    """The experiment says it is model training; the run is named dataset/model/DVC experiment;
    its params are params.yaml's values as used, the model's options as `net.*`; no metric is
    a constant 0; both splits are dataset inputs with their digests; system metrics were
    sampled once per epoch."""
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-pogo")
    monkeypatch.setattr(runlog.RunLog, "model", lambda *args: None)
    p = params.load("params.yaml")
    train_module.train(p)

    experiment = mlflow.get_experiment_by_name("convnet-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "convnet results" in experiment.tags["mlflow.note.content"]
    run = _only_run()
    assert run.info.run_name == "digits/mlp/lucid-pogo"
    assert run.data.tags["mlflow.source.name"] == "stages/train.py"
    assert run.data.tags["dvc_exp_name"] == "lucid-pogo"
    assert run.data.params["net.hidden"] == "32" and run.data.params["train.lr"] == "0.05"
    assert run.data.params.keys() == p.tracked().keys()
    assert "data_skipped_images" not in run.data.metrics
    cpu = mlflow.MlflowClient().get_metric_history(
        run.info.run_id, "system/cpu_utilization_percentage"
    )
    assert [m.step for m in cpu] == [1, 2] and all(0 <= m.value <= 100 for m in cpu)
    assert run.data.metrics["system/process_memory_megabytes"] > 50  # torch alone is more
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    folder = store / "out" / "processed"
    for context, split in (("training", "train"), ("validation", "val")):
        images = np.load(folder / f"{split}_images.npy")
        labels = np.load(folder / f"{split}_labels.npy")
        assert inputs[context].name == "digits"
        assert inputs[context].digest == digest(images, labels)
        assert json.loads(inputs[context].profile)["features_shape"] == list(images.shape)


def test_digest_changes_with_any_pixel_or_label():
    images = np.zeros((5, 4, 4, 3), np.uint8)
    labels = np.arange(5)
    base = digest(images, labels)
    changed = images.copy()
    changed[4, 3, 3, 2] = 1
    assert digest(changed, labels) != base
    assert digest(images, labels[::-1].copy()) != base
    assert digest(images, labels) == base


def test_logged_model_is_named_registered_and_answers_for_image_files(store, capsys):
    """The run's model `digits-mlp`, registered: it takes image files and gives predict's top-k
    class names; the training's output says how to serve it."""
    train_module.train(params.load("params.yaml", ["train.register_model=true", "train.epochs=1"]))
    run = _only_run()
    [model] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert model.name == "digits-mlp"
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.metadata["classes"] == CLASSES
    assert "column `image`" in info.metadata["input"]
    version = mlflow.MlflowClient().get_latest_versions("convnet-digits-mlp")[0]
    assert version.run_id == run.info.run_id
    uri = f"models:/convnet-digits-mlp/{version.version}"
    assert f"serve it with `mlflow models serve -m {uri} --env-manager local`" in (
        capsys.readouterr().out
    )
    images = np.load(store / "out/processed/val_images.npy")[:3]  # (3, 16, 16, 3)
    files = []
    for i, pixels in enumerate(images):
        files.append(store / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    answer = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": map(str, files)}))
    expected = predict(files, store / "out/train/model.pt", top=5, crops=10, device="cpu")
    assert answer["classes"].tolist() == [[name for name, _ in e.top] for e in expected]
    assert len(answer.loc[0, "classes"]) == 4  # top 5 of 4 classes: all of them

    # `convnet ensemble RUN_ID` reads the logged model's checkpoint: model.pt, as it was.
    member = load_member(run.info.run_id, "cpu")
    saved = checkpoint.load(store / "out/train/model.pt")
    assert set(member.state) == set(saved) == {"format", *checkpoint.INFERENCE_KEYS}
    torch.testing.assert_close(member.state["model"], saved["model"])


def test_a_copied_repository_stops_in_one_line_instead_of_writing_into_the_old_one(
    tmp_path, monkeypatch
):
    """MLflow keeps the absolute artifact path of the repository's own store (mlflow.db,
    mlartifacts/): in a copy of the repository, training stops before its work with one line
    naming the old path and where to read how to move a store; nothing is written under the
    old path and the store is unchanged."""
    old, new = tmp_path / "repo", tmp_path / "copied repo"  # a space: percent-encoded in URIs
    old.mkdir()
    make_processed(old)
    write_params(old, epochs=1)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runlog.RunLog, "model", lambda *args: None)
    monkeypatch.chdir(old)
    train_module.train(params.load("params.yaml"))
    shutil.copytree(old, new)
    shutil.rmtree(new / "out/train")
    monkeypatch.chdir(new)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # set by MLflow itself (for subprocesses)
    before = {root: _files(root) for root in (old, new)}

    with pytest.raises(tracking.TrackingError) as stopped:
        train_module.train(params.load("params.yaml"))
    message = str(stopped.value)
    assert "\n" not in message and f"keeps its artifacts in {old}/mlartifacts" in message
    assert "new runs would write outside the repository" in message
    assert "docs/troubleshooting.md" in message
    assert {root: _files(root) for root in (old, new)} == before  # the store too
    assert not (new / "out/train").exists()

    # The way out docs/troubleshooting.md gives first: the old path leads to the new place.
    shutil.rmtree(old)
    old.symlink_to(new)
    train_module.train(params.load("params.yaml"))
    assert len(list((new / "mlartifacts").rglob("history.csv"))) == 2  # the copied run's too


def _files(root: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in root.rglob("*") if f.is_file()}


# Any of these makes MLflow skip telemetry by itself (mlflow.telemetry.utils): the test's
# subprocess runs without them (nor a store chosen by an earlier test), like a user's shell.
CI_VARIABLES = {
    "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL",
    "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE",
    "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "XDG_CONFIG_HOME",
    "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME",
}  # fmt: skip


@pytest.mark.parametrize(("setting", "written"), [(None, False), ("false", True)])
def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on(tmp_path, setting, written):
    """No installation id under the home folder, unless MLFLOW_DISABLE_TELEMETRY=false."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CI_VARIABLES}
    env |= {"HOME": str(home), "PYTHONPATH": str(REPO)}
    if setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = setting
    command = [sys.executable, "-m", "stages", "results"]  # opens an (empty) store: exit 1
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert "no finished runs" in done.stderr.decode()
    assert (home / ".config/mlflow/telemetry.json").exists() == written


def test_what_the_store_did_not_take_by_the_end_is_logged_later(store, monkeypatch, capsys):
    """The store locked as training ends: model.pt and history.csv are written all the same;
    the last line names what the run lacks; `log_pending` (`convnet log-pending`) writes it
    later, the model from a copy of model.pt kept beside the pending log. What evaluate could
    not add to the run meanwhile waits after the training's records, and never ends the run."""
    monkeypatch.setattr(runlog, "WAIT_SECONDS", 3)  # a minute in use
    lock = sqlite3.connect(store / "mlflow.db", isolation_level=None, check_same_thread=False)
    finish = train_module._finish

    def finish_while_locked(*args) -> None:
        lock.execute("BEGIN EXCLUSIVE")  # what another process would hold
        finish(*args)

    monkeypatch.setattr(train_module, "_finish", finish_while_locked)
    try:
        train_module.train(params.load("params.yaml", ["train.epochs=1"]))
    finally:
        lines = capsys.readouterr().out.strip().splitlines()
        lock.execute("ROLLBACK")
    assert (
        "history.csv, run.json, mean.png, the model and its end (FINISHED): the store" in lines[-1]
    )
    assert "`convnet log-pending` logs them" in lines[-1]
    assert (store / "out/train/model.pt").exists() and (store / "out/train/history.csv").exists()
    [pending] = (store / "out/train/mlflow-pending").glob("*.json")
    assert pending.with_suffix(".model.pt").exists()
    (store / "out/train/model.pt").unlink()  # e.g. replaced by another training meanwhile

    with runlog.run_log(None, pending.stem, attach=True) as evaluation:  # the store answers
        lock.execute("BEGIN EXCLUSIVE")  # then it does not
        evaluation.batch("the evaluate metrics", metrics={"ten_crop_top1": 0.5})
    lock.execute("ROLLBACK")
    lock.close()
    assert evaluation.run_id == pending.stem
    saved = json.loads(pending.read_text())["records"]
    assert [r["what"] for r in saved[-2:]] == ["its end (FINISHED)", "the evaluate metrics"]

    [line] = runlog.log_pending(serving.package)
    assert line.endswith("the model, its end (FINISHED) and the evaluate metrics")
    assert not (store / "out/train/mlflow-pending").exists()
    run = _only_run()
    assert run.info.status == "FINISHED" and run.data.metrics["ten_crop_top1"] == 0.5
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"history.csv", "mean.png"} <= files
    [model] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert model.source_run_id == run.info.run_id and model.name == "digits-mlp"
