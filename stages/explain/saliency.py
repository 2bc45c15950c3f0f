"""Saliency maps: which pixels the predicted class score depends on.

Works on the project's models as built by `nets.build`: float (B, 3, S, S) inputs in [0, 1],
the normalisation inside the model.
"""

from __future__ import annotations

import torch
from torch import nn


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Simonyan et al.'s saliency: |d score / d pixel|, max over the colour channels.

    x (B, 3, H, W) in [0, 1]; `target` (B,) the classes whose score is differentiated (None: each
    image's top class). Returns (B, H, W) >= 0. The model is put in eval mode for the pass and
    restored afterwards, so dropout and batch-norm statistics do not move.
    """
    was_training = model.training
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = model(x)  # (B, K) unnormalised class scores
        if target is None:
            target = scores.argmax(1)  # (B,)
        picked = scores.gather(1, target.view(-1, 1).to(scores.device))  # (B, 1)
        # Images are independent in eval mode, so the gradient of the sum gives each its own.
        (grad,) = torch.autograd.grad(picked.sum(), x)  # (B, 3, H, W)
    model.train(was_training)
    return grad.abs().amax(dim=1)  # (B, H, W)
