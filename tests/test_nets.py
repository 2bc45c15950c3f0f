"""The model registry and every registered net; adding a net adds its tests."""

from __future__ import annotations

import io
import math
import typing

import pytest
import torch
from torch import nn

import nets
from nets.common import INITS, Activation, Init, InputNorm, init_weights, make_act

NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", nets.names())
def test_shape_finite_and_gradients(name: str, size: int) -> None:
    model = nets.build(name, NUM_CLASSES, size, mean=torch.rand(3, size, size))
    model.train()  # batch of 4 so BatchNorm has statistics to take
    x, y = torch.rand(4, 3, size, size), torch.randint(0, NUM_CLASSES, (4,))
    out = model(x)  # (4, C)
    assert out.shape == (4, NUM_CLASSES)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, y).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", nets.names())
def test_eval_on_crops_of_a_larger_mean_image(name: str) -> None:
    # Tiny ImageNet style: 64 px mean image, model trained and evaluated on 56 px crops.
    model = nets.build(name, NUM_CLASSES, 56, mean=torch.rand(3, 64, 64)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 56, 56))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(nets.UnknownNetError) as info:
        nets.build("foo", NUM_CLASSES, 32)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'foo'" in message
    assert f"valid models: {', '.join(nets.names())}" in message
    with pytest.raises(nets.UnknownNetError):
        nets.options("foo")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="'bogus'.*valid options: small_filters, lrn"):
        nets.build("alexnet", NUM_CLASSES, 32, bogus=1)
    with pytest.raises(ValueError, match="'hidden'.*valid options: \\(none\\)"):
        nets.build("logreg", NUM_CLASSES, 32, hidden=10)


def test_bad_option_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="activation 'tanh'"):
        nets.build("alexnet", NUM_CLASSES, 32, activation="tanh")
    with pytest.raises(ValueError, match="init 'orthogonal'"):
        nets.build("vgg16", NUM_CLASSES, 32, init="orthogonal")
    with pytest.raises(ValueError):
        make_act("gelu")


def test_options_are_the_builder_defaults() -> None:
    assert nets.options("mlp") == {"hidden": 1024, "dropout": 0.0}
    assert nets.options("logreg") == {}
    assert nets.options("resnet50")["stem_stride"] == 1


def test_register_rejects_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        nets.register("mlp")(lambda num_classes, image_size: nn.Identity())


def test_register_rejects_an_option_without_a_type() -> None:
    def untyped(num_classes: int, image_size: int, *, width=4) -> nn.Module:
        return nn.Identity()

    with pytest.raises(TypeError, match="option 'width' needs a type and a default"):
        nets.register("untyped")(untyped)
    assert "untyped" not in nets.names()


@pytest.mark.parametrize("name", nets.names())
def test_each_options_model_takes_the_builder_defaults(name: str) -> None:
    model = nets.options_model(name)
    assert model.model_validate(nets.options(name)).model_dump() == nets.options(name)


def test_option_choices_are_what_the_builders_take() -> None:
    assert set(typing.get_args(Init)) == set(INITS)
    for activation in typing.get_args(Activation):
        make_act(activation, 4)


def test_options_change_the_model() -> None:
    def count(model: nn.Module, kind: type) -> int:
        return sum(isinstance(m, kind) for m in model.modules())

    default = nets.build("alexnet", NUM_CLASSES, 32)
    classic = nets.build("alexnet", NUM_CLASSES, 32, lrn=True, batch_norm=True, activation="relu")
    assert count(default, nn.PReLU) == 7 and count(default, nn.LocalResponseNorm) == 0
    assert count(classic, nn.LocalResponseNorm) == 2 and count(classic, nn.BatchNorm2d) == 5
    assert default.body.features.conv1.kernel_size == (3, 3)
    big = nets.build("alexnet", NUM_CLASSES, 32, small_filters=False)
    assert big.body.features.conv2.kernel_size == (5, 5)
    assert count(nets.build("vgg16", NUM_CLASSES, 32), nn.Conv2d) == 10
    assert nets.build("resnet18", NUM_CLASSES, 64, stem_stride=2).body.conv1.stride == (2, 2)


def _crafted_mean(size: int) -> torch.Tensor:
    c, i, j = torch.meshgrid(
        torch.arange(3.0), torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij"
    )
    return (c * 100 + i * 10 + j) / 1000  # (3, size, size): every entry tells where it came from


def test_input_norm_exact_values() -> None:
    mean, std = _crafted_mean(4), torch.tensor([0.5, 0.25, 2.0])
    norm = InputNorm(mean, std)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - mean) / std.view(3, 1, 1), rtol=0, atol=0)


def test_input_norm_centre_crops_the_mean() -> None:
    mean = _crafted_mean(6)
    norm = InputNorm(mean)
    x = torch.zeros(1, 3, 4, 4)
    torch.testing.assert_close(norm(x)[0], -mean[:, 1:5, 1:5], rtol=0, atol=0)
    x = torch.zeros(1, 3, 3, 5)  # odd margins round the offset down
    torch.testing.assert_close(norm(x)[0], -mean[:, 1:4, 0:5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="larger than the mean image"):
        norm(torch.zeros(1, 3, 8, 8))


def test_input_norm_defaults_and_per_channel_mean() -> None:
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(InputNorm()(x), x)
    assert InputNorm(image_size=32).mean.shape == (3, 32, 32)
    per_channel = InputNorm(mean=[0.1, 0.2, 0.3])
    torch.testing.assert_close(per_channel(x), x - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
    with pytest.raises(ValueError, match="mean must be"):
        InputNorm(mean=torch.zeros(4, 2, 2))


def test_init_weights_matches_xavier_and_he() -> None:
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Linear(2000, 1000))
    nn.init.constant_(model[1].weight, 3.0)
    init_weights(model)
    # PyTorch's default Linear init has std 1/sqrt(3*fan_in) = 0.0129 here: half of Xavier's.
    xavier = math.sqrt(2.0 / (2000 + 1000))
    assert model[2].weight.std().item() == pytest.approx(xavier, rel=0.02)
    he = math.sqrt(2.0 / (64 * 3 * 3))  # fan_in, ReLU gain
    assert model[0].weight.std().item() == pytest.approx(he, rel=0.02)
    assert not model[0].bias.any() and not model[2].bias.any()
    assert torch.equal(model[1].weight, torch.ones(128))

    conv = nn.Conv2d(64, 128, 3)
    init_weights(conv, nonlinearity="prelu")
    prelu = math.sqrt(2.0 / (1 + 0.25**2) / (64 * 3 * 3))
    assert conv.weight.std().item() == pytest.approx(prelu, rel=0.02)

    before = conv.weight.clone()
    init_weights(conv, conv="default")
    assert torch.equal(conv.weight, before)


@pytest.mark.parametrize(("name", "size", "mean_size"), [("vgg16", 32, 32), ("alexnet", 56, 64)])
def test_state_dict_round_trip(name: str, size: int, mean_size: int) -> None:
    mean, std = torch.rand(3, mean_size, mean_size), torch.rand(3) + 0.5
    trained = nets.build(name, NUM_CLASSES, size, mean=mean, std=std, dropout=0.3)
    trained.train()
    trained(torch.rand(4, 3, size, size))  # move the BatchNorm running statistics, if any
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)

    # The loader knows only the name and the options, as from a checkpoint.
    restored = nets.build(name, NUM_CLASSES, size, dropout=0.3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.normalize.mean, mean)
    x = torch.rand(2, 3, size, size)
    trained.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), trained(x))


def test_export_with_a_cropped_mean() -> None:
    model = nets.build("logreg", NUM_CLASSES, 56, mean=torch.rand(3, 64, 64)).eval()
    x = torch.rand(2, 3, 56, 56)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    x5 = torch.rand(5, 3, 56, 56)
    torch.testing.assert_close(exported.module()(x5), model(x5))


def test_overfits_one_small_batch() -> None:
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    model = nets.build("mlp", 4, 32, mean=torch.full((3, 32, 32), 0.5), hidden=256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
