"""Saliency maps: which pixels the predicted class score depends on.

Works on the project's models as built by `nets.build`: float (B, 3, S, S) inputs in [0, 1],
the normalisation inside the model.

The plain gradient (Simonyan et al. 2014) of a ReLU network is speckled: it is the gradient of
a piecewise-linear function at one point, so it jumps from pixel to pixel as units switch on
and off. SmoothGrad (Smilkov et al. 2017) averages it over noisy copies of the image, which
keeps what the score depends on around the image and drops the speckle.
"""

from __future__ import annotations

import torch
from torch import nn


def saliency(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int = 128,
) -> torch.Tensor:
    """SmoothGrad saliency: |mean over noisy copies of d score / d pixel|, max over colours.

    x (B, 3, H, W) in [0, 1]; `target` (B,) the classes whose score is differentiated (None: each
    image's top class on the clean image). Each image gets `samples` copies with Gaussian noise
    of std `noise` x (its max - its min); the copies' gradients are averaged before the absolute
    value. `samples=1, noise=0` is the plain gradient. The copies go through the model in
    batches of up to `batch_size`; `seed` fixes the noise, so the same call draws the same map.
    Returns (B, H, W) >= 0. The model is put in eval mode for the pass and restored afterwards
    (dropout and batch-norm statistics do not move); the weights' .grad are not touched.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    # captum's NoiseTunnel does the same, but would be a new dependency for these few lines.
    was_training = model.training
    model.eval()
    try:
        x = x.detach()
        if target is None:
            with torch.no_grad():
                target = torch.cat(
                    [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
                )  # (B,)
        target = target.view(-1).to(x.device)
        sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))  # (B,) per-image std
        generator = torch.Generator().manual_seed(seed)  # CPU draws: the same on every device
        total = torch.zeros_like(x)  # (B, 3, H, W) summed gradients
        copies = torch.arange(len(x) * samples, device=x.device) // samples  # image of each copy
        for start in range(0, len(copies), batch_size):
            owner = copies[start : start + batch_size]  # (n,)
            noisy = x[owner]  # (n, 3, H, W), a new tensor
            if noise > 0:
                draw = torch.randn(noisy.shape, generator=generator, dtype=x.dtype)
                noisy = noisy + draw.to(x.device) * sigma[owner].view(-1, 1, 1, 1)
            noisy.requires_grad_(True)
            with torch.enable_grad():
                scores = model(noisy)  # (n, K) unnormalised class scores
                picked = scores.gather(1, target[owner].view(-1, 1))  # (n, 1)
                # Copies are independent in eval mode: the gradient of the sum gives each its own.
                (grad,) = torch.autograd.grad(picked.sum(), noisy)  # (n, 3, H, W)
            total.index_add_(0, owner, grad)
    finally:
        model.train(was_training)
    return (total / samples).abs().amax(dim=1)  # (B, H, W)
