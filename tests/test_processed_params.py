"""Processed data know the dataset and params that made them; stages refuse a mismatch."""

from __future__ import annotations

import json

import pytest
from helpers import fabricate
from helpers.fabricate import params_from
from helpers.processes import with_store
from typer.testing import CliRunner

from stages.cli import app
from stages.data.processed import load_processed
from stages.download import download
from stages.preprocess import preprocess


def shapes_params(**overrides):
    base = {"dataset": "shapes", "seed": 1, "preprocess": {"shapes": {"per_class": 6}}}
    return params_from(base | overrides)


def test_preprocess_records_the_params_that_made_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = shapes_params()
    download(p)
    preprocess(p)
    info = json.loads((tmp_path / "out/processed/info.json").read_text())
    assert info["params"] == p.preprocess_inputs()
    assert info["params"]["dataset"] == "shapes" and "workers" not in info["params"]["preprocess"]
    load_processed(p.preprocess_inputs())  # the same params: accepted
    pre = {"shapes": {"per_class": 6}, "workers": 1}
    other_workers = params_from({"dataset": "shapes", "seed": 1, "preprocess": pre})
    load_processed(other_workers.preprocess_inputs())  # decoding processes change nothing

    with pytest.raises(Exception, match=r"dataset='shapes' \(params: 'digits'\)"):
        load_processed(params_from({}).preprocess_inputs())
    with pytest.raises(Exception, match=r"seed=1 \(params: 2\)"):
        load_processed(shapes_params(seed=2).preprocess_inputs())


@pytest.mark.parametrize("command", ["train", "evaluate", "report", "lr-find"])
def test_stages_refuse_data_made_from_another_dataset(tmp_path, monkeypatch, command):
    """out/processed from shapes, params saying digits: one line naming both, exit 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{with_store(tmp_path)}")
    fabricate.processed(tmp_path)
    fabricate.save_checkpoint(tmp_path / "out/train/model.pt", fabricate.model())
    info_path = tmp_path / "out/processed/info.json"
    info = json.loads(info_path.read_text())
    made = shapes_params().preprocess_inputs()
    info_path.write_text(json.dumps(info | {"dataset": "shapes", "params": made}))
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    params = str(fabricate.REPO / "params.yaml")
    result = CliRunner().invoke(app, [command, "--params", params, "-S", "train.device=cpu"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out/processed was made with")
    assert "dataset='shapes' (params: 'digits')" in lines[0] and "dvc repro" in lines[0]
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before  # nothing written


def test_evaluate_refuses_a_model_of_other_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fabricate.processed(tmp_path)
    fabricate.save_checkpoint(tmp_path / "out/train/model.pt", fabricate.model())
    (tmp_path / "out/processed/classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    params = str(fabricate.REPO / "params.yaml")
    result = CliRunner().invoke(app, ["evaluate", "--params", params, "-S", "train.device=cpu"])
    assert result.exit_code == 1
    assert "out/train/model.pt was trained on 4 other classes (zero, one, two, three)" in (
        result.output
    )
    assert not (tmp_path / "out/evaluate").exists()
