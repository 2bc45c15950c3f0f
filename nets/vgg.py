"""VGG for 32-64 px images.

Each configuration is VGG's with the last max-pool and the last three 3x3 conv layers removed:
five pools would take 32 px to 1 px, and the dropped 512-channel layers work on 2x2 maps where
they hold half the conv parameters (7M of 14.7M in VGG-16) for little spatial context.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from nets import register
from nets.common import Dropout, Init, apply_init

# Conv widths, "M" = 2x2 max-pool. Another depth is one more line here plus a builder below.
CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"),
}


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
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))  # (B, cin, h/2, w/2)
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1, bias=not batch_norm))  # (B, v, h, w)
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        self.features = nn.Sequential(*layers)
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
