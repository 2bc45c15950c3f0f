"""The `ensemble` command: average several models' softmax on the validation set.

Members are checkpoint files or the MLflow run ids of trainings (the model a training logs
carries its checkpoint, model.pt). Each member sees the crops it was trained for; probabilities
(optionally over 10 crops) are averaged with equal weight.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from stages.core.errors import PipelineError
from stages.core.files import write_json
from stages.data.processed import load_processed
from stages.engine.inference import topk_accuracy
from stages.engine.model import Trained, load_trained


def load_member(member: str, device: str = "auto") -> Trained:
    """The checkpoint file `member`, or the checkpoint of the model MLflow run `member` logged.

    The logged model (stages.engine.serving: a pyfunc whose artifact `checkpoint` is model.pt)
    is downloaded into a temporary folder that goes once it is loaded (MLflow's own default is
    a temporary folder it never removes). A store that does not answer is one line within
    seconds.
    """
    path = Path(member)
    if path.exists():
        return load_trained(path, device)
    import mlflow

    from stages.core import tracking

    tracking.setup()
    with tempfile.TemporaryDirectory() as folder, tracking.answering():
        run = tracking.find_run(member)
        logged = [o.model_id for o in run.outputs.model_outputs] if run and run.outputs else []
        if not logged:
            raise PipelineError(
                f"{member}: neither a checkpoint file nor an MLflow run with a logged model"
                f" ({'no such run' if run is None else 'the run logged none'} in"
                f" {tracking.tracking_uri()}; a training logs its model when it ends)"
            )
        local = mlflow.artifacts.download_artifacts(f"models:/{logged[-1]}", dst_path=folder)
        flavor = mlflow.models.Model.load(local).flavors["python_function"]
        return load_trained(Path(local) / flavor["artifacts"]["checkpoint"]["path"], device)


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
        trained = load_member(member, device)
        # Members must share one dataset, its classes and image size.
        data.check_model(trained.classes, trained.stored_size, trained.crop_size, member)
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
