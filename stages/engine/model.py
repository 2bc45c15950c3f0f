"""Building a network: fresh from params.yaml for training, or trained from a checkpoint.

`load_trained` is the one loader of a trained model: evaluate, report, predict, ensemble and
submit all go through it, so every one of them runs the model in the precision and memory
format it was trained with and sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

import nets
from stages.core import checkpoint
from stages.core.errors import ParamsError, PipelineError
from stages.core.validation import params_error
from stages.engine.device import Speed, has_conv, prepare, resolve_device, resolve_speed
from stages.engine.inference import predict_proba
from stages.engine.pretrained import PRETRAINED

if TYPE_CHECKING:
    from stages.data.processed import Processed
    from stages.params import Params


def check_model_params(p: Params) -> None:
    """`model`, `net` (every option of the model, each one's type, range and choices, as its
    builder declares them), the crop the model can take, and `train.init`, against the
    registry; ParamsError names the key."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ParamsError(f"{key}: {message}")

    valid = nets.names()
    check(p.model in valid, "model", f"must be one of: {', '.join(valid)}, got {p.model!r}")
    options = nets.options_model(p.model)
    try:
        options.model_validate(p.net)
    except ValidationError as err:
        raise params_error(err, options, prefix="net.") from None
    for key in options.model_fields:
        takes = ", ".join(options.model_fields)
        check(key in p.net, f"net.{key}", f"missing; {p.model} takes {takes} (conf/model/"
              f"{p.model}.yaml sets them all)")  # fmt: skip
    smallest = smallest_input(p.model, p.net, p.train.crop_size)
    check(smallest is None, "train.crop_size", f"is {p.train.crop_size} but {p.model} needs"
          f" crops of at least {smallest} px")  # fmt: skip
    if p.train.resize_from:  # progressive resizing: the net built for the crops takes less
        side, crop = p.train.resize_from, p.train.crop_size
        check(_takes(p.model, p.net, crop, side, "cpu"), "train.resize_from", f"is {side} but"
              f" {p.model}, built for {crop} px crops, cannot take {side} px inputs; use a"
              " conv net (its pooling takes any size) or set 0")  # fmt: skip
    if p.train.init == "pretrained":
        check(p.model in PRETRAINED, "train.init", f"no pretrained weights for {p.model};"
              f" models with them: {', '.join(PRETRAINED)}")  # fmt: skip


def _takes(name: str, options: dict[str, Any], built: int, side: int, device: str) -> bool:
    """Whether model `name`, built for `built` px images, runs on `side` px inputs."""
    with torch.device(device), torch.no_grad():
        model = nets.build(name, 2, built, **options).eval()
        try:
            model(torch.zeros(2, 3, side, side))
        except RuntimeError:  # an output map of size 0, a pooling window larger than it, a
            return False  # dense layer of another input size
    return True


def smallest_input(name: str, options: dict[str, Any], size: int) -> int | None:
    """None when model `name` takes `size` px inputs, else the smallest side it takes."""
    # The side asked for is tried on the CPU (a build and two images: well under a second);
    # the search for the smallest side on the meta device (shapes only, no memory), whose Python
    # kernels import torch._dynamo: 1.6 s every stage would pay for a check that passes.
    if _takes(name, options, size, size, "cpu"):
        return None
    return next(side for side in range(size + 1, 1025) if _takes(name, options, side, side, "meta"))


def build_model(p: Params, data: Processed) -> nn.Module:
    """params.yaml's model for the processed data: its classes, crop size and normalisation
    (`p` validated by stages.params.load, the registry's checks included)."""
    if p.train.crop_size > data.image_size + 2 * p.train.pad:  # data made by other params
        raise PipelineError(
            f"train.crop_size is {p.train.crop_size} but the processed images are"
            f" {data.image_size}x{data.image_size} (+{p.train.pad} padding): remake them for"
            " these params with `dvc repro preprocess`, or lower train.crop_size"
        )
    return nets.build(
        p.model, len(data.classes), p.train.crop_size,
        mean=data.mean_tensor(), std=data.std_tensor(), **p.net,
    )  # fmt: skip


def from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The network a checkpoint describes, with its weights (and input normalisation) loaded."""
    model = nets.build(
        state["net"], state["num_classes"], state["image_size"], **state["net_options"]
    )
    model.load_state_dict(state["model"])
    return model


@dataclass
class Trained:
    """A trained model ready for inference, and what its checkpoint says about it."""

    model: nn.Module  # in eval mode, on `speed.device`, in the training's memory format
    speed: Speed  # the precision and memory format the model trained with
    state: dict[str, Any]  # the checkpoint

    @property
    def classes(self) -> list[str]:
        return list(self.state["classes"])

    @property
    def crop_size(self) -> int:
        """The side of the crops the model takes (train.crop_size)."""
        return int(self.state["image_size"])

    @property
    def mirrored(self) -> bool:
        """Whether training flipped images (train.flip): then 10-crop testing averages the
        mirrored views too. A checkpoint that does not say keeps the classic protocol."""
        return bool(self.state["params"].get("train", {}).get("flip", True))

    @property
    def stored_size(self) -> int:
        """The side of the processed images the crops were cut from."""
        return int(self.state["stored_size"])

    def predict(
        self, images: np.ndarray | torch.Tensor, crops: int = 1, batch_size: int = 256,
        size: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Class probabilities (N, K) on the CPU for uint8 images (N, stored, stored, 3), from
        crops of the training's side (or `size`); 10 crops leave the mirrored ones out for a
        model trained without flips."""
        return predict_proba(
            self.model, images, size or self.crop_size, crops, batch_size, speed=self.speed,
            mirror=self.mirrored,
        )  # fmt: skip


def load_trained(path: Path, device: str | torch.device = "auto") -> Trained:
    """Load a checkpoint for inference on `device` ("auto": the GPU if there is one)."""
    state = checkpoint.load(path)
    try:
        model = from_checkpoint(state)
    except (ValueError, RuntimeError, TypeError) as err:  # unknown net, options or tensors
        first = str(err).strip().splitlines()[0][:200]
        raise checkpoint.CheckpointError(
            f"{path}: its network cannot be rebuilt by this version of the project ({first})"
        ) from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    speed, _ = resolve_speed(
        dev, state["precision"], state["memory_format"], compile=False,
        cudnn_benchmark=False, has_conv=has_conv(model),
    )  # fmt: skip
    return Trained(prepare(model, speed).eval(), speed, state)
