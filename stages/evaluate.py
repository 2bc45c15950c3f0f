"""Stage 4, evaluate: single-crop and 10-crop accuracy of the trained model on the validation set.

Writes out/evaluate/ as a whole: metrics.json (`dvc metrics show`), predictions.csv (`dvc plots`
confusion matrix), per_class.csv and confusion_matrix.png; and adds the same
metrics and pictures to the training's MLflow run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

# The object-oriented Figure API draws to files without pyplot's global state or a display.
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from stages.core import paths
from stages.core.files import atomic_dir, write_json
from stages.core.runlog import run_log
from stages.data.processed import load_processed
from stages.engine.device import has_conv
from stages.engine.inference import nll, topk_accuracy
from stages.engine.model import load_trained
from stages.params import Params


def plot_confusion(labels: np.ndarray, preds: np.ndarray, classes: list[str], out: Path) -> None:
    """scikit-learn's confusion matrix; cell counts are printed only while they stay readable."""
    matrix = confusion_matrix(labels, preds, labels=np.arange(len(classes)))
    side = min(4 + 0.4 * len(classes), 40)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    display = ConfusionMatrixDisplay(matrix, display_labels=classes)
    display.plot(ax=ax, include_values=len(classes) <= 30, colorbar=False, xticks_rotation=90)
    ax.set_title("confusion matrix (10-crop predictions)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def evaluate(p: Params) -> dict:
    """Evaluate out/train/model.pt on the validation split; returns metrics.json's content."""
    trained = load_trained(paths.CHECKPOINT, p.train.device)
    state = trained.state
    data = load_processed(p.preprocess_inputs())
    data.check_model(trained.classes, trained.stored_size, trained.crop_size, str(paths.CHECKPOINT))
    labels = torch.from_numpy(data.val_labels)

    metrics: dict = {}
    probs = {}
    for crops, name in ((1, "single_crop"), (10, "ten_crop")):
        probs[name] = trained.predict(data.val_images, crops, p.evaluate.batch_size)
        metrics[name] = topk_accuracy(probs[name], labels) | {"loss": nll(probs[name], labels)}
    metrics["ten_crop_gain_top1"] = metrics["ten_crop"]["top1"] - metrics["single_crop"]["top1"]
    if trained.stored_size > trained.crop_size and has_conv(trained.model):
        # The whole image (and its mirror): a net trained on random crops sees objects larger
        # than a centre crop of the same side shows them, so a higher test resolution can score
        # higher (Touvron et al., "Fixing the train-test resolution discrepancy", 2019). Conv
        # nets only: their pooling takes any size.
        views = [data.val_images] + ([data.val_images[:, :, ::-1]] if trained.mirrored else [])
        size, batch = trained.stored_size, p.evaluate.batch_size
        whole = sum(trained.predict(v, 1, batch, size) for v in views) / len(views)
        metrics["full_image"] = topk_accuracy(whole, labels) | {"loss": nll(whole, labels)}
    preds = probs["ten_crop"].argmax(1).numpy()
    truth = labels.numpy()

    with atomic_dir(paths.EVALUATE) as out:
        write_json(out / "metrics.json", metrics)
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["actual", "predicted"])
            for a, b in zip(truth, preds, strict=True):
                writer.writerow([data.classes[a], data.classes[b]])
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "support", "top1"])
            for k, name in enumerate(data.classes):
                mask = truth == k
                acc = float((preds[mask] == k).mean()) if mask.any() else float("nan")
                writer.writerow([name, int(mask.sum()), f"{acc:.4f}"])
        plot_confusion(truth, preds, data.classes, out / "confusion_matrix.png")

    # Added to the training's run, which stays as the training left it (see run_log).
    with run_log(None, state["mlflow_run_id"], attach=True) as log:
        scored = [v for v in ("single_crop", "ten_crop", "full_image") if v in metrics]
        scores = {f"{v}_{k}": metrics[v][k] for v in scored for k in ("top1", "top5")}
        log.batch(
            "the metrics", metrics=scores | {"ten_crop_gain_top1": metrics["ten_crop_gain_top1"]}
        )
        log.artifacts(paths.EVALUATE, "evaluate")
    print(
        f"evaluate: top-1 {metrics['single_crop']['top1']:.2%} single crop,"
        f" {metrics['ten_crop']['top1']:.2%} 10-crop"
        f" (top-5 {metrics['single_crop']['top5']:.2%} / {metrics['ten_crop']['top5']:.2%})"
        + (
            f"; whole {trained.stored_size} px image {metrics['full_image']['top1']:.2%}"
            if "full_image" in metrics
            else ""
        )
        + ("" if trained.mirrored else "; trained without flips: 5 crops, no mirrored views")
    )
    return metrics
