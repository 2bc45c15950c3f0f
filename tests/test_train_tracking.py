"""What a training run records in MLflow: names, params, data, system metrics and the model."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from train_helpers import make_processed, write_params

from stages import params
from stages import train as train_module
from stages.core import tracking
from stages.data.writer import digest
from stages.params import MODEL_TUNED


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Tiny processed data, params for a 2-epoch mlp, and a private MLflow store."""
    make_processed(tmp_path)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def _only_run() -> mlflow.entities.Run:
    [run] = mlflow.search_runs(experiment_names=["convnet-pipeline"], output_format="list")
    return run


def test_skipped_images_from_preprocess_are_a_metric_of_the_run(store, monkeypatch):
    info_file = store / "out" / "processed" / "info.json"
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"skipped_images": 3}))
    monkeypatch.setattr(train_module, "_log_model", lambda *args: None)  # slow, not needed
    train_module.train(params.load("params.yaml"))
    assert _only_run().data.metrics["data_skipped_images"] == 3


def test_run_is_named_tagged_and_logs_only_what_it_used(store, monkeypatch):
    """The experiment says it is model training; the run is named dataset/model/DVC experiment;
    only the selected model's options are params; no metric is a constant 0; both splits are
    dataset inputs with their digests; system metrics were sampled once per epoch."""
    p = yaml.safe_load((store / "params.yaml").read_text())
    p["nets"]["alexnet"] = {"activation": "prelu"}  # another model's options: not logged
    (store / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-pogo")
    monkeypatch.setattr(train_module, "_log_model", lambda *args: None)
    p = params.load("params.yaml")
    train_module.train(p)
    used = json.loads((store / "out" / "train" / "params.json").read_text())  # DVC metrics
    assert used == {k: getattr(p.train, k) for k in MODEL_TUNED} and used["lr"] == 0.05

    experiment = mlflow.get_experiment_by_name("convnet-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "convnet results" in experiment.tags["mlflow.note.content"]
    run = _only_run()
    assert run.info.run_name == "digits/mlp/lucid-pogo"
    assert run.data.tags["mlflow.source.name"] == "stages/train.py"
    assert run.data.tags["dvc_exp_name"] == "lucid-pogo"
    assert run.data.params["nets.mlp.hidden"] == "32"
    assert not [k for k in run.data.params if k.startswith("nets.alexnet")]
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


def test_logged_model_is_named_registered_and_knows_its_classes(store):
    train_module.train(params.load("params.yaml", ["train.register_model=true", "train.epochs=1"]))
    run = _only_run()
    [model] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert model.name == "digits-mlp"
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.metadata["classes"] == ["c0", "c1", "c2", "c3"]
    assert "(batch, 3, 12, 12)" in info.metadata["input"]
    version = mlflow.MlflowClient().get_latest_versions("convnet-digits-mlp")[0]
    assert version.run_id == run.info.run_id
    loaded = mlflow.pyfunc.load_model(f"models:/convnet-digits-mlp/{version.version}")
    logits = loaded.predict(np.zeros((3, 3, 12, 12), np.float32))
    assert logits.shape == (3, 4)


def test_experiment_made_before_the_tags_gets_them(store):
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.create_experiment("convnet-pipeline")
    tracking.setup()
    tags = mlflow.get_experiment_by_name("convnet-pipeline").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
