"""Transfer learning: start training from torchvision's ImageNet weights or from a checkpoint.

`train.init: pretrained` copies every torchvision tensor whose name and shape match ours. Our
small-image variants differ from torchvision's in places (ResNet's 3x3 stem, AlexNet's and VGG's
smaller classifiers), so those layers keep their fresh initialisation and are listed; the head
is always new, sized for this dataset's classes. `train.init: PATH` does the same with one of
this project's checkpoints (the head is taken too when the class count matches).

`train.freeze_epochs: N` trains only the layers that were *not* copied for the first N epochs,
so the new head settles before it back-propagates into the pretrained body. Batch-norm running
statistics of the frozen body still adapt to the new data (the layers stay in train mode).

Weights come from torch.hub's cache (`torch.hub.get_dir()/checkpoints/`); without internet a
user drops the file named in the error message there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import nn

from stages.core.errors import PipelineError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum


class PretrainedError(PipelineError):
    """Pretrained weights that cannot be found, downloaded or read."""


# model name -> the name of its torchvision weights for the model's options (VGG-16 with or
# without BN); `imagenet_weights` looks them up.
PRETRAINED: dict[str, Callable[[dict[str, Any]], str]] = {
    "alexnet": lambda opts: "AlexNet_Weights",
    "vgg16": lambda opts: "VGG16_BN_Weights" if opts.get("batch_norm", True) else "VGG16_Weights",
    "resnet18": lambda opts: "ResNet18_Weights",
    "resnet34": lambda opts: "ResNet34_Weights",
    "resnet50": lambda opts: "ResNet50_Weights",
}

# torchvision's AlexNet numbers its layers inside `features`; ours names them conv1..conv5.
_ALEXNET_KEYS = {
    f"features.{tv}.": f"features.conv{i}." for i, tv in enumerate((0, 3, 6, 8, 10), 1)
}


def imagenet_weights(model: str, opts: dict[str, Any]) -> WeightsEnum:
    """torchvision's ImageNet weights of `model` with options `opts` (one of PRETRAINED)."""
    # Imported here: torchvision.models imports every model family and torch._dynamo, seconds
    # that every stage process would pay for a model it never loads.
    from torchvision import models

    return getattr(models, PRETRAINED[model](opts)).IMAGENET1K_V1


def weights_file(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (or would download) this weights file."""
    name = Path(urlparse(weights.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def torchvision_state(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights' state dict, from the hub cache or downloaded into it."""
    path = weights_file(weights)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # download_url_to_file writes a temporary file and renames it: no partial file.
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except Exception as err:  # noqa: BLE001 - any network failure means the same to a user
            raise PretrainedError(
                f"cannot download {weights.url} ({type(err).__name__}); place {path.name}"
                f" in {path.parent} and run again"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise PretrainedError(f"{path}: not a readable weights file ({err})") from None


def copy_matching(
    model: nn.Module, source: dict[str, torch.Tensor], prefix: str = "body."
) -> tuple[list[str], list[str]]:
    """Copy tensors of `source` (keys without `prefix`) whose name and shape match the model's.

    Returns (copied names, skipped names) in the model's naming; a skipped name exists in both
    with different shapes. Names only one side has are ignored (e.g. the other's BN counters).
    """
    target = model.state_dict()
    copied, skipped = [], []
    update = {}
    for key, tensor in source.items():
        name = prefix + key
        if name not in target:
            continue
        if target[name].shape != tensor.shape:
            skipped.append(name)
            continue
        update[name] = tensor.to(target[name].dtype)
        copied.append(name)
    model.load_state_dict(update, strict=False)
    return copied, skipped


def _rename_alexnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        for old, new in _ALEXNET_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = tensor
    return renamed


def _skip_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A 1000-way ImageNet head never fits; dropping tensors shaped for it keeps the fresh head
    # even when a dataset happens to have 1000 classes.
    return {k: v for k, v in state.items() if not (v.ndim >= 1 and v.shape[0] == 1000)}


def initialise(model: nn.Module, p: Any) -> nn.Module:
    """Apply `p.train.init` to a freshly built model (p: stages.params.Params); returns it.

    Records which parameters came from elsewhere (`model.pretrained_parameters`) for
    `freeze_body`, and prints what was copied and what was skipped.
    """
    init = p.train.init
    if init == "scratch":
        return model
    if init == "pretrained":
        weights = imagenet_weights(p.model, p.net)
        state = torchvision_state(weights)
        if p.model == "alexnet":
            state = _rename_alexnet(state)
        state = _skip_head(state)
        copied, skipped = copy_matching(model, state)
        source = f"torchvision {weights}"
    else:
        from stages.core import checkpoint  # imports the nets registry: only for this case

        ckpt = checkpoint.load(Path(init), require=("model",))  # any of model/last/best.pt
        # Keep this dataset's input normalisation (the mean image inside the model).
        state = {k: v for k, v in ckpt["model"].items() if not k.startswith("normalize.")}
        copied, skipped = copy_matching(model, state, prefix="")
        source = str(init)
    if not copied:
        raise PretrainedError(f"train.init: {source} has no tensor that fits {p.model}")
    model.pretrained_parameters = {n for n, _ in model.named_parameters() if n in set(copied)}
    print(
        f"init: {len(copied)} tensors from {source};"
        f" kept fresh (shape differs): {', '.join(skipped) or 'none'}"
    )
    return model


def freeze_body(model: nn.Module, frozen: bool) -> None:
    """Stop (frozen=True) or resume gradient flow into the parameters `initialise` copied.

    A parameter without a gradient is skipped by the optimizer (no update, no weight decay, no
    momentum step), so toggling this per epoch needs no new optimizer. No-op from scratch.
    """
    names = getattr(model, "pretrained_parameters", set())
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(not frozen)
