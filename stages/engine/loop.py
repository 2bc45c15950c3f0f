"""The training loop: one epoch of batched steps, and validation on the centre crop.

`run_epoch` (`train_one_epoch`, then `validate`) is all the stage's driver (stages/train.py)
calls per epoch; everything they touch is built once per run into a `RunState`.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.core import paths
from stages.core.errors import PipelineError
from stages.data.augment import augment, augment_options
from stages.data.stream import Resident, Streamed
from stages.engine import distributed
from stages.engine.device import Speed
from stages.engine.distributed import Dist
from stages.engine.inference import nll, predict_proba, topk_accuracy

if TYPE_CHECKING:
    from stages.engine.state import RunState
    from stages.params import TrainParams


class TrainingError(PipelineError):
    """Training cannot go on: the loss diverged or the batch does not fit in memory."""


def run_epoch(
    run: RunState, train: Resident | Streamed, val: tuple[np.ndarray, np.ndarray],
    settings: TrainParams, val_batch: int, epoch: int,
) -> dict[str, float]:  # fmt: skip
    """Train one epoch on `train`, then validate the model (and its EMA) on this rank's `val`
    (images, labels): the epoch's metrics, its learning rate, seconds and throughput."""
    lr = run.schedule.lr
    tic = time.perf_counter()
    row = train_one_epoch(run, train, settings, epoch)
    seconds = time.perf_counter() - tic
    seen = row.pop("images")  # trained on, over every rank
    size, speed, dist = settings.crop_size, run.speed, run.dist
    row |= validate(run.model, *val, size, val_batch, speed, dist)
    if run.ema is not None:
        row |= validate(run.ema.module, *val, size, val_batch, speed, dist, "ema_val_")
    return row | {"lr": lr, "epoch_seconds": seconds, "images_per_second": seen / seconds}


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Optimizer steps in an epoch of `n` images: whole global batches of `batch_size` (rounded
    down to a multiple of the `world` ranks) only, so that an epoch never ends on a smaller
    batch (of 1, say); one batch of all `n` when they are fewer."""
    return max(1, n // (max(1, batch_size // world) * world))


def train_one_epoch(
    run: RunState, train: Resident | Streamed, settings: TrainParams, epoch: int
) -> dict[str, float]:
    """One pass over a fresh permutation of the training set (resident or streamed).

    Under DDP every rank draws the same permutation (same generator state) and trains on its
    part of each global batch: together the ranks take the steps one process would.
    Returns the mean train loss and top-1 over the images actually seen, and their number
    (`images`): a batch larger than the set holds only the set, and counts as such.
    """
    run.net.train()
    device, dist = run.speed.device, run.dist
    # train.batch_size is the global batch (rounded down to a multiple of the ranks).
    batch = max(1, settings.batch_size // dist.world) * dist.world
    # Every rank holds the whole set: the same count everywhere, DDP's lockstep.
    steps = steps_per_epoch(len(train), settings.batch_size, dist.world)
    order = torch.randperm(len(train), device=device, generator=run.generator)
    part = dist.part(min(batch, len(train)))  # this rank's share of each global batch
    within = (part.start, min(batch, len(train)))  # augmentation draws for it, see Draws
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    # A GPU syncs to test the loss; there it is read every 25 steps, on the CPU every step.
    check = 1 if device.type == "cpu" else 25
    options = augment_options(settings, epoch)
    desc = f"epoch {epoch}/{settings.epochs}"
    batches = train.steps(order, batch, steps, part)
    bar = tqdm(batches, total=steps, desc=desc, leave=False, disable=not sys.stderr.isatty())
    for step, (images, index, y) in enumerate(bar):
        x = augment(images, generator=run.generator, index=index, within=within, **options)
        with run.speed.autocast():  # x: (B, 3, S, S)
            logits = run.net(run.speed.inputs(x))  # (B, K)
            loss = run.loss_fn(logits, y)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if (step % check == 0 or step == steps - 1) and not torch.isfinite(loss_sum):
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch}, step {step + 1}/{steps}"
                f" (learning rate {run.schedule.lr:.3g}); stopped. {paths.LAST} holds the last"
                " good epoch; lower train.lr or check the data"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.schedule.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        correct += (logits.argmax(1) == y).sum()
        if step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    count = torch.tensor(float(seen), device=device)
    sums = distributed.all_sum(dist, torch.stack([loss_sum, correct.float(), count]).float())
    n = sums[2].item()
    return {"train_loss": sums[0].item() / n, "train_top1": sums[1].item() / n, "images": n}


def validate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, size: int, batch_size: int,
    speed: Speed, dist: Dist, prefix: str = "val_",
) -> dict[str, float]:  # fmt: skip
    """Centre-crop loss, top-1 and top-5 over every rank's shard of the validation set (the
    shards' means weighted by their sizes)."""
    probs = predict_proba(model, images, size, 1, batch_size, speed=speed)  # (M, K) on CPU
    means = topk_accuracy(probs, labels) | {"loss": nll(probs, labels)}
    names, n = ("loss", "top1", "top5"), len(labels)
    local = torch.tensor([means[k] * n for k in names] + [n], device=speed.device)
    *totals, count = distributed.all_sum(dist, local).tolist()
    return {f"{prefix}{k}": total / count for k, total in zip(names, totals, strict=True)}
