"""VGG for 32-64 px images, and VGG-16 as Keras builds it.

`vgg16` is VGG's configuration D with the last max-pool and the last three 3x3 conv layers
removed: five pools would take 32 px to 1 px, and the dropped 512-channel layers work on 2x2 maps
where they hold half the conv parameters (7M of 14.7M in VGG-16) for little spatial context.
`vgg16-keras` keeps all 13 convolutions and 5 pools (Keras's `VGG16(include_top=False)`), with
dropout and one dense layer on top: the network of Keras write-ups that train it on 32 px MNIST.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from nets.common import Dropout, Init, apply_init
from nets.registry import register

# Conv widths, "M" = 2x2 max-pool. Another depth is one more line here plus a builder below.
CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"),
}
CFGS["vgg16-keras"] = CFGS["vgg16"] + (512, 512, 512, "M")  # configuration D, whole


def _features(
    cfg: tuple[int | str, ...], batch_norm: bool, ceil_mode: bool = False
) -> tuple[nn.Sequential, int]:
    """The conv stack of a config and its output channels."""
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=ceil_mode))  # (B, cin, h/2, w/2)
            continue
        layers.append(nn.Conv2d(cin, v, 3, padding=1, bias=not batch_norm))  # (B, v, h, w)
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        cin = v
    return nn.Sequential(*layers), cin


class VGG(nn.Module):
    """Conv stack from a config, 2x2 average pool, three FC layers."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int,
        batch_norm: bool,
        dropout: float,
        fc_width: int,
    ) -> None:
        super().__init__()
        self.features, cin = _features(cfg, batch_norm)
        # Fixed 2x2 grid: the same FC layers serve 32, 56 and 64 px inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(cin * 2 * 2, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, s/16, s/16)
        x = self.avgpool(x).flatten(1)  # (B, 2048)
        return self.classifier(x)  # (B, C)


@register("vgg16")
def vgg16(
    num_classes: int,
    image_size: int,
    *,
    batch_norm: bool = True,
    dropout: Dropout = 0.5,
    fc_width: PositiveInt = 1024,
    init: Init = "classic",
) -> nn.Module:
    """VGG-16 minus its last three conv layers and last pool (10 conv + 3 FC)."""
    model = VGG(CFGS["vgg16"], num_classes, batch_norm, dropout, fc_width)
    return apply_init(model, init)


@register("vgg16-keras")
def vgg16_keras(
    num_classes: int,
    image_size: int,
    *,
    batch_norm: bool = False,
    dropout: Dropout = 0.5,
    init: Init = "keras",
) -> nn.Module:
    """VGG-16 as Keras builds it (13 conv, 5 max-pools, Glorot init, no batch norm), then
    global average pooling (at 32 px the map is 1x1: Keras's Flatten), dropout, one dense layer.
    The pools round up, so 28 px crops work too (28 -> 14 -> 7 -> 4 -> 2 -> 1); at 32 and 64 px
    every map is even and that is Keras's network exactly."""
    features, channels = _features(CFGS["vgg16-keras"], batch_norm, ceil_mode=True)
    model = nn.Sequential(
        features,  # (B, 512, s/32, s/32)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 512)
        nn.Dropout(dropout),
        nn.Linear(channels, num_classes),  # (B, C)
    )
    return apply_init(model, init)
