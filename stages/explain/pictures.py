"""Pictures of tensors: image grids, prediction panels with saliency, titled PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


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


def heat(saliency: torch.Tensor) -> np.ndarray:
    """(H, W) saliency -> (H, W, 4) RGBA to lay over a greyed photograph: colour and opacity grow
    with the value (scaled to its 99th percentile), so the photograph shows where the map is low."""
    from matplotlib import colormaps

    m = saliency.float()
    m = (m / m.quantile(0.99).clamp_min(1e-12)).clamp(0, 1).numpy()  # (H, W) in [0, 1]
    rgba = colormaps["inferno"](m)  # (H, W, 4)
    rgba[..., 3] = 0.9 * m**0.7
    return rgba


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
    """One block per image: the image, its saliency map drawn over it, and a bar chart of the
    top-k classes.

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
        photo = images[i].permute(1, 2, 0).clamp(0, 1).numpy()  # (H, W, 3)
        ax_img.imshow(photo, interpolation="nearest")
        label = titles[i] if titles else (f"gold: {classes[gold[i]]}" if gold else "")
        ax_img.set_title(label, fontsize=8)
        ax_sal.imshow(photo.mean(-1), cmap="gray", interpolation="nearest")
        ax_sal.imshow(heat(maps[i]), interpolation="bilinear")
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
