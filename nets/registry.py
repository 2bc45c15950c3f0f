"""The registry of model builders (see the package's docstring): `register` adds one; `build`,
`names`, `options` and `options_model` read it once the family modules have registered theirs."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, create_model
from torch import nn

from nets.common import ArrayLike, Classifier, InputNorm

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
_OPTIONS: dict[str, type[BaseModel]] = {}
_POSITIONAL = ("num_classes", "image_size")
# The rules params.yaml's sections follow: exact types (an integer is also a number), finite
# numbers, no unknown options.
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class UnknownNetError(ValueError):
    """A model name nobody registered."""


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(num_classes, image_size, **options)` under `name`."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _OPTIONS[name] = _options_model(name, builder)
        _REGISTRY[name] = builder
        return builder

    return decorator


def _options_model(name: str, builder: Builder) -> type[BaseModel]:
    """The builder's keyword options as a pydantic model: each one's annotation and default."""
    fields: dict[str, tuple[object, object]] = {}
    for p in inspect.signature(builder, eval_str=True).parameters.values():
        if p.name in _POSITIONAL:
            continue
        if p.annotation is p.empty or p.default is p.empty:
            raise TypeError(f"model {name!r}: option {p.name!r} needs a type and a default")
        fields[p.name] = (p.annotation, p.default)
    return create_model(f"{name}_options", __config__=_STRICT, **fields)


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise UnknownNetError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    return _REGISTRY[name]


def options_model(name: str) -> type[BaseModel]:
    """The pydantic model of the model's options: `options_model(name).model_validate(opts)`
    checks their types, ranges and choices and rejects unknown ones."""
    _builder(name)
    return _OPTIONS[name]


def options(name: str) -> dict[str, object]:
    """The model's keyword options and their defaults."""
    return {key: field.default for key, field in options_model(name).model_fields.items()}


def build(
    name: str,
    num_classes: int,
    image_size: int,
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model `name` for (B, 3, image_size, image_size) inputs in [0, 1].

    `mean` is the training set's (3, H, W) mean image, `std` the per-channel std (both in
    [0, 1] units); left out, they are placeholders that a checkpoint's state dict fills in.
    """
    valid = options(name)
    for key in kwargs:
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} for model {name!r}; "
                f"valid options: {', '.join(valid) or '(none)'}"
            )
    body = _builder(name)(num_classes, image_size, **kwargs)
    return Classifier(normalize=InputNorm(mean, std, image_size), body=body)
