"""Bad parameters fail before any work: one line naming the key and the allowed values, exit 2."""

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages import params
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]

BAD = [
    ("model=foo", "model: no model 'foo' in conf/model/; one of: alexnet, logreg, mlp"),
    ("dataset=imagenet", "dataset: no dataset 'imagenet' in conf/dataset/; one of: cifar10"),
    ("train.epochs=-1", "train.epochs: must be a positive integer"),
    ("train.crop_size=40", "train.crop_size: is 40 but digits images are 32x32"),
    ("train.lr=fast", "train.lr: must be a number, got 'fast'"),
    ("train.optimizer=rmsprop", "train.optimizer: must be one of: sgd, adam"),
    ("+train.epochs_typo=3", "train.epochs_typo: unknown key; valid keys:"),
    ("train.epochs_typo=3", "train.epochs_typo: unknown key; valid keys:"),
    ("+net.depth=19", "net.depth: unknown key; valid keys: activation, batch_norm, dropout"),
    ("train.flip=maybe", "train.flip: must be true or false"),
    # YAML 1.2, as DVC reads params.yaml: `yes` and `on` are strings, not booleans.
    ("train.flip=yes", "train.flip: must be true or false, got 'yes'"),
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
    ("train.lr=inf", "train.lr: must be a finite number, got inf"),
    ("train.weight_decay=nan", "train.weight_decay: must be a finite number, got nan"),
    ("seed=-1", "seed: must be in [0, 4294967295], got -1"),
    ("train.lr=-1", "train.lr: must be positive"),
    ("train.epochs=many", "train.epochs: must be an integer, got 'many'"),
    ("train.device=cuda:7x", "train.device: must be"),
    ("train.epochs", "expected KEY=VALUE"),
    ("report.pictures=[selfie]", "report.pictures: must be one of: predictions"),
    ("train.warmup_epochs=16", "train.warmup_epochs: is 16 but train.epochs is 15"),
    # Augmentation bounded by the crop it works on.
    ("train.cutout=15", "train.cutout: is 15 but train.crop_size is 28: use at most 14"),
    ("train.pad=15", "train.pad: is 15 but train.crop_size is 28: use at most 14"),
    # net.*: each option of the chosen model, as its builder declares it.
    ("net.dropout=1.5", "net.dropout: must be in [0, 1), got 1.5"),
    ("net.activation=tanh", "net.activation: must be one of: relu, prelu"),
    ("net.init=orthogonal", "net.init: must be one of: classic, keras, default"),
    ("net.stem_stride=2", "net.stem_stride: unknown key; valid keys: activation, batch_norm"),
    ("net=3", "net: must be a mapping, got 3"),
    ("~net.lrn", "net.lrn: missing; alexnet takes small_filters, lrn,"),
]

# The same with another model chosen: its own options, composed from conf/.
BAD_FOR_A_MODEL = [
    ("mlp", "net.hidden=0", "net.hidden: must be a positive integer, got 0"),
    ("vgg16", "net.batch_norm=maybe", "net.batch_norm: must be true or false, got 'maybe'"),
    ("resnet18", "net.stem_stride=0", "net.stem_stride: must be a positive integer"),
    ("logreg", "+net.hidden=3", "net.hidden: unknown key; valid keys: (none)"),
    # With a model chosen, conf/ is composed, and Hydra knows no key it was not given.
    ("resnet18", "net.hidden=3", "net.hidden: not a key of params.yaml for this dataset and"),
    ("vgg16", "train.crop_size=8", "train.crop_size: is 8 but vgg16 needs crops of at least 16"),
]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """params.yaml and conf/ of the repository, in a folder of their own."""
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("override, message", BAD)
@pytest.mark.parametrize("command", ["download", "train"])
def test_bad_value_exits_2_with_message(repo_copy, command, override, message):
    result = CliRunner().invoke(app, [command, "-S", override])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (repo_copy / "out").exists()  # failed before any work


@pytest.mark.parametrize("model, override, message", BAD_FOR_A_MODEL)
def test_bad_option_of_another_model_exits_2(repo_copy, model, override, message):
    result = CliRunner().invoke(app, ["train", "-S", f"model={model}", "-S", override])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_value_in_the_file(repo_copy):
    text = (repo_copy / "params.yaml").read_text().replace("batch_size: 32", "batch_size: 0")
    (repo_copy / "params.yaml").write_text(text)
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    assert "params.yaml: train.batch_size: must be a positive integer" in result.output


def test_a_key_taken_out_of_the_file_is_named(repo_copy):
    text = (repo_copy / "params.yaml").read_text().replace("  momentum: 0.9\n", "")
    (repo_copy / "params.yaml").write_text(text)
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    assert "train.momentum: missing; params.yaml sets every key" in result.output


def test_repository_params_are_valid_and_complete():
    p = params.load("params.yaml")
    data = yaml.safe_load(Path("params.yaml").read_text())
    # Every key has a home in the models and every field is in the file, so `dvc exp run -S
    # key=...` can override each of them.
    assert params.flatten(p.to_dict()).keys() == params.flatten(data).keys()


def test_overrides_take_hydra_values():
    p = params.load("params.yaml", ["train.epochs=3", "train.nesterov=false", "train.lr=1e-3"])
    assert (p.train.epochs, p.train.nesterov, p.train.lr) == (3, False, 0.001)
    assert params.load("params.yaml", ["report.pictures=[curves,filters]"]).report.pictures == [
        "curves",
        "filters",
    ]
    with pytest.raises(params.ParamsError, match="expected KEY=VALUE"):
        params.load("params.yaml", ["train.epochs"])
    with pytest.raises(params.ParamsError, match="a stage takes one value"):
        params.load("params.yaml", ["train.lr=0.1,0.2"])


def test_a_plain_override_changes_params_yaml_as_it_stands(repo_copy):
    """Without a group choice, -S changes one value and keeps what params.yaml holds."""
    text = (repo_copy / "params.yaml").read_text().replace("hue: 0.0", "hue: 0.1")
    (repo_copy / "params.yaml").write_text(text)
    p = params.load("params.yaml", ["train.epochs=3"])
    assert (p.train.epochs, p.train.hue) == (3, 0.1)


def test_choosing_a_model_composes_conf_like_dvc_exp_run(repo_copy):
    """-S model=NAME gives the model's own values, whatever params.yaml held."""
    text = (repo_copy / "params.yaml").read_text().replace("hue: 0.0", "hue: 0.1")
    (repo_copy / "params.yaml").write_text(text)
    p = params.load("params.yaml", ["model=resnet50", "train.lr=0.2"])
    composed = params.compose(repo_copy / "conf", ["model=resnet50", "train.lr=0.2"])
    assert p == params.from_dict(composed)
    assert (p.train.lr, p.train.hue, p.net["stem_stride"]) == (0.2, 0.0, 4)


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
            'line 4, column 3: found duplicate key "lr" (while constructing a mapping that'
            " starts on line 2)",
        ),
        ("seed: 0\nseed: 1\n", 'line 2, column 1: found duplicate key "seed"'),
        ("train: {lr: 0.1, lr: 0.2}\n", 'duplicate key "lr"'),
        ("train: [unclosed\n", "bad.yaml: not valid YAML: line 2, column 1: expected ',' or ']'"),
        ("seed: 0\ntrain: [1, 2]\n\tbad: tab\n", "bad.yaml: not valid YAML: line 3"),
        ("- 1\n- 2\n", "bad.yaml: must be a mapping"),
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


@pytest.mark.parametrize("make, message", [(None, "bad.yaml: not found"),
                                           (Path.mkdir, "bad.yaml: not a file")])  # fmt: skip
def test_a_params_file_that_is_missing_or_a_folder_is_named(tmp_path, monkeypatch, make, message):
    monkeypatch.chdir(tmp_path)
    if make:
        make(tmp_path / "bad.yaml")
    result = CliRunner().invoke(app, ["train", "--params", "bad.yaml"])
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_same_key_in_two_sections_is_not_a_duplicate(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  batch_size: 4\nevaluate:\n  batch_size: 8\n")
    assert params.read(tmp_path / "p.yaml") == {
        "train": {"batch_size": 4},
        "evaluate": {"batch_size": 8},
    }


def test_yaml_1_2_as_dvc_reads_it(tmp_path):
    """The values YAML 1.1 (PyYAML) and 1.2 (ruamel, DVC) read differently: training sees what
    `dvc exp show` shows."""
    (tmp_path / "p.yaml").write_text("a: yes\nb: on\nc: 0777\nd: 1:30\ne: 1e-3\n")
    assert params.read(tmp_path / "p.yaml") == {"a": "yes", "b": "on", "c": 777, "d": "1:30",
                                                "e": 0.001}  # fmt: skip


def test_an_override_that_is_not_valid_names_the_override():
    with pytest.raises(params.ParamsError, match="-S 'train.lr=\\[': not a valid override"):
        params.load("params.yaml", ["train.lr=["])


def test_params_are_immutable_and_an_integer_is_a_number():
    p = params.load("params.yaml", ["download.timeout=60"])
    assert p.download.timeout == 60.0 and isinstance(p.download.timeout, float)
    with pytest.raises(ValueError, match="frozen"):
        p.train.lr = 1.0  # type: ignore[misc]
