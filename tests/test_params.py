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
    ("nets.vgg16.depth=19", "nets.vgg16.depth: is not an option of vgg16"),
    ("train.flip=maybe", "train.flip: must be true or false"),
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
