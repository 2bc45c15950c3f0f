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


# Fused kernels update every parameter in one pass, on the CPU too: one SGD step of
# resnet18 took 103 ms as torch's default CPU for-loop, 41 ms with foreach and 13 ms fused
# (BENCHMARKS.md, "The rest of the step"), out of a step of about 300 ms.
OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda groups, t, fast: torch.optim.SGD(
        groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0, **fast
    ),
    "adam": lambda groups, t, fast: torch.optim.Adam(groups, lr=t.lr, **fast),
    "adamw": lambda groups, t, fast: torch.optim.AdamW(groups, lr=t.lr, **fast),
    "adagrad": lambda groups, t, fast: torch.optim.Adagrad(groups, lr=t.lr, **fast),
}


def make_optimizer(model: nn.Module, t: TrainParams) -> torch.optim.Optimizer:
    """`t.optimizer` over the model's trainable parameters, decaying as `t` says; fused where
    this torch and device have the kernel, else foreach (never the per-tensor loop)."""
    make = OPTIMIZERS[t.optimizer]

    def groups() -> list[dict]:  # made anew for each try: a failed one may have changed them
        return _param_groups(model, t.weight_decay, t.decay_norm_and_bias)

    try:
        return make(groups(), t, {"fused": True})
    except (RuntimeError, ValueError):  # no fused kernel for this optimizer or device
        return make(groups(), t, {"foreach": True})
