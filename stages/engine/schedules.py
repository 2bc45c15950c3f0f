"""Learning-rate schedules by name (params.yaml `train.schedule`), stepped once per batch.

Every schedule starts with a linear warm-up over `warmup_epochs`; after it the rate follows the
shape below (torch's LambdaLR), or for `plateau` stays at `lr` until torch's ReduceLROnPlateau
cuts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

if TYPE_CHECKING:  # the engine takes params, it never loads them
    from stages.params import TrainParams

# Multiplier after warm-up as a function of (progress in [0, 1], epoch, params).
SHAPES: dict[str, Callable[[float, int, TrainParams], float]] = {
    "constant": lambda progress, epoch, t: 1.0,
    "cosine": lambda progress, epoch, t: 0.5 * (1 + math.cos(math.pi * progress)),
    "step": lambda progress, epoch, t: 0.1 ** (epoch // t.step_epochs),  # Caffe's AlexNet
    # Linear decay to zero (Li et al., "Budgeted Training", ICLR 2020).
    "linear": lambda progress, epoch, t: 1.0 - progress,
    # One-cycle (Smith): the warm-up is the rising half, then the same linear fall to zero
    # (FFCV's "triangular"): `linear` under the name the recipes use.
    "onecycle": lambda progress, epoch, t: 1.0 - progress,
    "plateau": lambda progress, epoch, t: 1.0,  # lowered by ReduceLROnPlateau instead
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
    """`t.schedule` on `optimizer`: `step()` after each optimizer step, `epoch_end(val_top1)`
    after each epoch. Like torch's schedulers, its state_dict() restores the schedule and the
    optimizer's state_dict() the rate itself: a resume loads both."""

    def __init__(self, optimizer: torch.optim.Optimizer, t: TrainParams, steps_per_epoch: int):
        self.optimizer = optimizer
        self.warmup_steps = t.warmup_epochs * steps_per_epoch
        self.shape = LambdaLR(optimizer, lambda step: multiplier(t, steps_per_epoch, step))
        self.plateau = None
        if t.schedule == "plateau":  # "learning-rate control": cut the rate after
            # `plateau_patience` epochs without a gain in validation top-1 (torch cuts when
            # there were more than `patience` such epochs, hence the - 1).
            self.plateau = ReduceLROnPlateau(
                optimizer, "max", t.plateau_factor, t.plateau_patience - 1,
                threshold=0, threshold_mode="abs", eps=0,
            )  # fmt: skip

    @property
    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def _warming_up(self) -> bool:
        return self.shape.last_epoch < self.warmup_steps

    def step(self) -> None:
        """Call after each optimizer step."""
        # After the warm-up ReduceLROnPlateau owns the `plateau` rate: LambdaLR would reset it.
        if self.plateau is None or self._warming_up:
            self.shape.step()

    def epoch_end(self, val_top1: float) -> None:
        """Tell reduce-on-plateau the epoch's score; a rising rate is no plateau, so the count
        starts with the epoch that ends the warm-up."""
        if self.plateau is not None and not self._warming_up:
            self.plateau.step(val_top1)

    def state_dict(self) -> dict:
        plateau = self.plateau.state_dict() if self.plateau is not None else None
        return {"shape": self.shape.state_dict(), "plateau": plateau}

    def load_state_dict(self, state: dict) -> None:
        if "step_count" in state:  # a last.pt written before the schedule used torch's (its
            # rate, plateau cuts included, is in the optimizer's state as now)
            self.shape.last_epoch = state["step_count"]
            if self.plateau is not None:
                self.shape.last_epoch = min(state["step_count"], self.warmup_steps)
                self.plateau.best = state["best"]
                self.plateau.num_bad_epochs = state["bad_epochs"]
            return
        self.shape.load_state_dict(state["shape"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
