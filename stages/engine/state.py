"""A training run's state: the parts every step touches and what carries over between epochs.

`RunState.state_dict()` is what last.pt and best.pt hold besides the model's inference keys
(its keys are stages.core.checkpoint.RESUME_KEYS); resuming a run is
`state.load_state_dict(saved)`, the way torch's optimizers and schedulers restore themselves.
Restoring the random number generators too makes a resumed run draw the same batches,
augmentations and dropout masks as one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from stages.engine.device import Speed
from stages.engine.distributed import Dist
from stages.engine.schedules import Schedule


@dataclass(eq=False)
class RunState:
    """Everything one training run builds once (model, optimizer, schedule, scaler, EMA, batch
    generator, loss, device settings) and its bookkeeping from epoch to epoch."""

    net: nn.Module  # what trains: `model`, DDP-wrapped and/or compiled
    model: nn.Module  # the plain model: state dicts, evaluation
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None  # moving average of the weights (train.ema_decay), or None
    generator: torch.Generator  # batch order and augmentations, on the training device
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    speed: Speed  # device, precision, memory format
    dist: Dist = field(default_factory=Dist)  # the processes training together
    history: list[dict[str, float]] = field(default_factory=list)  # a row per finished epoch
    best: float = -1.0  # the best validation top-1 so far (of the EMA weights when on)
    since_best: int = 0  # epochs since `best` last rose (train.patience)
    mlflow_run_id: str | None = None  # the run's MLflow run (known to rank 0 only)
    complete: bool = False  # training finished and model.pt was written

    @property
    def epoch(self) -> int:
        """The last finished epoch; 0 before the first."""
        return int(self.history[-1]["epoch"]) if self.history else 0

    @property
    def metrics(self) -> dict[str, float]:
        """The last finished epoch's row of the history ({} before the first)."""
        return dict(self.history[-1]) if self.history else {}

    @property
    def result(self) -> nn.Module:
        """The network the run delivers: the EMA's weights when on, else the model's."""
        return self.ema.module if self.ema is not None else self.model

    def end_epoch(self, epoch: int, row: dict[str, float]) -> bool:
        """Record epoch `epoch`'s metrics and tell the schedule its score; True on a new best.

        The score is the validation top-1 of `result` (the EMA weights when on).
        """
        score = row["ema_val_top1" if self.ema is not None else "val_top1"]
        self.schedule.epoch_end(score)
        self.history.append({"epoch": epoch, **row})
        improved = score > self.best
        self.best, self.since_best = (score, 0) if improved else (self.best, self.since_best + 1)
        return improved

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to continue this run exactly."""
        device = self.generator.device
        return {
            "raw_model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "generator": self.generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "history": list(self.history),
            "best": self.best,
            "since_best": self.since_best,
            "mlflow_run_id": self.mlflow_run_id,
            "world": self.dist.world,  # a run resumes only with as many processes
            "complete": self.complete,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a `state_dict()`, e.g. read from last.pt)."""
        self.model.load_state_dict(state["raw_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        rng, device = state["rng"], self.generator.device
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"].cpu())  # a generator's state is a CPU tensor
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        self.history = list(state["history"])
        self.best, self.since_best = state["best"], state["since_best"]
        self.mlflow_run_id, self.complete = state["mlflow_run_id"], state["complete"]
