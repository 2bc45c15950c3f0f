"""Optimizers from params: a lookup table, and weight decay on weights only (unless asked)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the engine takes params, it never loads them
    from stages.params import TrainParams


def _param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    # Decay weights only: decaying biases and norm scales just fights the normalisation.
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


# Fused (CUDA) kernels update all parameters in one launch; on the CPU the default is kept.
OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda groups, t, fused: torch.optim.SGD(
        groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0, fused=fused
    ),
    "adam": lambda groups, t, fused: torch.optim.Adam(groups, lr=t.lr, fused=fused),
    "adamw": lambda groups, t, fused: torch.optim.AdamW(groups, lr=t.lr, fused=fused),
    "adagrad": lambda groups, t, fused: torch.optim.Adagrad(groups, lr=t.lr),
}


def make_optimizer(
    model: nn.Module, t: TrainParams, fused: bool | None = None
) -> torch.optim.Optimizer:
    """`t.optimizer` over the model's trainable parameters, decaying as `t` says."""
    groups = _param_groups(model, t.weight_decay, t.decay_norm_and_bias)
    return OPTIMIZERS[t.optimizer](groups, t, fused)
