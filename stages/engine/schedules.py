"""Learning-rate schedules by name (params.yaml `train.schedule`), stepped once per batch.

Every schedule starts with a linear warm-up over `warmup_epochs`; after it the rate follows the
shape below, times the plateau factor (which only the `plateau` schedule ever lowers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the engine takes params, it never loads them
    from stages.params import TrainParams

# Multiplier after warm-up as a function of (progress in [0, 1], epoch, params).
SHAPES: dict[str, Callable[[float, int, TrainParams], float]] = {
    "constant": lambda progress, epoch, t: 1.0,
    "cosine": lambda progress, epoch, t: 0.5 * (1 + math.cos(math.pi * progress)),
    "step": lambda progress, epoch, t: 0.1 ** (epoch // t.step_epochs),  # Caffe's AlexNet
    # One-cycle (Smith): the warm-up is the rising half; then a linear fall to zero.
    "onecycle": lambda progress, epoch, t: 1.0 - progress,
    "plateau": lambda progress, epoch, t: 1.0,  # lowered by Schedule.epoch_end instead
}


def multiplier(t: TrainParams, steps_per_epoch: int, step: int) -> float:
    """The rate multiplier (of `t.lr`) in effect for optimizer step `step` (0-based)."""
    warmup = t.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    total = t.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return SHAPES[t.schedule](progress, step // steps_per_epoch, t)


class Schedule:
    """Sets the optimizer's rates before each step; checkpointable via state_dict()."""

    def __init__(self, optimizer: torch.optim.Optimizer, t: TrainParams, steps_per_epoch: int):
        self.optimizer, self.t, self.steps_per_epoch = optimizer, t, steps_per_epoch
        self.step_count = 0
        self.plateau = 1.0  # multiplier from reduce-on-plateau
        self.best = -math.inf  # best validation top-1 seen by the plateau logic
        self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.t.lr * self.plateau * multiplier(self.t, self.steps_per_epoch, self.step_count)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        """Call after each optimizer step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, val_top1: float) -> None:
        """Reduce-on-plateau ("learning-rate control"): cut the rate after `plateau_patience`
        epochs without a gain in validation top-1."""
        if self.t.schedule != "plateau":
            return
        if val_top1 > self.best:
            self.best, self.bad_epochs = val_top1, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.t.plateau_patience:
            self.plateau *= self.t.plateau_factor
            self.bad_epochs = 0
            self._apply()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("step_count", "plateau", "best", "bad_epochs")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()
