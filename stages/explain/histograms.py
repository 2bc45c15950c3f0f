"""Per-layer weight and activation statistics: the classic way to debug a bad initialisation.

Activations that blow up or vanish layer by layer, or ReLUs that output mostly zeros, show at
once in the per-layer mean / std / fraction of zeros; the PNG shows the full distributions.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import nn

WATCHED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.PReLU)
MAX_PANELS = 24  # histograms in the PNG (evenly chosen layers beyond that)


@torch.no_grad()
def layer_statistics(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run `x` (B, 3, S, S) through `model` in eval mode; return metrics and sampled values.

    Metric names: `act/<layer>/{mean,std,zero_frac}` per watched module call (a module used
    twice, like a ResNet block's ReLU, gets `#2`), `weight/<param>/{mean,std}` per weight.
    """
    metrics: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            # Read at once: an in-place ReLU that follows would overwrite `output`.
            calls[name] = calls.get(name, 0) + 1
            key = name if calls[name] == 1 else f"{name}#{calls[name]}"
            out = output.detach().float()
            metrics[f"act/{key}/mean"] = out.mean().item()
            metrics[f"act/{key}/std"] = out.std().item()
            metrics[f"act/{key}/zero_frac"] = (out == 0).float().mean().item()
            samples[key] = out.flatten()[:: max(1, out.numel() // 20000)].cpu()

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, WATCHED)
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, p in model.named_parameters():
        if p.ndim > 1:  # weights, not biases or norm scales
            metrics[f"weight/{name}/mean"] = p.float().mean().item()
            metrics[f"weight/{name}/std"] = p.float().std().item()
    return metrics, samples


def plot(samples: dict[str, torch.Tensor], title: str) -> Figure:
    """One histogram per layer (first to last, row by row)."""
    names = list(samples)
    if len(names) > MAX_PANELS:
        step = len(names) / MAX_PANELS
        names = [names[int(i * step)] for i in range(MAX_PANELS)]
    cols = 6
    rows = max(1, -(-len(names) // cols))
    fig = Figure(figsize=(3 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        ax.hist(samples[name].numpy(), bins=50, color="tab:blue")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
