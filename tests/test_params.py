"""Bad parameters fail before any work: one line naming the key and the allowed values, exit 2."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages import params
from stages.cli import app

BAD = [
    ("model=foo", "model: must be one of: alexnet, logreg, mlp"),
    ("dataset=imagenet", "dataset: must be one of: digits"),
    ("train.epochs=-1", "train.epochs: must be a positive integer"),
    ("train.crop_size=40", "train.crop_size: is 40 but digits images are 32x32"),
    ("train.lr=fast", "train.lr: must be a number, got 'fast'"),
    ("train.optimizer=rmsprop", "train.optimizer: must be one of: sgd, adam"),
    ("train.epochs_typo=3", "train.epochs_typo: unknown key; valid keys:"),
    ("nets.vgg16.depth=19", "nets.vgg16.depth: unknown key; valid keys: batch_norm, dropout"),
    ("train.flip=maybe", "train.flip: must be true or false"),
    # Exact types: no 1 for a boolean, no "3" or 2.0 for an integer, no true for a number.
    ("train.flip=1", "train.flip: must be true or false, got 1"),
    ("train.epochs='3'", "train.epochs: must be an integer, got '3'"),
    ("train.batch_size=2.0", "train.batch_size: must be an integer, got 2.0"),
    ("download.timeout=true", "download.timeout: must be a number, got True"),
    ("download.mirror=3", "download.mirror: must be a string, got 3"),
    ("report.pictures=[1]", "report.pictures: must be one of: predictions, mistakes"),
    ("report.pictures=curves", "report.pictures: must be a list, got 'curves'"),
    ("train=3", "train: must be a mapping, got 3"),
    ("train.momentum=1.0", "train.momentum: must be in [0, 1), got 1.0"),
    ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
    ("train.weight_decay=.nan", "train.weight_decay: must be a finite number, got nan"),
    ("seed=-1", "seed: must be in [0, 4294967295], got -1"),
    ("train.warmup_epochs=11", "train.warmup_epochs: is 11 but train.epochs is 10"),
    # nets.*: each option as its builder declares it.
    ("nets.mlp.hidden=0", "nets.mlp.hidden: must be a positive integer, got 0"),
    ("nets.vgg16.batch_norm=maybe", "nets.vgg16.batch_norm: must be true or false, got 'maybe'"),
    ("nets.resnet18.stem_stride=0", "nets.resnet18.stem_stride: must be a positive integer"),
    ("nets.alexnet.dropout=1.5", "nets.alexnet.dropout: must be in [0, 1), got 1.5"),
    ("nets.alexnet.activation=tanh", "nets.alexnet.activation: must be one of: relu, prelu"),
    ("nets.vgg16.init=orthogonal", "nets.vgg16.init: must be one of: classic, default"),
    ("nets.logreg.hidden=3", "nets.logreg.hidden: unknown key; valid keys: (none)"),
    ("nets.vgg19.batch_norm=true", "nets.vgg19: is not a model"),
    ("nets.mlp=3", "nets.mlp: must be a mapping, got 3"),
]


@pytest.mark.parametrize("override, message", BAD)
@pytest.mark.parametrize("command", ["download", "train"])
def test_bad_value_exits_2_with_message(tmp_path, monkeypatch, command, override, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")  # defaults for everything else
    result = CliRunner().invoke(app, [command, "-S", override])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # failed before any work


def test_bad_value_in_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 0}}))
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    assert "train.batch_size: must be a positive integer" in result.output


def test_repository_params_are_valid_and_complete():
    p = params.load("params.yaml")
    data = yaml.safe_load(Path("params.yaml").read_text())
    # Every key has a home in the dataclasses and every dataclass field is in the file,
    # so `dvc exp run -S key=...` can override each of them.
    assert params.flatten(p.to_dict()).keys() == params.flatten(data).keys()


def test_overrides_parse_yaml_values():
    p = params.load("params.yaml", ["train.epochs=3", "train.nesterov=false", "model=mlp"])
    assert (p.train.epochs, p.train.nesterov, p.model) == (3, False, "mlp")
    with pytest.raises(params.ParamsError, match="expected KEY=VALUE"):
        params.load("params.yaml", ["train.epochs"])


def test_a_warmup_as_long_as_training_is_allowed():
    # The rate reaches train.lr on the last step of the warm-up.
    assert params.load("params.yaml", ["train.epochs=3", "train.warmup_epochs=3"]).train.lr > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "bad.yaml: is empty"),
        ("# only a comment\n", "bad.yaml: is empty"),
        (
            "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n",
            "line 4, column 3: duplicate key 'lr' (first on line 2)",
        ),
        ("seed: 0\nseed: 1\n", "line 2, column 1: duplicate key 'seed' (first on line 1)"),
        ("train: {lr: 0.1, lr: 0.2}\n", "duplicate key 'lr'"),
        ("train: [unclosed\n", "bad.yaml: not valid YAML: line 2, column 1: expected ',' or ']'"),
    ],
)
def test_file_errors_are_one_line_naming_the_file_once(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(app, ["download", "--params", "bad.yaml"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [result.output.strip()]
    assert message in result.output and result.output.count("bad.yaml") == 1
    assert not (tmp_path / "out").exists()


def test_the_same_key_in_two_sections_is_not_a_duplicate():
    text = "train:\n  batch_size: 4\nevaluate:\n  batch_size: 8\n"
    assert params._yaml(text) == {"train": {"batch_size": 4}, "evaluate": {"batch_size": 8}}


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(params.ParamsError, match="override 'train.lr=\\[': not valid YAML"):
        params.load("params.yaml", ["train.lr=["])


def test_params_are_immutable_and_an_integer_is_a_number():
    p = params.load("params.yaml", ["download.timeout=60"])
    assert p.download.timeout == 60.0 and isinstance(p.download.timeout, float)
    with pytest.raises(ValueError, match="frozen"):
        p.train.lr = 1.0  # type: ignore[misc]
