"""The `ensemble` command: average several models' softmax on the validation set.

Members are checkpoint files or MLflow run ids (the report stage stores a weights-only copy of
the checkpoint in its run, under checkpoint/model.pt). Each member sees the crops it was
trained for; probabilities (optionally over 10 crops) are averaged with equal weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.core.errors import PipelineError
from stages.core.files import write_json
from stages.data.processed import load_processed
from stages.engine.inference import topk_accuracy
from stages.engine.model import Trained, load_trained

RUN_CHECKPOINT = "checkpoint/model.pt"  # where report logs the checkpoint in a training run


def resolve_member(member: str) -> Path:
    """A checkpoint path as given, or the checkpoint stored in the MLflow run `member`."""
    path = Path(member)
    if path.exists():
        return path
    import mlflow

    from stages.core import tracking

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
    members: list[Trained], images: np.ndarray, crops: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean softmax (N, K) of the members on uint8 images, and each member's."""
    each = [member.predict(images, crops) for member in members]
    return torch.stack(each).mean(0), each  # (N, K), M x (N, K)


def ensemble(
    members: list[str], crops: int = 10, out: Path | None = None, device: str = "auto"
) -> dict:
    """Top-1/top-5 of each member and of their averaged softmax; optionally written as JSON."""
    if crops not in (1, 10):
        raise PipelineError(f"--crops must be 1 or 10, got {crops}")
    data = load_processed()
    labels = torch.from_numpy(data.val_labels)
    results: dict = {"members": {}, "crops": crops}
    loaded = []
    for member in members:
        trained = load_trained(resolve_member(member), device)
        data.check_classes(trained.classes, member)  # members must share one dataset
        loaded.append(trained)
    mean, each = average_proba(loaded, data.val_images, crops)
    for member, trained, probs in zip(members, loaded, each, strict=True):
        results["members"][member] = topk_accuracy(probs, labels) | {"net": trained.state["net"]}
    results["ensemble"] = topk_accuracy(mean, labels)
    width = max(len(m) for m in [*members, "ensemble"])
    for name, row in [*results["members"].items(), ("ensemble", results["ensemble"])]:
        print(f"{name:{width}s}  top-1 {row['top1']:.2%}  top-5 {row['top5']:.2%}")
    if out is not None:
        write_json(out, results)
    return results
