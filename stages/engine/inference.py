"""Batched prediction and accuracy, shared by train (per-epoch validation), evaluate and report."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from stages.data.augment import center_crop, ten_crop
from stages.engine.device import Speed


class Probabilities(nn.Module):
    """`model` as evaluation runs it, in one traceable module (also what torch.export and ONNX
    files hold): uint8 images (B, H, W, 3) -> class probabilities (B, K), from the centre crop
    (crops=1) or the softmax averaged over 10 crops: 4 corners + centre and their mirrors.
    `mirror=False` (a model trained without flips: its mirrored views are images it never
    learned, digits that are other glyphs) leaves the mirrors out: 5 crops. `inputs` puts a
    batch of crops in the model's memory format."""

    def __init__(
        self, model: nn.Module, size: int, crops: int = 1, mirror: bool = True,
        inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if crops not in (1, 10):
            raise ValueError(f"crops must be 1 or 10, got {crops}")
        self.model, self.size, self.crops = model, size, crops
        self.views = 1 if crops == 1 else 10 if mirror else 5
        self.inputs = inputs or (lambda x: x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.crops == 1:
            x = center_crop(images, self.size)  # (B, 3, S, S)
        else:
            x = ten_crop(images, self.size)[:, : self.views].flatten(0, 1)  # (B*V, 3, S, S)
        probs = self.model(self.inputs(x)).float().softmax(-1)  # (B*V, K)
        return probs.unflatten(0, (-1, self.views)).mean(1)  # (B, K)


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    size: int,
    crops: int = 1,
    batch_size: int = 256,
    *,
    speed: Speed,
    mirror: bool = True,
) -> torch.Tensor:
    """Class probabilities (N, K) on the CPU for uint8 images (N, H, W, 3), a batch at a time
    (all crops of a batch through the model at once): see `Probabilities`. `speed` is the
    device, precision and memory format (those of training).
    """
    net = Probabilities(model, size, crops, mirror, speed.inputs)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.array(chunk))  # a writable copy of a memory-map slice
        with speed.autocast():
            out.append(net(chunk.to(speed.device)).cpu())  # (B, K)
    model.train(was_training)
    return torch.cat(out)


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...} as fractions; k larger than the class count counts as all."""
    labels = torch.as_tensor(labels)
    k_max = min(max(ks), probs.shape[1])
    top = probs.topk(k_max, dim=1).indices  # (N, k_max)
    hits = top == labels[:, None]  # (N, k_max)
    return {f"top{k}": hits[:, : min(k, k_max)].any(1).double().mean().item() for k in ks}


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (cross-entropy for one crop)."""
    labels = torch.as_tensor(labels)
    picked = probs[torch.arange(len(labels)), labels]
    return -picked.clamp_min(1e-12).log().mean().item()
