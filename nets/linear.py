"""Multinomial logistic regression on raw pixels: the baseline every convnet must beat."""

from __future__ import annotations

from torch import nn

from nets.registry import register


# Many cheap epochs: 93.6% 10-crop on digits (92.5% after 10), about 10 s on 2 CPU cores.
@register("logreg")
def logreg(num_classes: int, image_size: int) -> nn.Module:
    """Flatten + one Linear layer."""
    return nn.Sequential(
        nn.Flatten(),  # (B, 3*s*s)
        nn.Linear(3 * image_size * image_size, num_classes),  # (B, C)
    )
