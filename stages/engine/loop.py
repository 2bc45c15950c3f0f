"""The training loop: one epoch of batched steps, and validation on the centre crop.

`run_epoch` (`train_one_epoch`, then `validate`) is all the stage's driver (stages/train.py)
calls per epoch; everything they touch is built once per run into `Engine`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from stages.core import paths
from stages.core.errors import PipelineError
from stages.data.augment import augment, augment_options
from stages.engine import distributed
from stages.engine.device import Speed
from stages.engine.distributed import Dist
from stages.engine.inference import predict_proba
from stages.engine.schedules import Schedule

if TYPE_CHECKING:
    from stages.params import TrainParams


class TrainingError(PipelineError):
    """Training cannot go on: the loss diverged or the batch does not fit in memory."""


@dataclass
class Engine:
    """Everything one training step touches, built once per run."""

    net: nn.Module  # what trains: the model, DDP-wrapped and/or compiled
    raw: nn.Module  # the plain model: state dicts, evaluation
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loss_fn: Any
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    speed: Speed
    dist: Dist
    generator: torch.Generator


def run_epoch(
    e: Engine, train: tuple[torch.Tensor, torch.Tensor], val: tuple[np.ndarray, np.ndarray],
    t: TrainParams, val_batch: int, epoch: int,
) -> dict[str, float]:  # fmt: skip
    """Train one epoch on this rank's `train` (images, labels), then validate the model (and
    its EMA) on `val`: the epoch's metrics, its learning rate, seconds and throughput."""
    lr = e.schedule.lr
    tic = time.perf_counter()
    row = train_one_epoch(e, *train, t, epoch)
    seconds = time.perf_counter() - tic
    seen = row.pop("images")  # trained on, over every rank
    row |= validate(e.raw, *val, t.crop_size, val_batch, e.speed, e.dist)
    if e.ema is not None:
        row |= validate(e.ema.module, *val, t.crop_size, val_batch, e.speed, e.dist, "ema_val_")
    return row | {"lr": lr, "epoch_seconds": seconds, "images_per_second": seen / seconds}


def train_one_epoch(
    e: Engine, images: torch.Tensor, labels: torch.Tensor, t: TrainParams, epoch: int
) -> dict[str, float]:
    """One pass over a fresh permutation of the training set (images (N, H, W, 3) uint8, labels).

    Under DDP every rank draws the same permutation (same generator state) and trains on its
    part of each global batch: together the ranks take the steps one process would.
    Returns the mean train loss and top-1 over the images actually seen, and their number
    (`images`): a batch larger than the set holds only the set, and counts as such.
    """
    e.net.train()
    # train.batch_size is the global batch (rounded down to a multiple of the ranks).
    batch = max(1, t.batch_size // e.dist.world) * e.dist.world
    steps = e.schedule.steps_per_epoch  # the same on every rank: DDP steps in lockstep
    order = torch.randperm(len(labels), device=images.device, generator=e.generator)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    seen = 0
    # A GPU syncs to test the loss; there it is read every 25 steps, on the CPU every step.
    check = 1 if images.device.type == "cpu" else 25
    desc = f"epoch {epoch}/{t.epochs}"
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for step in bar:
        idx = order[step * batch : (step + 1) * batch]  # (G,) the global batch
        part = e.dist.part(len(idx))  # this rank's share of it (all of it in one process)
        within = (part.start, len(idx))  # augmentation draws for the global batch, see Draws
        x = augment(
            images, generator=e.generator, index=idx[part], within=within, **augment_options(t)
        )  # (B, 3, S, S)
        y = labels[idx[part]]  # (B,)
        with e.speed.autocast():
            logits = e.net(e.speed.inputs(x))  # (B, K)
            loss = e.loss_fn(logits, y)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if (step % check == 0 or step == steps - 1) and not torch.isfinite(loss_sum):
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch}, step {step + 1}/{steps}"
                f" (learning rate {e.schedule.lr:.3g}); stopped. {paths.LAST} holds the last"
                " good epoch; lower train.lr or check the data"
            )
        e.optimizer.zero_grad(set_to_none=True)
        e.scaler.scale(loss).backward()
        e.scaler.step(e.optimizer)
        e.scaler.update()
        e.schedule.step()
        if e.ema is not None:
            e.ema.update_parameters(e.raw)
        correct += (logits.argmax(1) == y).sum()
        if step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    count = torch.tensor(float(seen), device=images.device)
    sums = distributed.all_sum(e.dist, torch.stack([loss_sum, correct.float(), count]).float())
    n = sums[2].item()
    return {"train_loss": sums[0].item() / n, "train_top1": sums[1].item() / n, "images": n}


def validate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, size: int, batch_size: int,
    speed: Speed, d: Dist, prefix: str = "val_",
) -> dict[str, float]:  # fmt: skip
    """Centre-crop loss, top-1 and top-5 over every rank's shard of the validation set."""
    probs = predict_proba(model, images, size, 1, batch_size, speed=speed)  # (M, K) on CPU
    y = torch.from_numpy(np.asarray(labels))  # (M,)
    top = probs.topk(min(5, probs.shape[1]), dim=1).indices  # (M, k)
    nll = -probs[torch.arange(len(y)), y].clamp_min(1e-12).log()  # (M,)
    local = [nll.sum(), (top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(), len(y)]
    s = distributed.all_sum(d, torch.tensor([float(v) for v in local], device=speed.device))
    n = max(1.0, s[3].item())
    return {f"{prefix}loss": s[0].item() / n, f"{prefix}top1": s[1].item() / n,
            f"{prefix}top5": s[2].item() / n}  # fmt: skip
