"""Training losses by name (params.yaml `train.loss`): each maps (logits, labels) to a scalar."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def multiclass_hinge(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0):
    """Multiclass SVM loss (Weston-Watkins, as in CS231n): mean over samples of
    sum_{j != y} max(0, s_j - s_y + margin). logits (B, K) float, labels (B,) int64."""
    correct = logits.gather(1, labels[:, None])  # (B, 1)
    margins = (logits - correct + margin).clamp_min(0)  # (B, K)
    margins = margins.scatter(1, labels[:, None], 0.0)  # the true class contributes nothing
    return margins.sum(1).mean()


def make_loss(name: str, label_smoothing: float = 0.0) -> Loss:
    """`cross_entropy` (smoothed with `label_smoothing` > 0: that much probability spread over
    all classes) or `hinge`. Losses are computed in fp32 even under autocast."""
    losses: dict[str, Loss] = {
        "cross_entropy": lambda z, y: F.cross_entropy(
            z.float(), y, label_smoothing=label_smoothing
        ),
        "hinge": lambda z, y: multiclass_hinge(z.float(), y),
    }
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(losses)}")
    return losses[name]
