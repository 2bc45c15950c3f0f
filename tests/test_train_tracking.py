"""What a training run records in MLflow about the data it was trained on."""

import json

import mlflow
from train_helpers import make_processed, write_params

from stages import params
from stages import train as train_module


def test_skipped_images_from_preprocess_are_a_metric_of_the_run(tmp_path, monkeypatch):
    out = make_processed(tmp_path)
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps(info | {"skipped_images": 3}))
    write_params(tmp_path, epochs=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(train_module, "_log_model", lambda model, size: None)  # slow, not needed
    train_module.train(params.load("params.yaml"))
    [run] = mlflow.search_runs(experiment_names=["convnet-pipeline"], output_format="list")
    assert run.data.metrics["data_skipped_images"] == 3
