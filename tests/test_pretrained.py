"""Transfer learning from torchvision's weight cache (fabricated locally) and from a checkpoint."""

from urllib.error import URLError

import pytest
import torch
from helpers import fabricate
from torchvision import models as tvm

import nets
from stages import params
from stages.engine import pretrained
from stages.engine.model import check_model_params


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub cache in a temporary TORCH_HOME, and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise URLError("no internet in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def p(*overrides):
    return params.load("params.yaml", ["train.init=pretrained", *overrides])


def test_resnet18_loads_a_locally_placed_weights_file(hub, capsys):
    torch.manual_seed(0)
    source = tvm.resnet18(weights=None).state_dict()  # torchvision's own layout and names
    path = pretrained.weights_file(tvm.ResNet18_Weights.IMAGENET1K_V1)
    assert path.parent == hub and path.name == "resnet18-f37072fd.pth"
    hub.mkdir(parents=True)
    torch.save(source, path)

    model = nets.build("resnet18", 10, 28)
    fresh_stem = model.body.conv1.weight.clone()
    fresh_head = model.body.fc.weight.clone()
    model = pretrained.initialise(model, p("model=resnet18"))
    assert torch.equal(model.body.layer3[1].conv2.weight, source["layer3.1.conv2.weight"])
    assert torch.equal(model.body.bn1.running_var, source["bn1.running_var"])
    assert torch.equal(model.body.conv1.weight, fresh_stem)  # 3x3 stem vs 7x7: kept fresh
    assert torch.equal(model.body.fc.weight, fresh_head)  # 10-way head: new
    assert model.body.fc.weight.shape == (10, 512)
    out = capsys.readouterr().out
    assert "kept fresh (shape differs): body.conv1.weight" in out

    pretrained.freeze_body(model, frozen=True)
    assert not model.body.layer1[0].conv1.weight.requires_grad
    assert model.body.fc.weight.requires_grad and model.body.conv1.weight.requires_grad
    pretrained.freeze_body(model, frozen=False)
    assert all(q.requires_grad for q in model.parameters())


def test_alexnet_layers_are_renamed_and_mismatched_ones_skipped(hub):
    # Only the conv layers of torchvision's AlexNet (its classifier is 230 MB): partial files
    # load what they have.
    tv = tvm.alexnet(weights=None).features.state_dict()
    source = {f"features.{k}": v for k, v in tv.items()}
    hub.mkdir(parents=True)
    torch.save(source, pretrained.weights_file(tvm.AlexNet_Weights.IMAGENET1K_V1))
    model = pretrained.initialise(nets.build("alexnet", 10, 28), p("model=alexnet"))
    conv = model.body.features
    assert torch.equal(conv.conv3.weight, source["features.6.weight"])
    assert torch.equal(conv.conv5.bias, source["features.10.bias"])
    assert conv.conv1.weight.shape == (64, 3, 3, 3)  # 11x11 in torchvision: not copied
    assert "body.features.conv3.weight" in model.pretrained_parameters
    assert "body.features.conv1.weight" not in model.pretrained_parameters


def test_missing_weights_without_internet_name_the_file_and_folder(hub):
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.initialise(nets.build("resnet18", 10, 28), p("model=resnet18"))
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(hub) in message
    assert "\n" not in message
    assert not list(hub.iterdir())  # nothing half-downloaded left


def test_init_from_a_project_checkpoint(tmp_path):
    source = fabricate.model(seed=3)
    fabricate.save_checkpoint(tmp_path / "old.pt", source)
    overrides = [f"train.init={tmp_path / 'old.pt'}", "train.freeze_epochs=1"]
    target = fabricate.model(seed=4)
    target = pretrained.initialise(target, fabricate.p(*overrides))
    assert torch.equal(target.body.features.conv2.weight, source.body.features.conv2.weight)
    assert torch.equal(target.body.classifier.fc3.weight, source.body.classifier.fc3.weight)


def test_transfer_params_are_validated():
    with pytest.raises(params.ParamsError, match="train.freeze_epochs: needs train.init"):
        params.load("params.yaml", ["train.freeze_epochs=2"])
    with pytest.raises(params.ParamsError, match="train.init: no pretrained weights for mlp"):
        check_model_params(params.load("params.yaml", ["train.init=pretrained", "model=mlp"]))
    with pytest.raises(params.ParamsError, match="train.freeze_epochs: must be >= 0"):
        params.load("params.yaml", ["train.init=pretrained", "train.freeze_epochs=-1"])
