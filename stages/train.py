"""Stage 3, train: one model on one dataset, data and augmentation on the training device.

Writes out/train/model.pt (checkpoint, atomically, once training finished) and
out/train/history.csv (one row per epoch, for `dvc plots`), and logs everything to one MLflow run.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable

import mlflow
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import nets
from stages import checkpoint, paths, pretrained, tracking
from stages.data import Processed, augment, load_processed
from stages.device import resolve_device
from stages.files import atomic_path
from stages.inference import nll, predict_proba, topk_accuracy
from stages.params import Params, TrainParams, flatten


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay weights only: decaying biases and norm scales just fights the normalisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


OPTIMIZERS: dict[str, Callable[[list[dict], TrainParams], torch.optim.Optimizer]] = {
    "sgd": lambda groups, t: torch.optim.SGD(
        groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0
    ),
    "adam": lambda groups, t: torch.optim.Adam(groups, lr=t.lr),
}

# Learning-rate multiplier after warm-up, as a function of (progress in [0, 1], epoch, params).
SCHEDULES: dict[str, Callable[[float, int, TrainParams], float]] = {
    "constant": lambda progress, epoch, t: 1.0,
    "cosine": lambda progress, epoch, t: 0.5 * (1 + math.cos(math.pi * progress)),
    "step": lambda progress, epoch, t: 0.1 ** (epoch // t.step_epochs),  # Caffe's AlexNet
}


def lr_lambda(t: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier: linear warm-up over `warmup_epochs`, then the chosen schedule."""
    warmup = t.warmup_epochs * steps_per_epoch
    total = t.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return SCHEDULES[t.schedule](progress, step // steps_per_epoch, t)

    return factor


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    t: TrainParams,
    generator: torch.Generator,
    desc: str,
) -> dict[str, float]:
    """One pass over a fresh permutation of (images (N, H, W, 3) uint8, labels (N,))."""
    model.train()
    steps = max(1, len(labels) // t.batch_size)  # drop the ragged last batch (batch-norm)
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    bar = tqdm(range(steps), desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())
    for step in bar:
        idx = order[step * t.batch_size : (step + 1) * t.batch_size]
        x = augment(images[idx], t.crop_size, t.pad, t.flip, generator)  # (B, 3, S, S)
        y = labels[idx]  # (B,)
        logits = model(x)  # (B, K)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        if step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seen = min(len(labels), steps * t.batch_size)
    return {"train_loss": loss_sum.item() / seen, "train_top1": correct.item() / seen}


def validate(model: nn.Module, data: Processed, p: Params, device: torch.device) -> dict:
    """Single (centre) crop validation loss, top-1 and top-5."""
    probs = predict_proba(
        model, data.val_images, p.train.crop_size, 1, p.evaluate.batch_size, device
    )
    labels = torch.from_numpy(data.val_labels)
    acc = topk_accuracy(probs, labels)
    return {"val_loss": nll(probs, labels), "val_top1": acc["top1"], "val_top5": acc["top5"]}


def _write_history(rows: list[dict]) -> None:
    with atomic_path(paths.HISTORY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _log_model(model: nn.Module, size: int) -> None:
    model = model.cpu().eval()
    # Batch of 2: torch.export fixes a size-1 dimension, and the model must take any batch size.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature)


def train(p: Params) -> dict[str, float]:
    """Train `p.model` on the preprocessed data; returns the last epoch's metrics."""
    t = p.train
    device = resolve_device(t.device)
    torch.manual_seed(p.seed)
    data = load_processed()
    images = torch.from_numpy(np.ascontiguousarray(data.train_images)).to(device)  # (N,H,W,3)
    labels = torch.from_numpy(data.train_labels).to(device)  # (N,)
    model = nets.build(
        p.model,
        len(data.classes),
        t.crop_size,
        mean=data.mean_tensor(),
        std=data.std_tensor(),
        **p.net_options,
    )
    model = pretrained.initialise(model, p).to(device)  # train.init: scratch/pretrained/PATH
    generator = torch.Generator(device=device).manual_seed(p.seed)
    optimizer = OPTIMIZERS[t.optimizer](_param_groups(model, t.weight_decay), t)
    steps = max(1, len(labels) // t.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    print(
        f"train: {p.model} ({sum(q.numel() for q in model.parameters()):,} parameters) on"
        f" {p.dataset}: {len(labels)} images, {t.epochs} epochs, device {device}"
    )

    history: list[dict] = []
    with tracking.run(run_name=p.model, tags=tracking.run_tags(p.dataset, p.model)) as run:
        mlflow.log_params(flatten(p.to_dict()))
        for epoch in range(1, t.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            pretrained.freeze_body(model, frozen=epoch <= t.freeze_epochs)
            start = time.perf_counter()
            row = train_one_epoch(
                model, optimizer, scheduler, loss_fn, images, labels, t, generator,
                desc=f"epoch {epoch}/{t.epochs}",
            )  # fmt: skip
            seconds = time.perf_counter() - start
            row |= validate(model, data, p, device)
            row |= {"lr": lr, "epoch_seconds": seconds}
            row["images_per_second"] = steps * t.batch_size / seconds
            history.append({"epoch": epoch, **row})
            _write_history(history)
            mlflow.log_metrics(row, step=epoch)
            print(
                f"epoch {epoch:3d}/{t.epochs}  loss {row['train_loss']:.4f}"
                f"  train {row['train_top1']:.2%}  val loss {row['val_loss']:.4f}"
                f"  val top-1 {row['val_top1']:.2%}  top-5 {row['val_top5']:.2%}"
                f"  lr {lr:.2e}  {row['images_per_second']:.0f} img/s",
                flush=True,
            )
        checkpoint.save(
            paths.CHECKPOINT,
            {
                "net": p.model,
                "net_options": p.net_options,
                "num_classes": len(data.classes),
                "image_size": t.crop_size,
                "classes": data.classes,
                "params": p.to_dict(),
                "epoch": t.epochs,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
                "metrics": history[-1],
                "mlflow_run_id": run.info.run_id,
            },
        )
        mlflow.log_artifact(str(paths.HISTORY))
        mlflow.log_artifact(str(paths.PROCESSED / "mean.png"))
        _log_model(model, t.crop_size)
    return history[-1]
