"""Each model's training defaults fill the train keys params.yaml leaves null; a value the user
sets wins; the seed presets keep the values they were published with."""

import sys
from pathlib import Path

import pytest
import yaml

import nets
from stages import params
from stages.params import MODEL_TUNED, TrainParams

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
BUILTIN = {name: f.default for name, f in TrainParams.model_fields.items()}
sys.path.insert(0, str(REPO / "presets"))
from args import RECIPES  # noqa: E402


def load(*overrides: str) -> params.Params:
    return params.load(PARAMS, list(overrides), defaults=nets.train_defaults)


def test_params_yaml_leaves_exactly_the_model_tuned_keys_to_the_model():
    train = yaml.safe_load(PARAMS.read_text())["train"]
    assert sorted(k for k, v in train.items() if v is None) == sorted(MODEL_TUNED)
    for name in nets.names():
        assert set(nets.train_defaults(name)) <= set(MODEL_TUNED), name


@pytest.mark.parametrize("model", nets.names())
def test_selecting_a_model_applies_its_defaults_and_the_builtin_rest(model):
    p = load(f"model={model}")
    tuned = nets.train_defaults(model)
    for key in MODEL_TUNED:
        assert getattr(p.train, key) == tuned.get(key, BUILTIN[key]), (model, key)
    assert p.tracked()["train.epochs"] == p.train.epochs  # what MLflow logs is the value used


def test_a_value_the_user_sets_wins_over_the_model_default():
    assert nets.train_defaults("resnet50")["lr"] != 0.2
    p = load("model=resnet50", "train.lr=0.2")
    assert p.train.lr == 0.2
    assert p.train.batch_size == nets.train_defaults("resnet50")["batch_size"]
    assert load("model=resnet50", "train.lr=null").train.lr == nets.train_defaults("resnet50")["lr"]


def test_without_model_defaults_nulls_are_the_builtin_values():
    p = params.load(PARAMS, ["model=resnet50"])
    assert [getattr(p.train, k) for k in MODEL_TUNED] == [BUILTIN[k] for k in MODEL_TUNED]


@pytest.mark.parametrize("name", list(RECIPES))
def test_presets_keep_their_own_values(name):
    """A preset trains with the values it sets and otherwise the built-in defaults it was
    written against: no model default and no small-image stem leaks into it."""
    preset = RECIPES[name]
    p = load(*(f"{k}={v}" for k, v in preset.items()))
    for key in MODEL_TUNED:
        assert getattr(p.train, key) == preset.get(f"train.{key}", BUILTIN[key]), (name, key)
    if p.model.startswith("resnet"):
        assert p.net_options["stem_stride"] == preset.get(f"nets.{p.model}.stem_stride", 1)


def test_models_command_lists_options_as_configured_and_training_defaults(monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(REPO)
    out = CliRunner().invoke(app, ["models"]).output
    lines = out.splitlines()
    resnet50 = lines.index(next(line for line in lines if line.startswith("resnet50")))
    assert "stem_stride=4*" in lines[resnet50]  # params.yaml's value, marked as set there
    tuned = nets.train_defaults("resnet50")
    assert f"lr={tuned['lr']!r}" in lines[resnet50 + 1] and "train:" in lines[resnet50 + 1]
