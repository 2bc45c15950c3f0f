"""Stage 5, report: the pictures that show what the network learned.

Writes out/report/ as a whole (atomically) and logs it to the training's MLflow run (report/):
  predictions.png     seeded validation images: gold label, top-k probabilities, SmoothGrad
                      saliency map
  mistakes.png        the validation images the model got most confidently wrong
  filters_conv1.png   the first conv layer's kernels as RGB tiles
  filters_conv2.png   inputs that excite each channel of the 2nd / 4th conv layer most
  filters_conv4.png   (gradient ascent from a grey image, cropped to the receptive field)
  augmentation.png    training images before and after the configured distortions
  curves.png          train/val loss and top-1 per epoch, with the learning rate
  confused_pairs.csv  the most confused (actual, predicted) class pairs, and as a table .png
`report.pictures` in params.yaml picks which of them are made.
"""

from __future__ import annotations

import collections
import csv
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented API: no pyplot state, no display

from stages.core import paths
from stages.core.files import atomic_dir
from stages.core.runlog import run_log
from stages.data.augment import augment, augment_options, center_crop
from stages.data.processed import DataError, Processed, load_processed
from stages.engine.model import Trained, load_trained
from stages.explain.filters import conv_layers, excite, first_layer_filters
from stages.explain.pictures import normalise_each, plot_predictions, save_grid, tile_grid
from stages.explain.saliency import saliency
from stages.params import Params, TrainParams


class Context:
    """What every picture needs: the model, the data, the params, the output folder."""

    def __init__(self, p: Params, trained: Trained, data: Processed, out: Path):
        self.p, self.trained, self.data, self.out = p, trained, data, out
        self.state, self.model = trained.state, trained.model
        self.size, self.classes = trained.crop_size, trained.classes
        self.device = trained.speed.device


def _with_saliency(
    ctx: Context, idx: np.ndarray, probs: torch.Tensor, out: Path, title: str
) -> None:
    """Centre crops of validation images `idx`, SmoothGrad saliency of their top class (noise
    drawn from report.seed, so the picture is the same every run), top-k bars."""
    images = torch.from_numpy(np.ascontiguousarray(ctx.data.val_images[np.sort(idx)]))
    order = np.argsort(np.argsort(idx))  # memory-mapped arrays want sorted indices; undo it
    x = center_crop(images, ctx.size)[order].to(ctx.device)  # (n, 3, S, S)
    maps = saliency(ctx.model, x, seed=ctx.p.report.seed).cpu()  # (n, S, S)
    gold = ctx.data.val_labels[idx].tolist()
    plot_predictions(x.cpu(), maps, probs, ctx.classes, out, gold=gold, title=title)


def predictions(ctx: Context) -> None:
    r = ctx.p.report
    n = min(r.num_images, len(ctx.data.val_labels))
    idx = np.random.default_rng(r.seed).choice(len(ctx.data.val_labels), n, replace=False)
    probs = ctx.trained.predict(ctx.data.val_images[np.sort(idx)], crops=1)
    probs = probs[np.argsort(np.argsort(idx))]  # (n, K) back in drawing order
    title = f"{n} random validation images (report.seed={r.seed}), centre crop"
    _with_saliency(ctx, idx, probs, ctx.out / "predictions.png", title)


def mistakes(ctx: Context) -> None:
    probs = ctx.trained.predict(ctx.data.val_images, crops=1)  # (M, K)
    labels = torch.from_numpy(ctx.data.val_labels)
    confidence, pred = probs.max(1)  # (M,), (M,)
    wrong = (pred != labels).nonzero().flatten()
    if len(wrong) == 0:
        _message(ctx.out / "mistakes.png", "no validation image is misclassified")
        return
    worst = wrong[confidence[wrong].argsort(descending=True)][: ctx.p.report.num_images]
    title = f"most confidently wrong ({len(wrong)} of {len(labels)} validation images wrong)"
    _with_saliency(ctx, worst.numpy(), probs[worst], ctx.out / "mistakes.png", title)


def filters(ctx: Context) -> None:
    layers = conv_layers(ctx.model)
    if not layers:
        print(f"report: {ctx.state['net']} has no conv layer; no filter pictures")
        return
    weights = first_layer_filters(ctx.model)  # (C, 3, k, k)
    scale = max(1, 24 // weights.shape[-1])  # 3x3 kernels become 24 px tiles
    grid = tile_grid(normalise_each(weights), scale=scale, pad=2)
    title = f"{layers[0][0]}: {weights.shape[0]} kernels {weights.shape[2]}x{weights.shape[3]}"
    save_grid(grid, ctx.out / "filters_conv1.png", title)
    r = ctx.p.report
    for number in (2, 4):
        if len(layers) < number:
            continue
        name, layer = layers[number - 1]
        patterns = excite(
            ctx.model, layer, ctx.size, r.max_channels, r.ascent_steps, r.ascent_lr, r.seed
        )  # (C, 3, r, r)
        scale = max(1, 48 // patterns.shape[-1])
        grid = tile_grid(normalise_each(patterns), scale=scale, pad=2)
        title = (
            f"{name}: input patterns exciting {len(patterns)} of {layer.out_channels} channels"
            f" ({patterns.shape[-1]}x{patterns.shape[-2]} px receptive field)"
        )
        save_grid(grid, ctx.out / f"filters_conv{number}.png", title)


def augmentation_views(t: TrainParams) -> list[tuple[str, dict]]:
    """(title, `augment` options) per row of the preview: the crop training starts from, each
    configured distortion on its own on top of it, then all of them together as trained."""
    every = augment_options(t)
    crop = every | {"flip": False, "vflip": False, "brightness": 0.0, "contrast": 0.0,
                    "saturation": 0.0, "hue": 0.0, "cutout_size": 0}  # fmt: skip
    if t.resized_crop:
        base = f"random-resized crop {t.crop_size} (area >= {t.resized_crop_scale:g})"
    else:
        base = f"random crop {t.crop_size}" + (f" after {t.pad} px padding" if t.pad else "")
    views = [(base, crop)]
    jitter = {k: getattr(t, k) for k in ("brightness", "contrast", "saturation", "hue")}
    extras = [
        ("+ horizontal flip", {"flip": True}, t.flip),
        ("+ vertical flip", {"vflip": True}, t.vflip),
        ("+ colour jitter " + ", ".join(f"{k} {v:g}" for k, v in jitter.items() if v), jitter,
         any(jitter.values())),
        (f"+ cutout {t.cutout} px", {"cutout_size": t.cutout}, t.cutout > 0),
        (f"+ progressive resizing: rescaled to {t.resize_from} px up to epoch {t.resize_start}",
         {"rescale": t.resize_from}, t.resize_from > 0),
    ]  # fmt: skip
    views += [(title, crop | change) for title, change, on in extras if on]
    if len(views) > 2:
        views.append(("all together, as trained", every))
    return views


def augmentation(ctx: Context) -> None:
    t, r = ctx.p.train, ctx.p.report
    n = min(r.augment_images, len(ctx.data.train_labels))
    idx = np.sort(np.random.default_rng(r.seed).choice(len(ctx.data.train_labels), n, False))
    images = torch.from_numpy(np.ascontiguousarray(ctx.data.train_images[idx]))  # (n, H, W, 3)
    rows = [("centre crop (evaluation)", center_crop(images, t.crop_size))]  # (n, 3, S, S)
    for title, options in augmentation_views(t):
        generator = torch.Generator().manual_seed(r.seed)  # each row from the same draws
        rows.append((title, augment(images, generator=generator, **options)))  # (n, 3, S, S)
    cols = min(n, 16)
    scale = max(1, 48 // t.crop_size)
    per_row = math.ceil(n / cols)
    fig = Figure(figsize=(14, (per_row * 14 / cols + 0.4) * len(rows)))
    for ax, (title, tiles) in zip(fig.subplots(len(rows), 1), rows, strict=True):
        ax.imshow(tile_grid(tiles, ncols=cols, scale=scale, pad=2), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"augmentation preview: {n} training images (report.seed={r.seed})")
    fig.tight_layout()
    fig.savefig(ctx.out / "augmentation.png", dpi=80)


def curves(ctx: Context) -> None:
    with open(paths.HISTORY, newline="") as f:
        rows = list(csv.DictReader(f))
    col = {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(col["epoch"], col["train_loss"], "o-", label="train")
    ax_loss.plot(col["epoch"], col["val_loss"], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_acc.plot(col["epoch"], col["train_top1"], "o-", label="train top-1")
    ax_acc.plot(col["epoch"], col["val_top1"], "o-", label="val top-1")
    ax_acc.set(title="top-1 accuracy", xlabel="epoch", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()  # the rate on its own axis: schedules span orders of magnitude
        lr_ax.plot(col["epoch"], col["lr"], color="tab:gray", linestyle=":", label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lines = ax.get_legend_handles_labels()
        lr_lines = lr_ax.get_legend_handles_labels()
        ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "curves.png", dpi=80)


def confused_pairs(predictions_csv: Path, top: int) -> list[tuple[str, str, int, float]]:
    """(actual, predicted, count, share of actual's images) for the `top` commonest errors."""
    with open(predictions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    support = collections.Counter(row["actual"] for row in rows)
    errors = collections.Counter(
        (row["actual"], row["predicted"]) for row in rows if row["actual"] != row["predicted"]
    )
    return [(a, b, n, n / support[a]) for (a, b), n in errors.most_common(top)]


def confusion(ctx: Context) -> None:
    pairs = confused_pairs(paths.PREDICTIONS, ctx.p.report.top_pairs)
    with open(ctx.out / "confused_pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted", "count", "share_of_actual"])
        writer.writerows((a, b, n, f"{s:.4f}") for a, b, n, s in pairs)
    if not pairs:
        _message(ctx.out / "confused_pairs.png", "no confusions: every prediction is right")
        return
    fig = Figure(figsize=(7, 0.6 + 0.28 * (len(pairs) + 1)))
    ax = fig.subplots()
    ax.set_axis_off()
    cells = [[a[:30], b[:30], str(n), f"{s:.1%}"] for a, b, n, s in pairs]
    table = ax.table(
        cells, colLabels=["actual", "predicted as", "images", "of actual"], loc="center"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    ax.set_title("most confused class pairs (10-crop predictions)")
    fig.tight_layout()
    fig.savefig(ctx.out / "confused_pairs.png", dpi=80)


def _message(out: Path, text: str) -> None:
    fig = Figure(figsize=(6, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(out, dpi=80)


# The pictures that read an earlier stage's file besides the model and the data.
INPUTS = {"curves": (paths.HISTORY, "train"), "confusion": (paths.PREDICTIONS, "evaluate")}

PICTURES: dict[str, Callable[[Context], None]] = {
    "predictions": predictions,
    "mistakes": mistakes,
    "filters": filters,
    "augmentation": augmentation,
    "curves": curves,
    "confusion": confusion,
}


def report(p: Params) -> list[str]:
    """Draw the pictures `p.report.pictures` names; returns the files written."""
    trained = load_trained(paths.CHECKPOINT, p.train.device)
    state = trained.state
    data = load_processed(p.preprocess_inputs())
    data.check_model(trained.classes, trained.stored_size, trained.crop_size, str(paths.CHECKPOINT))
    for name, (path, stage) in INPUTS.items():
        if name in p.report.pictures and not path.is_file():
            raise DataError(
                f"{path}: not found (the {name} picture reads it); run `dvc repro {stage}`"
            )
    with atomic_dir(paths.REPORT) as out:
        ctx = Context(p, trained, data, out)
        for name in p.report.pictures:
            start = time.perf_counter()
            PICTURES[name](ctx)
            print(f"report: {name} ({time.perf_counter() - start:.1f} s)", flush=True)
        written = sorted(f.name for f in out.iterdir())
    # Added to the training's run, which stays as the training left it (see run_log).
    with run_log(None, state["mlflow_run_id"], attach=True) as log:
        log.artifacts(paths.REPORT, "report")
    print(f"report: {len(written)} files in {paths.REPORT}/, logged to MLflow run {log.run_id}")
    return written
