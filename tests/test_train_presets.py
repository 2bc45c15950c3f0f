"""Every seed recipe in presets/recipes.yaml is a valid params.yaml override set that trains."""

import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from train_helpers import make_processed

import nets
from stages import params
from stages import train as train_module
from stages.data.sources import SOURCES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "presets"))
from args import RECIPES, args  # noqa: E402

# Shrinks a recipe to two steps of four images; every other key keeps the recipe's value.
TINY = ["train.epochs=1", "train.batch_size=4", "train.warmup_epochs=0", "train.device=cpu"]


def overrides(name: str) -> list[str]:
    return [a for a in args(name) if a != "-S"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_validates(name):
    p = params.load(REPO / "params.yaml", overrides(name), defaults=nets.train_defaults)
    assert p.model == RECIPES[name]["model"] and p.dataset in SOURCES
    assert yaml.safe_load((REPO / "params.yaml").read_text())  # untouched


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_gives_the_same_run_whatever_ran_before(name):
    """A finished `dvc exp run` leaves its params in params.yaml and the next recipe's overrides
    apply on top of them: the same as the earlier recipe's overrides followed by this one's."""
    clean = params.load(REPO / "params.yaml", overrides(name), defaults=nets.train_defaults)
    for before in RECIPES:
        both = overrides(before) + overrides(name)
        after = params.load(REPO / "params.yaml", both, defaults=nets.train_defaults)
        assert after == clean, f"{name} after {before}"


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_two_steps(name, tmp_path, monkeypatch):
    p = params.load(REPO / "params.yaml", overrides(name) + TINY, defaults=nets.train_defaults)
    # Processed data shaped like the recipe's dataset (images crop + 8 px, as its sets are).
    size = p.train.crop_size + 2 * 4
    make_processed(tmp_path, n_train=8, n_val=4, size=size, k=4, dataset=p.dataset)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(train_module, "_log_model", lambda *args: None)  # slow, not needed
    metrics = train_module.train(p)
    assert 0 <= metrics["val_top1"] <= 1
    assert (tmp_path / "out" / "train" / "model.pt").exists()
    [run] = mlflow.search_runs(experiment_names=["convnet-pipeline"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["model"] == p.model
