"""Pieces shared by every family: input normalisation, the classifier wrapper, init, activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]  # what torch.as_tensor takes

# Option types the families annotate their builders with (nets.options_model checks them).
Dropout = Annotated[float, Field(ge=0, lt=1)]  # the probability of zeroing a unit (1: all)
Activation = Literal["relu", "prelu"]  # what make_act builds
Init = Literal["classic", "keras", "default"]  # the names in INITS


class InputNorm(nn.Module):
    """Subtract the training set's per-pixel mean image and divide by the per-channel std.

    Living inside the model (as buffers) means a checkpoint carries its own normalisation and
    `predict` needs nothing else. Inputs are float (B, 3, h, w) in [0, 1]; `mean` is (3, H, W)
    in the same units, `std` (3,) or (3, 1, 1). An input smaller than the mean image (a crop)
    gets the centre crop of the mean: training crops are random, but the mean image is nearly
    stationary, so one fixed crop keeps the layer a constant for export.
    """

    def __init__(
        self,
        mean: ArrayLike | None = None,
        std: ArrayLike | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if mean is None:
            # Zeros shaped like a real mean image so a checkpoint's state dict loads onto a
            # model built without one (the shapes may still differ: see _load_from_state_dict).
            size = image_size or 1
            mean_t = torch.zeros(3, size, size)  # (3, H, W)
        else:
            mean_t = torch.as_tensor(mean, dtype=torch.float32)
            if mean_t.dim() == 1:
                mean_t = mean_t.reshape(-1, 1, 1)  # per-channel mean: (3, 1, 1)
        std_t = torch.ones(3) if std is None else torch.as_tensor(std, dtype=torch.float32)
        std_t = std_t.reshape(-1, 1, 1)  # (3, 1, 1)
        if mean_t.dim() != 3 or mean_t.shape[0] != 3 or std_t.shape[0] != 3:
            raise ValueError(
                f"mean must be (3, H, W) or (3,) and std (3,); got {tuple(mean_t.shape)} "
                f"and {tuple(std_t.shape)}"
            )
        # Contiguous copies: a permuted view (an HWC mean image) would be saved strided.
        self.register_buffer("mean", mean_t.clone(memory_format=torch.contiguous_format))
        self.register_buffer("std", std_t.clone(memory_format=torch.contiguous_format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean  # (3, H, W)
        H, W = mean.shape[-2:]
        h, w = x.shape[-2:]
        # Plain Python ints and slicing keep this traceable by torch.export.
        if (H, W) != (1, 1) and (h, w) != (H, W):
            if h > H or w > W:
                raise ValueError(f"input {h}x{w} is larger than the mean image {H}x{W}")
            top, left = (H - h) // 2, (W - w) // 2
            mean = mean[:, top : top + h, left : left + w]  # (3, h, w)
        # The mean in x's memory layout (conv nets get channels-last batches): the subtraction
        # then streams through both tensors in one order instead of mixing two layouts.
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if cl else torch.contiguous_format
        mean = mean.unsqueeze(0).contiguous(memory_format=fmt)  # (1, 3, h, w)
        return (x - mean).div_(self.std)  # (B, 3, h, w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint's mean may be shaped unlike this module's placeholder (mean image at
        # 64 px, model built for 56 px crops; a per-channel mean): take the checkpoint's shape.
        for name in ("mean", "std"):
            incoming = state_dict.get(prefix + name)
            buffer = self._buffers[name]
            if incoming is not None and incoming.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Classifier(nn.Module):
    """`body(normalize(x))`: every registered net, wrapped with its input normalisation."""

    def __init__(self, normalize: InputNorm, body: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))  # (B, 3, h, w) -> (B, num_classes)


def _he(weight: torch.Tensor, nonlinearity: str) -> None:
    # fan_in keeps the variance of the forward activations constant through the layers (He et
    # al. 2015); that is what matters for deep plain nets without BN (AlexNet, VGG w/o BN),
    # whose first losses explode or vanish otherwise. fan_out would preserve gradient variance.
    if nonlinearity == "prelu":  # PReLU starts at slope 0.25: the leaky-ReLU gain with a=0.25
        nn.init.kaiming_normal_(weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")
    else:
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity=nonlinearity)


_WEIGHT_INITS = {
    "he": _he,
    "xavier": lambda weight, nonlinearity: nn.init.xavier_uniform_(weight),
    "default": None,  # keep PyTorch's own init
}

# The `init` option of the families: name -> (conv scheme, linear scheme).
# keras: Glorot-uniform everywhere, as Keras initialises its layers (nets built as Keras does).
INITS = {
    "classic": ("he", "xavier"),
    "keras": ("xavier", "xavier"),
    "default": ("default", "default"),
}


def init_weights(
    module: nn.Module, conv: str = "he", linear: str = "xavier", nonlinearity: str = "relu"
) -> nn.Module:
    """Initialise every Conv2d/Linear (weights by scheme, biases zero) and BatchNorm (1, 0)."""
    for scheme in (conv, linear):
        if scheme not in _WEIGHT_INITS:
            raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(_WEIGHT_INITS)}")
    for m in module.modules():
        scheme = conv if isinstance(m, nn.Conv2d) else linear if isinstance(m, nn.Linear) else None
        if scheme is not None and _WEIGHT_INITS[scheme] is not None:
            _WEIGHT_INITS[scheme](m.weight, nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def apply_init(module: nn.Module, init: str, nonlinearity: str = "relu") -> nn.Module:
    """Apply a named scheme from INITS (`classic` = He convs + Xavier linears, `default`)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    conv, linear = INITS[init]
    return init_weights(module, conv=conv, linear=linear, nonlinearity=nonlinearity)


def make_act(activation: str, channels: int = 1) -> nn.Module:
    """`relu` or `prelu` (one learned slope per channel, as in He et al. 2015)."""
    if activation == "relu":
        return nn.ReLU(inplace=True)
    if activation == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"unknown activation {activation!r}; valid: relu, prelu")
