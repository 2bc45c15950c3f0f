"""The `ensemble` command: average several models' softmax on the validation set.

Members are checkpoint files or MLflow run ids (the report stage stores a weights-only copy of
the checkpoint in its run, under checkpoint/model.pt). Each member sees the crops it was
trained for; probabilities (optionally over 10 crops) are averaged with equal weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages import checkpoint
from stages.data import load_processed
from stages.device import resolve_device
from stages.errors import PipelineError
from stages.files import write_json
from stages.inference import predict_proba, topk_accuracy

RUN_CHECKPOINT = "checkpoint/model.pt"  # where report logs the checkpoint in a training run


def resolve_member(member: str) -> Path:
    """A checkpoint path as given, or the checkpoint stored in the MLflow run `member`."""
    path = Path(member)
    if path.exists():
        return path
    import mlflow

    from stages import tracking

    tracking.setup()
    try:
        return Path(
            mlflow.artifacts.download_artifacts(run_id=member, artifact_path=RUN_CHECKPOINT)
        )
    except Exception as err:  # noqa: BLE001 - unknown run, no artifact: same fix for the user
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise PipelineError(
            f"{member}: neither a checkpoint file nor an MLflow run with {RUN_CHECKPOINT}"
            f" (runs get one from `convnet report`): {first}"
        ) from None


def average_proba(
    members: list[tuple[nn.Module, int]],
    images: np.ndarray,
    crops: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean softmax (N, K) of (model, crop size) members on uint8 images, and each member's."""
    each = [predict_proba(model, images, size, crops, device=device) for model, size in members]
    return torch.stack(each).mean(0), each  # (N, K), M x (N, K)


def ensemble(
    members: list[str], crops: int = 10, out: Path | None = None, device: str = "auto"
) -> dict:
    """Top-1/top-5 of each member and of their averaged softmax; optionally written as JSON."""
    if crops not in (1, 10):
        raise PipelineError(f"--crops must be 1 or 10, got {crops}")
    dev = resolve_device(device)
    data = load_processed()
    labels = torch.from_numpy(data.val_labels)
    results: dict = {"members": {}, "crops": crops}
    loaded = []
    for member in members:
        state = checkpoint.load(resolve_member(member))
        if state["classes"] != data.classes:
            raise PipelineError(
                f"{member}: trained on other classes than out/processed/ holds"
                f" ({state['num_classes']} vs {len(data.classes)}); ensemble models of one dataset"
            )
        loaded.append((checkpoint.build_model(state).to(dev), state["image_size"], state["net"]))
    mean, each = average_proba([(m, s) for m, s, _ in loaded], data.val_images, crops, dev)
    for member, (_, _, net), probs in zip(members, loaded, each, strict=True):
        results["members"][member] = topk_accuracy(probs, labels) | {"net": net}
    results["ensemble"] = topk_accuracy(mean, labels)
    width = max(len(m) for m in [*members, "ensemble"])
    for name, row in [*results["members"].items(), ("ensemble", results["ensemble"])]:
        print(f"{name:{width}s}  top-1 {row['top1']:.2%}  top-5 {row['top5']:.2%}")
    if out is not None:
        write_json(out, results)
    return results
