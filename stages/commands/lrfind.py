"""The `lr-find` command: the learning-rate range test (Smith 2017; fast.ai's lr_find).

A fresh model (params.yaml's model, optimizer, batch size and augmentation) trains for `steps`
mini-batches while the rate grows exponentially from `start` to `end`; the loss is smoothed with
a bias-corrected moving average and the test stops once it diverges (4x its minimum). The
suggestion is the rate at the minimum divided by 10: safely on the descending slope, where
training is fast but not yet unstable. Writes out/lr_find/ (CSV + plot) and logs an MLflow run.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented API: no pyplot state, no display
from torch import nn
from tqdm import tqdm

from stages.core import paths, tracking
from stages.core.errors import PipelineError
from stages.core.files import atomic_dir
from stages.core.runlog import run_log
from stages.data.augment import augment, augment_options
from stages.data.processed import load_processed
from stages.engine.device import resolve_device
from stages.engine.model import build_model
from stages.engine.optim import make_optimizer
from stages.params import Params


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    start: float,
    end: float,
    steps: int,
    beta: float = 0.98,
    diverge: float = 4.0,
) -> RangeTest:
    """Run the test on `batches` (an iterator of (x, y)); returns rates, smoothed losses, pick."""
    if not 0 < start < end:
        raise PipelineError(f"lr-find: need 0 < --start < --end, got {start} and {end}")
    if steps < 2:
        raise PipelineError(f"lr-find: --steps must be at least 2, got {steps}")
    loss_fn = nn.CrossEntropyLoss()
    factor = (end / start) ** (1 / (steps - 1))  # the rate grows by this much each step
    model.train()
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    bar = tqdm(range(steps), desc="lr-find", leave=False, disable=not sys.stderr.isatty())
    for step in bar:
        lr = start * factor**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        avg = beta * avg + (1 - beta) * value
        smoothed = avg / (1 - beta ** (step + 1))  # bias correction: early steps are not ~0
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 0 and smoothed > diverge * best:
            break
    if not losses:
        raise PipelineError(f"lr-find: the loss was not finite even at {start:g}; lower --start")
    # The rate at the lowest loss is already at the edge of stability; a tenth of it is the
    # largest rate that is still clearly on the way down.
    suggestion = max(start, lrs[int(np.argmin(losses))] / 10)
    return RangeTest(lrs, losses, suggestion)


def plot(result: RangeTest, out, title: str) -> None:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--")
    ax.annotate(
        f"suggested {result.suggestion:.2g}",
        (result.suggestion, float(np.median(result.losses))),
        color="tab:red",
        xytext=(5, 0),
        textcoords="offset points",
    )
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title=title)
    # The divergence at the end would flatten everything else: cap the axis near the start.
    ax.set_ylim(min(result.losses) * 0.9, min(max(result.losses), result.losses[0] * 1.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def lr_find(p: Params, start: float = 1e-6, end: float = 10.0, steps: int = 100) -> RangeTest:
    """The range test for params.yaml's model and data; writes out/lr_find/, logs to MLflow."""
    t = p.train
    device = resolve_device(t.device)
    torch.manual_seed(p.seed)
    data = load_processed(p.preprocess_inputs())
    images = torch.from_numpy(np.array(data.train_images)).to(device)  # (N, H, W, 3)
    labels = torch.from_numpy(data.train_labels).to(device)  # (N,)
    model = build_model(p, data).to(device)
    optimizer = make_optimizer(model, t)
    generator = torch.Generator(device=device).manual_seed(p.seed)
    batch = min(t.batch_size, len(labels))

    def batches():
        # Reshuffled passes, as many as `steps` needs: small sets (digits: 11 batches) would
        # otherwise give too few points for a curve.
        while True:
            order = torch.randperm(len(labels), device=device, generator=generator)
            for i in range(0, len(labels) - batch + 1, batch):
                idx = order[i : i + batch]
                x = augment(images, generator=generator, index=idx, **augment_options(t))
                yield x, labels[idx]

    result = range_test(model, optimizer, batches(), start, end, steps)
    title = f"lr-find: {p.model} on {p.dataset}, {t.optimizer}, batch {batch}"
    with atomic_dir(paths.LR_FIND) as out:
        with open(out / "lr_find.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["lr", "smoothed_loss"])
            writer.writerows(zip(result.lrs, result.losses, strict=True))
        plot(result, out / "lr_find.png", title)
    tags = tracking.run_tags(p.dataset, p.model, "stages/commands/lrfind.py") | {"kind": "lr-find"}
    name = f"lr-find/{tracking.run_name(p.dataset, p.model)}"
    with run_log(None, run_name=name, tags=tags) as log:
        params = p.tracked() | {"lr_find.start": start, "lr_find.end": end}
        log.batch(
            "the params and result", params=params, metrics={"suggested_lr": result.suggestion}
        )
        log.artifacts(paths.LR_FIND, "lr_find")
    print(
        f"lr-find: {len(result.lrs)} steps from {start:g} to {result.lrs[-1]:.3g};"
        f" suggested train.lr = {result.suggestion:.3g} (plot: {paths.LR_FIND}/lr_find.png)"
    )
    return result
