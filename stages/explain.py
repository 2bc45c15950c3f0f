"""Looking inside a trained network: saliency maps, filter pictures, image grids.

Shared by the `report` stage and the `predict` command (so it lives outside both). Everything
works on the project's models as built by `nets.build`: float (B, 3, S, S) inputs in [0, 1], the
normalisation inside the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's 2-D convolutions in definition order (the forward order in our families)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """Weights of the first conv layer, (C, 3, k, k); ValueError when the model has none."""
    layers = conv_layers(model)
    if not layers:
        raise ValueError("the model has no convolution layer")
    return layers[0][1].weight.detach().float().cpu()


class _Stop(Exception):
    """Raised by a forward hook to skip the layers after the one being visualised."""


def _layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` for input x, without running the rest of the network."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.append(output)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]  # (B, C, h, w)


def receptive_field(model: nn.Module, layer: nn.Module, size: int) -> tuple[slice, slice]:
    """Rows and columns of a size x size input that the centre unit of `layer` depends on.

    Measured, not computed from kernel arithmetic: the non-zero support of the gradient of the
    centre activation, which also handles pooling and residual branches.
    """
    was_training = model.training
    model.eval()
    x = torch.full((1, 3, size, size), 0.5, device=_device(model), requires_grad=True)
    with torch.enable_grad():
        out = _layer_output(model, layer, x)  # (1, C, h, w)
        h, w = out.shape[-2:]
        (grad,) = torch.autograd.grad(out[0, :, h // 2, w // 2].sum(), x)  # (1, 3, S, S)
    model.train(was_training)
    support = grad[0].abs().amax(0) > 0  # (S, S)
    rows = support.any(1).nonzero().flatten()
    cols = support.any(0).nonzero().flatten()
    if len(rows) == 0:  # a dead centre unit: show the whole input
        return slice(0, size), slice(0, size)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def excite(
    model: nn.Module,
    layer: nn.Module,
    size: int,
    channels: int | None = None,
    steps: int = 30,
    lr: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """The input patterns that excite `layer`'s channels most, by gradient ascent on the input.

    Starts from a neutral grey image plus faint noise and maximises each channel's centre
    activation (one image per channel, all channels in one batch). Pixels are a sigmoid of the
    optimised variable, so they stay in [0, 1] without clipping; a small L2 pull toward grey
    keeps the parts outside the receptive field from drifting. Returns the patterns cropped to
    the centre unit's receptive field: (C, 3, r, r) in [0, 1].
    """
    was_training = model.training
    model.eval()
    n_channels = layer.out_channels if channels is None else min(channels, layer.out_channels)
    # Optimise only an input as large as the receptive field (+1 px each side): early layers
    # see a few pixels, and the cost of every step grows with the input's area.
    rows, cols = receptive_field(model, layer, size)
    side = min(size, max(rows.stop - rows.start, cols.stop - cols.start) + 2)
    gen = torch.Generator().manual_seed(seed)
    z = (0.01 * torch.randn(n_channels, 3, side, side, generator=gen)).to(_device(model))
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    idx = torch.arange(n_channels)
    with torch.enable_grad():
        for _ in range(steps):
            x = torch.sigmoid(z)  # (C, 3, s, s) in (0, 1); sigmoid(0) = 0.5 is the grey start
            out = _layer_output(model, layer, x)  # (C, C_all, h, w)
            h, w = out.shape[-2:]
            act = out[idx, idx, h // 2, w // 2]  # (C,) channel c's centre unit in image c
            loss = -act.sum() + 1e-3 * z.pow(2).sum()
            # Only the input is optimised: autograd.grad leaves the weights' .grad untouched.
            (z.grad,) = torch.autograd.grad(loss, z)
            optimizer.step()
    model.train(was_training)
    rows, cols = receptive_field(model, layer, side)
    return torch.sigmoid(z.detach())[:, :, rows, cols].cpu()  # (C, 3, r, r)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def normalise_each(tiles: torch.Tensor) -> torch.Tensor:
    """Stretch each tile (N, ...) to [0, 1] on its own (filters have arbitrary scales)."""
    flat = tiles.flatten(1)  # (N, D)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(tiles)


def tile_grid(
    tiles: torch.Tensor, ncols: int | None = None, pad: int = 1, scale: int = 1
) -> np.ndarray:
    """Lay out (N, 3, h, w) or (N, h, w) tiles in [0, 1] as one (H, W, 3) float image.

    Tiles are enlarged `scale` times by pixel repetition (a 3x3 kernel stays 3x3 blocks), and
    separated by `pad` white pixels. `ncols` defaults to a near-square grid.
    """
    if tiles.dim() == 3:
        tiles = tiles[:, None].expand(-1, 3, -1, -1)  # grey -> (N, 3, h, w)
    tiles = tiles.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, _, h, w = tiles.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = torch.ones(3, pad + nrows * (h + pad), pad + ncols * (w + pad))
    for i in range(n):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = tiles[i]
    return grid.permute(1, 2, 0).numpy()  # (H, W, 3)


def plot_predictions(
    images: torch.Tensor,
    maps: torch.Tensor,
    probs: torch.Tensor,
    classes: list[str],
    out: Path,
    gold: list[int] | None = None,
    titles: list[str] | None = None,
    top: int = 5,
    title: str = "",
) -> None:
    """One block per image: the image, its saliency map and a bar chart of the top-k classes.

    images (N, 3, H, W) in [0, 1]; maps (N, H, W) saliency; probs (N, K). With `gold` the true
    class is named above the image and its bar drawn green (red bars: wrong top-1).
    """
    from matplotlib.figure import Figure  # object-oriented API: no pyplot state, no display

    n = len(images)
    per_row = 2 if n >= 6 else 1  # two blocks side by side keeps ten images on one screen
    rows = math.ceil(n / per_row)
    fig = Figure(figsize=(8.5 * per_row, 1.7 * rows + (0.4 if title else 0)))
    axes = np.atleast_2d(fig.subplots(rows, 3 * per_row, width_ratios=[1, 1, 2.2] * per_row))
    for ax in axes.flat:
        ax.set_axis_off()
    k = min(top, probs.shape[1])
    for i in range(n):
        r, c = divmod(i, per_row)
        ax_img, ax_sal, ax_bar = axes[r, 3 * c : 3 * c + 3]
        ax_img.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        label = titles[i] if titles else (f"gold: {classes[gold[i]]}" if gold else "")
        ax_img.set_title(label, fontsize=8)
        ax_sal.imshow(maps[i].numpy(), cmap="hot", interpolation="nearest")
        ax_sal.set_title("saliency", fontsize=8)
        p, idx = probs[i].topk(k)  # (k,), (k,)
        colours = ["tab:blue"] * k
        if gold is not None:
            colours = ["tab:green" if j == gold[i] else "tab:blue" for j in idx.tolist()]
            if idx[0] != gold[i]:
                colours[0] = "tab:red"
        ax_bar.set_axis_on()
        ax_bar.barh(range(k), p.numpy(), color=colours)
        ax_bar.set_yticks(range(k), [classes[j][:24] for j in idx.tolist()], fontsize=7)
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=6)
        for y, v in enumerate(p.tolist()):
            ax_bar.text(min(v, 0.8) + 0.02, y, f"{v:.0%}", va="center", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")  # out may be a temporary name


def save_grid(grid: np.ndarray, out: Path, title: str, width: float = 8.0) -> None:
    """Save an (H, W, 3) grid from `tile_grid` as a titled PNG."""
    from matplotlib.figure import Figure

    h, w = grid.shape[:2]
    fig = Figure(figsize=(width, width * h / w + 0.5))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")  # out may be a temporary name
