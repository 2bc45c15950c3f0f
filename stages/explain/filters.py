"""What the conv layers respond to: first-layer kernels and inputs that excite deeper channels."""

from __future__ import annotations

import torch
from torch import nn


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
