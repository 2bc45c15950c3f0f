"""Pipeline configuration: frozen dataclasses mirroring params.yaml, loaded and validated once.

The CLI calls `load()`; every stage function receives the resulting `Params` and never opens
params.yaml itself. Unknown keys, wrong types and out-of-range values raise `ParamsError`
naming the key, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.core.errors import ParamsError
from stages.data.sources import SOURCES

# What train.device and every --device accept.
DEVICE_NAMES = r"auto|cpu|cuda(:[0-9]+)?"


class _Loader(yaml.SafeLoader):
    """YAML as DVC reads it: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, while
    DVC (YAML 1.2) and every user read a number. One loader for params.yaml and `-S` values."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class DownloadParams:
    data_dir: str = "data"  # looked at first for archives a user placed by hand
    mirror: str = ""  # alternative base address for the official files ("" = official)
    folder: str = "images"  # dataset "folder": your images under <data_dir>/<folder>/<class>/
    retries: int = 4  # attempts per address on connection errors and 5xx, with backoff
    timeout: float = 60.0  # seconds without a byte before a connection counts as dropped

    def __post_init__(self) -> None:
        _check(bool(self.data_dir), "download.data_dir", "must not be empty")
        _check(
            self.mirror == "" or self.mirror.startswith(("http://", "https://")),
            "download.mirror",
            f"must be empty or an http(s):// address, got {self.mirror!r}",
        )
        _check(
            bool(self.folder) and "/" not in self.folder and self.folder not in (".", ".."),
            "download.folder",
            f"must be one folder name inside download.data_dir, got {self.folder!r}",
        )
        _check(self.retries >= 1, "download.retries", "must be a positive integer")
        _check(self.timeout > 0, "download.timeout", "must be positive")


@dataclass(frozen=True)
class ShapesParams:
    """The synthetic counting set: images of N filled circles, class = N."""

    min_count: int = 1
    max_count: int = 5
    per_class: int = 1000  # images generated per count
    min_radius: int = 3  # equal radii: fixed-size circles; different: sizes vary per circle
    max_radius: int = 3

    def __post_init__(self) -> None:
        _check(self.min_count >= 1, "preprocess.shapes.min_count", "must be at least 1")
        _check(
            self.max_count >= self.min_count,
            "preprocess.shapes.max_count",
            f"must be >= min_count ({self.min_count})",
        )
        _check(self.per_class >= 2, "preprocess.shapes.per_class", "must be at least 2")
        _check(self.min_radius >= 1, "preprocess.shapes.min_radius", "must be at least 1")
        _check(
            self.max_radius >= self.min_radius,
            "preprocess.shapes.max_radius",
            f"must be >= min_radius ({self.min_radius})",
        )


@dataclass(frozen=True)
class PreprocessParams:
    val_fraction: float = 0.2  # stratified split for sources without an official one
    image_size: int = 32  # side of the images for `folder` and `shapes` (others are fixed)
    skip_bad_images: bool = False  # false: an undecodable file fails the stage, listing it
    workers: int = 0  # processes decoding images; 0 = every available core
    shapes: ShapesParams = field(default_factory=ShapesParams)

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "preprocess.val_fraction", "must be in (0, 1)")
        _check(8 <= self.image_size <= 1024, "preprocess.image_size", "must be in [8, 1024]")
        _check(self.workers >= 0, "preprocess.workers", "must be >= 0 (0 = every core)")


# The train keys params.yaml leaves null: each model declares what it trains well with
# (nets.train_defaults); train writes their values to out/train/params.json for `dvc exp show`.
MODEL_TUNED = (
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
    "label_smoothing", "memory_format",
)  # fmt: skip


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 10
    batch_size: int = 32
    optimizer: Literal["sgd", "adam", "adamw", "adagrad"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant", "onecycle", "plateau"] = "cosine"
    warmup_epochs: int = 1
    step_epochs: int = 30  # "step" schedule: divide the rate by 10 every step_epochs
    label_smoothing: float = 0.0
    crop_size: int = 28  # random crops of this size for training, centre/10-crop for evaluation
    pad: int = 0  # zero padding before the random crop
    flip: bool = True  # random horizontal flip
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Transfer learning (stages/pretrained.py): "scratch", "pretrained" (torchvision's ImageNet
    # weights) or the path of one of this project's checkpoints.
    init: str = "scratch"
    freeze_epochs: int = 0  # train only the new layers for this many epochs first
    loss: Literal["cross_entropy", "hinge"] = "cross_entropy"  # smoothed: label_smoothing > 0
    decay_norm_and_bias: bool = False  # weight decay on biases and norm parameters too
    plateau_patience: int = 3  # "plateau" schedule: epochs without val top-1 gain before a cut
    plateau_factor: float = 0.1  # "plateau" schedule: multiply the rate by this on a plateau
    patience: int = 0  # early stopping: epochs without val top-1 gain (0 = never stop early)
    vflip: bool = False  # random vertical flip
    resized_crop: bool = False  # random-resized-crop (area and aspect) instead of a plain crop
    resized_crop_scale: float = 0.25  # smallest area fraction a resized crop takes
    brightness: float = 0.0  # colour jitter: largest relative change, each in [0, 1)
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # largest hue rotation as a fraction of the colour wheel, in [0, 0.5]
    cutout: int = 0  # side of the zeroed square (px) cut from each image (0 = off)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True  # cuDNN autotuning (CUDA only)
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off)
    histogram_every: int = 0  # weight/activation histograms every N epochs (0 = off)
    sync_batchnorm: bool = False  # synchronise batch-norm statistics across DDP ranks
    resume: bool = True  # continue from out/train/last.pt when its params match
    register_model: bool = False  # also register the MLflow model as convnet-<dataset>-<model>

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be a positive integer")
        _check(self.batch_size >= 1, "train.batch_size", "must be a positive integer")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _check(self.step_epochs >= 1, "train.step_epochs", "must be a positive integer")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.crop_size >= 8, "train.crop_size", "must be at least 8")
        _check(self.pad >= 0, "train.pad", "must be >= 0")
        _check(self.plateau_patience >= 1, "train.plateau_patience", "must be a positive integer")
        _check(0 < self.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)")
        _check(self.patience >= 0, "train.patience", "must be >= 0 (0 = off)")
        _check(0 < self.resized_crop_scale <= 1, "train.resized_crop_scale", "must be in (0, 1]")
        for key in ("brightness", "contrast", "saturation"):
            _check(0 <= getattr(self, key) < 1, f"train.{key}", "must be in [0, 1)")
        _check(0 <= self.hue <= 0.5, "train.hue", "must be in [0, 0.5]")
        _check(self.cutout >= 0, "train.cutout", "must be >= 0 (0 = off)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 = off)")
        _check(self.histogram_every >= 0, "train.histogram_every", "must be >= 0 (0 = off)")
        _check(
            self.loss == "cross_entropy" or self.label_smoothing == 0,
            "train.label_smoothing",
            "applies to loss cross_entropy only",
        )
        _check(
            re.fullmatch(DEVICE_NAMES, self.device) is not None,
            "train.device",
            f"must be one of: auto, cpu, cuda, cuda:N (N a GPU number), got {self.device!r}",
        )
        _check(bool(self.init), "train.init", "must be scratch, pretrained or a checkpoint path")
        _check(self.freeze_epochs >= 0, "train.freeze_epochs", "must be >= 0")
        _check(
            self.freeze_epochs == 0 or self.init != "scratch",
            "train.freeze_epochs",
            "needs train.init: pretrained or a checkpoint path (nothing to freeze from scratch)",
        )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be a positive integer")


REPORT_PICTURES = ("predictions", "mistakes", "filters", "augmentation", "curves", "confusion")


@dataclass(frozen=True)
class ReportParams:
    # Which pictures the report stage draws (any subset of REPORT_PICTURES).
    pictures: list[str] = field(default_factory=lambda: list(REPORT_PICTURES))
    num_images: int = 10  # images in the predictions and mistakes pictures
    seed: int = 0  # draws those images; separate from `seed` so a new sample needs no retraining
    augment_images: int = 32  # training images in the augmentation preview
    top_pairs: int = 20  # rows of the most-confused-pairs table
    ascent_steps: int = 20  # gradient-ascent steps per filter picture (CPU time grows linearly)
    ascent_lr: float = 0.1
    max_channels: int = 32  # channels shown per gradient-ascent grid

    def __post_init__(self) -> None:
        _check(isinstance(self.pictures, list), "report.pictures", "must be a list")
        for name in self.pictures:
            _check(
                name in REPORT_PICTURES,
                "report.pictures",
                f"{name!r} is not a picture; choose from: {', '.join(REPORT_PICTURES)}",
            )
        _check(self.num_images >= 1, "report.num_images", "must be a positive integer")
        _check(self.augment_images >= 1, "report.augment_images", "must be a positive integer")
        _check(self.top_pairs >= 1, "report.top_pairs", "must be a positive integer")
        _check(self.ascent_steps >= 1, "report.ascent_steps", "must be a positive integer")
        _check(self.ascent_lr > 0, "report.ascent_lr", "must be positive")
        _check(self.max_channels >= 1, "report.max_channels", "must be a positive integer")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    dataset: str = "digits"
    model: str = "alexnet"
    download: DownloadParams = field(default_factory=DownloadParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    # Per-architecture options, e.g. {"alexnet": {"activation": "prelu"}}; only the entry of
    # `model` is used, so `-S model=...` switches architecture without editing this.
    nets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # `model`, `nets.*` and `train.init: pretrained` are checked against the model registry
        # by stages.engine.model.check_model_params (the CLI calls it right after loading):
        # keeping the registry out of this module keeps it out of the stages that never build
        # a model, so editing a net reruns only the stages that use it.
        _check(self.dataset in SOURCES, "dataset", f"must be one of: {', '.join(SOURCES)}")
        source = SOURCES[self.dataset]
        if source.check is not None:  # what only this dataset needs (shapes: circles must fit)
            source.check(self)
        size = source.image_size or self.preprocess.image_size
        _check(
            self.train.crop_size <= size + 2 * self.train.pad,
            "train.crop_size",
            f"is {self.train.crop_size} but {self.dataset} images are {size}x{size}"
            f" (+{self.train.pad} padding); use a crop of at most {size + 2 * self.train.pad}",
        )

    @property
    def net_options(self) -> dict[str, Any]:
        """Options of the selected model (empty when params.yaml sets none)."""
        return dict(self.nets.get(self.model, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tracked(self) -> dict[str, Any]:
        """The params as MLflow shows them (`train.lr: 0.01`), with only the selected model's
        `nets` options: the others played no part in the run."""
        tree = self.to_dict()
        tree["nets"] = {self.model: self.net_options}
        return {k: v for k, v in flatten(tree).items() if v != {}}

    def preprocess_inputs(self) -> dict[str, Any]:
        """The params that determine out/processed (what preprocess records in info.json)."""
        pre = dataclasses.asdict(self.preprocess)
        del pre["workers"]  # how many processes decode changes nothing in the result
        return {"seed": self.seed, "dataset": self.dataset, "preprocess": pre}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {message}")


def load(
    path: Path | str = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    defaults: Callable[[str], dict[str, Any]] | None = None,
) -> Params:
    """Read params.yaml, apply `key.sub=value` overrides (YAML values), fill the `train` keys
    left null, validate, return Params.

    A null train key takes `defaults(model)[key]`, the selected model's training default
    (`nets.train_defaults`, passed in by the CLI: this module does not import the nets), else
    TrainParams' own default.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the repository root")
    if not path.is_file():
        raise ParamsError(f"{path}: not a file; --params takes a YAML file like params.yaml")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a section")
        node[leaf] = _yaml(raw)
    _fill_nulls(data, defaults or (lambda model: {}))
    return from_dict(data)


def _fill_nulls(data: dict[str, Any], defaults: Callable[[str], dict[str, Any]]) -> None:
    """Replace each null under `train` by the model's training default, or drop it (so the
    dataclass default applies)."""
    train = data.get("train")
    if not isinstance(train, dict):
        return
    model = data.get("model", Params.model)
    tuned = defaults(model) if isinstance(model, str) else {}
    for key in [k for k, v in train.items() if v is None]:
        if key in tuned:
            train[key] = tuned[key]
        else:
            del train[key]


def from_dict(data: dict[str, Any]) -> Params:
    """Build Params from a plain mapping, rejecting unknown keys and wrong types by name."""
    return _build(Params, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ParamsError(
            f"{prefix}{unknown[0]}: unknown key; valid keys: {', '.join(sorted(fields))}"
        )
    values = {name: _convert(hints[name], data[name], prefix + name) for name in data}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        _check(value in choices, key, f"must be one of: {', '.join(map(str, choices))}")
        return value
    if origin in (dict, types.GenericAlias):
        _check(isinstance(value, dict), key, "must be a mapping")
        return value
    if hint is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif hint is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}",
        )
    elif hint is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        value = float(value)
    elif hint is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}: the form MLflow shows and compares."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
