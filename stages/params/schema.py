"""What params.yaml must hold: one pydantic model per section, strict and without defaults.

Every key is checked: present, exact types (no "3" for an integer, no 1 for a boolean), finite
numbers, ranges, choices, unknown keys; a failure raises `ParamsError` naming the key. What a
key means for a dataset or a model (does the crop fit its images, is it an option of that
model) is the registries' to say: `stages.params.load` asks them after these models.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.core.validation import check, params_error

# What train.device and every --device accept.
DEVICE_NAMES = r"auto|cpu|cuda(:[0-9]+)?"


class _Section(BaseModel):
    """A part of params.yaml: every key present, exact types (an integer is also a number),
    finite numbers, no unknown keys, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class DownloadParams(_Section):
    data_dir: str  # looked at first for archives a user placed by hand
    mirror: str  # alternative base address for the official files ("" = official)
    folder: str  # dataset "folder": your images under <data_dir>/<folder>/<class>/
    retries: PositiveInt  # attempts per address on connection errors and 5xx, with backoff
    timeout: PositiveFloat  # seconds without a byte before a connection counts as dropped

    @field_validator("data_dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        check(bool(value), "must not be empty")
        return value

    @field_validator("mirror")
    @classmethod
    def _address(cls, value: str) -> str:
        check(
            value == "" or value.startswith(("http://", "https://")),
            f"must be empty or an http(s):// address, got {value!r}",
        )
        return value

    @field_validator("folder")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        check(
            bool(value) and "/" not in value and value not in (".", ".."),
            f"must be one folder name inside download.data_dir, got {value!r}",
        )
        return value


class ShapesParams(_Section):
    """The synthetic counting set: images of N filled circles, class = N."""

    min_count: PositiveInt
    max_count: PositiveInt
    per_class: int = Field(ge=2)  # images generated per count
    min_radius: PositiveInt  # equal radii: fixed-size circles; different: sizes vary
    max_radius: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> ShapesParams:
        check(
            self.max_count >= self.min_count,
            f"must be >= min_count ({self.min_count})",
            "max_count",
        )
        check(
            self.max_radius >= self.min_radius,
            f"must be >= min_radius ({self.min_radius})",
            "max_radius",
        )
        return self


class PreprocessParams(_Section):
    val_fraction: float = Field(gt=0, lt=1)  # stratified split where a source has none
    image_size: int = Field(ge=8, le=1024)  # side of `folder` and `shapes` images
    skip_bad_images: bool  # false: an undecodable file fails the stage, listing it
    workers: NonNegativeInt  # processes decoding images; 0 = every available core
    # Training images held out (stratified, by `seed`) as the validation set in place of the
    # official one, to choose hyperparameters without looking at it (0 = the official set).
    tuning_split: NonNegativeInt
    shapes: ShapesParams


class TrainParams(_Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["sgd", "adam", "adamw", "adagrad"]
    lr: PositiveFloat
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0)
    schedule: Literal["cosine", "step", "constant", "linear", "onecycle", "plateau"]
    warmup_epochs: NonNegativeInt  # at most `epochs`, or the rate never reaches `lr`
    step_epochs: PositiveInt  # "step" schedule: divide the rate by 10 every step_epochs
    label_smoothing: float = Field(ge=0, lt=1)
    crop_size: int = Field(ge=8, le=1024)  # random crops to train, centre/10 crops to evaluate
    pad: NonNegativeInt  # zero padding before the random crop
    flip: bool  # random horizontal flip
    device: str  # auto | cpu | cuda | cuda:N
    # Transfer learning (stages/engine/pretrained.py): "scratch", "pretrained" (torchvision's
    # ImageNet weights) or the path of one of this project's checkpoints.
    init: str
    freeze_epochs: NonNegativeInt  # train only the new layers for this many epochs first
    loss: Literal["cross_entropy", "hinge"]  # cross_entropy is smoothed with label_smoothing > 0
    decay_norm_and_bias: bool  # weight decay on biases and norm parameters too
    plateau_patience: PositiveInt  # "plateau": epochs without val top-1 gain before a cut
    plateau_factor: float = Field(gt=0, lt=1)  # "plateau": multiply the rate by this
    patience: NonNegativeInt  # early stopping: epochs without val top-1 gain (0 = never)
    vflip: bool  # random vertical flip
    resized_crop: bool  # random-resized-crop (area and aspect) instead of a plain crop
    resized_crop_scale: float = Field(gt=0, le=1)  # smallest area a resized crop takes
    brightness: float = Field(ge=0, lt=1)  # colour jitter: largest relative change
    contrast: float = Field(ge=0, lt=1)
    saturation: float = Field(ge=0, lt=1)
    hue: float = Field(ge=0, le=0.5)  # largest hue rotation, a fraction of the wheel
    cutout: NonNegativeInt  # side of the zeroed square (px) cut from each image (0 = off)
    # Progressive resizing: the random crops are rescaled to `resize_from` px up to epoch
    # `resize_start`, then grow linearly to crop_size, reached at epoch `resize_end` (0 = off).
    resize_from: NonNegativeInt
    resize_start: NonNegativeInt
    resize_end: NonNegativeInt
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # autocast dtype
    memory_format: Literal["auto", "channels_last", "contiguous"]
    compile: bool  # torch.compile the model
    cudnn_benchmark: bool  # cuDNN autotuning (CUDA only)
    # GiB of the training device the training set may take whole ("auto": half of what is free
    # there when training starts); a larger set is streamed from disk a batch at a time.
    memory_budget: PositiveFloat | Literal["auto"]
    ema_decay: float = Field(ge=0, lt=1)  # moving average of the weights (0 = off)
    histogram_every: NonNegativeInt  # weight/activation histograms every N epochs (0 = off)
    sync_batchnorm: bool  # synchronise batch-norm statistics across DDP ranks
    resume: bool  # continue from out/train/last.pt when its params match
    register_model: bool  # also register the MLflow model as convnet-<dataset>-<model>

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        check(
            re.fullmatch(DEVICE_NAMES, value) is not None,
            f"must be one of: auto, cpu, cuda, cuda:N (N a GPU number), got {value!r}",
        )
        return value

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        check(bool(value), "must be scratch, pretrained or a checkpoint path")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        """The keys bounded by others: a schedule that reaches its rate, augmentation that
        leaves something of the image to learn from."""
        check(
            self.warmup_epochs <= self.epochs,
            f"is {self.warmup_epochs} but train.epochs is {self.epochs}: the rate would never"
            f" reach train.lr; use at most {self.epochs}",
            "warmup_epochs",
        )
        half = self.crop_size // 2
        check(
            self.pad <= half,
            f"is {self.pad} but train.crop_size is {self.crop_size}: use at most {half}, so"
            " that every random crop is at least a quarter image",
            "pad",
        )
        check(
            self.cutout <= half,
            f"is {self.cutout} but train.crop_size is {self.crop_size}: use at most {half}"
            " (half the crop), or cutout erases whole images",
            "cutout",
        )
        if self.resize_from:
            check(
                8 <= self.resize_from < self.crop_size,
                f"is {self.resize_from}: use 0 (off) or a side from 8 to train.crop_size - 1"
                f" ({self.crop_size - 1})",
                "resize_from",
            )
            check(
                self.resize_start < self.resize_end <= self.epochs,
                f"is {self.resize_end}: the ramp ends at an epoch after train.resize_start"
                f" ({self.resize_start}), at most train.epochs ({self.epochs})",
                "resize_end",
            )
        check(
            self.loss == "cross_entropy" or self.label_smoothing == 0,
            "applies to loss cross_entropy only",
            "label_smoothing",
        )
        check(
            self.freeze_epochs == 0 or self.init != "scratch",
            "needs train.init: pretrained or a checkpoint path (nothing to freeze from scratch)",
            "freeze_epochs",
        )
        return self

    def crop_side(self, epoch: int) -> int:
        """The side the training crops are rescaled to in `epoch` (1-based): train.crop_size,
        or with progressive resizing the ramp from train.resize_from, in steps of 8 px."""
        if not self.resize_from or epoch >= self.resize_end:
            return self.crop_size
        if epoch <= self.resize_start:
            return self.resize_from
        grown = (self.crop_size - self.resize_from) * (epoch - self.resize_start)
        side = self.resize_from + grown // (self.resize_end - self.resize_start)
        return min(self.crop_size, max(self.resize_from, side // 8 * 8))


class EvaluateParams(_Section):
    batch_size: PositiveInt


Picture = Literal["predictions", "mistakes", "filters", "augmentation", "curves", "confusion"]
REPORT_PICTURES: tuple[str, ...] = typing.get_args(Picture)


class ReportParams(_Section):
    pictures: list[Picture]  # which pictures the report stage draws
    num_images: PositiveInt  # images in the predictions and mistakes pictures
    # Draws those images; separate from `seed` so a new sample needs no retraining.
    seed: int = Field(ge=0, le=2**32 - 1)
    augment_images: PositiveInt  # training images in the augmentation preview
    top_pairs: PositiveInt  # rows of the most-confused-pairs table
    ascent_steps: PositiveInt  # gradient-ascent steps per filter picture (CPU time ~ steps)
    ascent_lr: PositiveFloat
    max_channels: PositiveInt  # channels shown per gradient-ascent grid


class Params(_Section):
    seed: int = Field(ge=0, le=2**32 - 1)  # the range numpy and scikit-learn take
    # Checked against the dataset sources and the model registry by `load` (see the module's
    # docstring).
    dataset: str
    model: str
    recipe: str  # the conf/recipe/ file that set the values, or "none"
    download: DownloadParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    report: ReportParams
    net: dict[str, Any]  # the model's options, e.g. {"activation": "prelu"}

    def to_dict(self) -> dict[str, Any]:
        """The params as plain nested dicts, in params.yaml's layout."""
        return self.model_dump()

    def tracked(self) -> dict[str, Any]:
        """The params as MLflow shows them (`train.lr: 0.01`, `net.hidden: 1024`)."""
        return {k: v for k, v in flatten(self.to_dict()).items() if v != {}}

    def preprocess_inputs(self) -> dict[str, Any]:
        """The params that determine out/processed (what preprocess records in info.json)."""
        # How many processes decode changes nothing in the result.
        pre = self.preprocess.model_dump(exclude={"workers"})
        return {"seed": self.seed, "dataset": self.dataset, "preprocess": pre}


def from_dict(data: dict[str, Any]) -> Params:
    """Build Params from a plain mapping; ParamsError names the first key that is wrong."""
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise params_error(err, Params) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}: the form MLflow shows and compares."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
