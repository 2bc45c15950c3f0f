"""Pipeline configuration: frozen pydantic models mirroring params.yaml, loaded and validated once.

The CLI calls `load()`; every stage function receives the resulting `Params` and never opens
params.yaml itself. Every key is checked: exact types (no "3" for an integer, no 1 for a
boolean), finite numbers, ranges, choices, unknown keys; a failure raises `ParamsError` naming
the key, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
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

from stages.core.errors import ParamsError
from stages.core.validation import check, params_error
from stages.data.sources import SOURCES

# What train.device and every --device accept.
DEVICE_NAMES = r"auto|cpu|cuda(:[0-9]+)?"


class _Loader(yaml.SafeLoader):
    """YAML as DVC reads it: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, while
    DVC (YAML 1.2) and every user read a number; and, as DVC does, a key given twice is an error
    (PyYAML would keep the last value). One loader for params.yaml and `-S` values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                seen = first.setdefault((key.tag, key.value), key)
                if seen is not key:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key.value!r} (first on line "
                        f"{seen.start_mark.line + 1}); keep one",
                        problem_mark=key.start_mark,
                    )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one phrase: where, what, and inside what."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return f"not valid YAML ({' '.join(str(err).split())})"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    inside = f" ({context} that starts on line {start.line + 1})" if context and start else ""
    return f"not valid YAML: {where}: {err.problem}{inside}"


class _Section(BaseModel):
    """A part of params.yaml: exact types (an integer is also a number), finite numbers, no
    unknown keys, immutable. A section left empty (null) takes its defaults."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data


class DownloadParams(_Section):
    data_dir: str = "data"  # looked at first for archives a user placed by hand
    mirror: str = ""  # alternative base address for the official files ("" = official)
    folder: str = "images"  # dataset "folder": your images under <data_dir>/<folder>/<class>/
    retries: PositiveInt = 4  # attempts per address on connection errors and 5xx, with backoff
    timeout: PositiveFloat = 60.0  # seconds without a byte before a connection counts as dropped

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

    min_count: PositiveInt = 1
    max_count: PositiveInt = 5
    per_class: int = Field(1000, ge=2)  # images generated per count
    min_radius: PositiveInt = 3  # equal radii: fixed-size circles; different: sizes vary
    max_radius: PositiveInt = 3

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
    val_fraction: float = Field(0.2, gt=0, lt=1)  # stratified split where a source has none
    image_size: int = Field(32, ge=8, le=1024)  # side of `folder` and `shapes` images
    skip_bad_images: bool = False  # false: an undecodable file fails the stage, listing it
    workers: NonNegativeInt = 0  # processes decoding images; 0 = every available core
    shapes: ShapesParams = Field(default_factory=ShapesParams)


# The train keys params.yaml leaves null: each model declares what it trains well with
# (nets.train_defaults); train writes their values to out/train/params.json for `dvc exp show`.
MODEL_TUNED = (
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
    "label_smoothing", "memory_format",
)  # fmt: skip


class TrainParams(_Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    optimizer: Literal["sgd", "adam", "adamw", "adagrad"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant", "onecycle", "plateau"] = "cosine"
    warmup_epochs: NonNegativeInt = 1  # at most `epochs`, or the rate never reaches `lr`
    step_epochs: PositiveInt = 30  # "step" schedule: divide the rate by 10 every step_epochs
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_size: int = Field(28, ge=8)  # random crops for training, centre/10-crop for evaluation
    pad: NonNegativeInt = 0  # zero padding before the random crop
    flip: bool = True  # random horizontal flip
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Transfer learning (stages/engine/pretrained.py): "scratch", "pretrained" (torchvision's
    # ImageNet weights) or the path of one of this project's checkpoints.
    init: str = "scratch"
    freeze_epochs: NonNegativeInt = 0  # train only the new layers for this many epochs first
    loss: Literal["cross_entropy", "hinge"] = "cross_entropy"  # smoothed: label_smoothing > 0
    decay_norm_and_bias: bool = False  # weight decay on biases and norm parameters too
    plateau_patience: PositiveInt = 3  # "plateau": epochs without val top-1 gain before a cut
    plateau_factor: float = Field(0.1, gt=0, lt=1)  # "plateau": multiply the rate by this
    patience: NonNegativeInt = 0  # early stopping: epochs without val top-1 gain (0 = never)
    vflip: bool = False  # random vertical flip
    resized_crop: bool = False  # random-resized-crop (area and aspect) instead of a plain crop
    resized_crop_scale: float = Field(0.25, gt=0, le=1)  # smallest area a resized crop takes
    brightness: float = Field(0.0, ge=0, lt=1)  # colour jitter: largest relative change
    contrast: float = Field(0.0, ge=0, lt=1)
    saturation: float = Field(0.0, ge=0, lt=1)
    hue: float = Field(0.0, ge=0, le=0.5)  # largest hue rotation, a fraction of the wheel
    cutout: NonNegativeInt = 0  # side of the zeroed square (px) cut from each image (0 = off)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True  # cuDNN autotuning (CUDA only)
    # GiB of the training device the training set may take whole ("auto": half of what is free
    # there when training starts); a larger set is streamed from disk a batch at a time.
    memory_budget: PositiveFloat | Literal["auto"] = "auto"
    ema_decay: float = Field(0.0, ge=0, lt=1)  # moving average of the weights (0 = off)
    histogram_every: NonNegativeInt = 0  # weight/activation histograms every N epochs (0 = off)
    sync_batchnorm: bool = False  # synchronise batch-norm statistics across DDP ranks
    resume: bool = True  # continue from out/train/last.pt when its params match
    register_model: bool = False  # also register the MLflow model as convnet-<dataset>-<model>

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
        check(
            self.warmup_epochs <= self.epochs,
            f"is {self.warmup_epochs} but train.epochs is {self.epochs}: the rate would never"
            f" reach train.lr; use at most {self.epochs}",
            "warmup_epochs",
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


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256


Picture = Literal["predictions", "mistakes", "filters", "augmentation", "curves", "confusion"]
REPORT_PICTURES: tuple[str, ...] = typing.get_args(Picture)


class ReportParams(_Section):
    # Which pictures the report stage draws (any subset of REPORT_PICTURES).
    pictures: list[Picture] = Field(default_factory=lambda: list(REPORT_PICTURES))
    num_images: PositiveInt = 10  # images in the predictions and mistakes pictures
    # Draws those images; separate from `seed` so a new sample needs no retraining.
    seed: int = Field(0, ge=0, le=2**32 - 1)
    augment_images: PositiveInt = 32  # training images in the augmentation preview
    top_pairs: PositiveInt = 20  # rows of the most-confused-pairs table
    ascent_steps: PositiveInt = 20  # gradient-ascent steps per filter picture (CPU time ~ steps)
    ascent_lr: PositiveFloat = 0.1
    max_channels: PositiveInt = 32  # channels shown per gradient-ascent grid


class Params(_Section):
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range numpy and scikit-learn take
    dataset: str = "digits"
    # `model`, `nets.*` and `train.init: pretrained` are checked against the model registry by
    # stages.engine.model.check_model_params (the CLI calls it right after loading): keeping
    # the registry out of this module keeps it out of the stages that never build a model, so
    # editing a net reruns only the stages that use it.
    model: str = "alexnet"
    download: DownloadParams = Field(default_factory=DownloadParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)
    # Per-architecture options, e.g. {"alexnet": {"activation": "prelu"}}; only the entry of
    # `model` is used, so `-S model=...` switches architecture without editing this.
    nets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        check(value in SOURCES, f"must be one of: {', '.join(SOURCES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _fits_the_images(self) -> Params:
        """The rules that depend on the dataset's images: its own (shapes: the circles fit),
        then the crop fits in them."""
        source = SOURCES[self.dataset]
        if source.check is not None:
            source.check(self)
        size = source.image_size or self.preprocess.image_size
        check(
            self.train.crop_size <= size + 2 * self.train.pad,
            f"is {self.train.crop_size} but {self.dataset} images are {size}x{size}"
            f" (+{self.train.pad} padding); use a crop of at most {size + 2 * self.train.pad}",
            "train.crop_size",
        )
        return self

    @property
    def net_options(self) -> dict[str, Any]:
        """Options of the selected model (empty when params.yaml sets none)."""
        return dict(self.nets.get(self.model, {}))

    def to_dict(self) -> dict[str, Any]:
        """The params as plain nested dicts, in params.yaml's layout."""
        return self.model_dump()

    def tracked(self) -> dict[str, Any]:
        """The params as MLflow shows them (`train.lr: 0.01`), with only the selected model's
        `nets` options: the others played no part in the run."""
        tree = self.to_dict()
        tree["nets"] = {self.model: self.net_options}
        return {k: v for k, v in flatten(tree).items() if v != {}}

    def preprocess_inputs(self) -> dict[str, Any]:
        """The params that determine out/processed (what preprocess records in info.json)."""
        # How many processes decode changes nothing in the result.
        pre = self.preprocess.model_dump(exclude={"workers"})
        return {"seed": self.seed, "dataset": self.dataset, "preprocess": pre}


def load(
    path: Path | str = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    defaults: Callable[[str], dict[str, Any]] | None = None,
) -> Params:
    """Read params.yaml, apply `key.sub=value` overrides (YAML values), fill the `train` keys
    left null, validate, return Params. Errors about the file's content name the file.

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
        data = _yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: {_yaml_problem(err)}") from None
    if data is None or data == {}:
        raise ParamsError(f"{path}: is empty; it must set the pipeline's parameters")
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
        try:
            node[leaf] = _yaml(raw)
        except yaml.YAMLError as err:
            raise ParamsError(f"override {item!r}: {_yaml_problem(err)}") from None
    _fill_nulls(data, defaults or (lambda model: {}))
    try:
        return from_dict(data)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def _fill_nulls(data: dict[str, Any], defaults: Callable[[str], dict[str, Any]]) -> None:
    """Replace each null under `train` by the model's training default, or drop it (so the
    built-in default applies)."""
    train = data.get("train")
    if not isinstance(train, dict):
        return
    model = data.get("model", Params.model_fields["model"].default)
    tuned = defaults(model) if isinstance(model, str) else {}
    for key in [k for k, v in train.items() if v is None]:
        if key in tuned:
            train[key] = tuned[key]
        else:
            del train[key]


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
