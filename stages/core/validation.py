"""Pydantic's validation errors as the one-line `ParamsError`: `train.lr: must be positive, got -1`.

Params (stages/params.py) and each net's options (nets.options_model) are pydantic models; their
constraints (types, `Field(ge=..., lt=...)`, `Literal` choices, unknown keys) and the rules of
their validators (`check`) become one message naming the key path joined with dots.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from stages.core.errors import ParamsError

# What each type error means in params.yaml's words (YAML's true/false, mapping, list).
_TYPES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
}


def check(ok: bool, message: str, key: str = "") -> None:
    """In a validator: unless `ok`, fail with `message` on `key` (a dotted path relative to the
    model being validated; empty: the field or model the validator belongs to)."""
    if not ok:
        raise PydanticCustomError("rule", "{message}", {"message": message, "key": key})


def params_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> ParamsError:
    """The first error of `err`, raised validating `model`, as `prefix` + `key.path: rule`."""
    error = err.errors()[0]
    keys: list[str] = []
    owner: type[BaseModel] | None = model  # the model the next part of the path belongs to
    parent, field = model, None
    for part in error["loc"]:
        if isinstance(part, int):  # an item of a list: the message names the list
            continue
        keys.append(str(part))
        parent, field = owner, owner.model_fields.get(str(part)) if owner else None
        owner = _model(field.annotation) if field else None
    ctx = error.get("ctx", {})
    if error["type"] == "rule":
        keys += [ctx["key"]] if ctx["key"] else []
        message = ctx["message"]
    else:
        message = _message(error, parent, field)
    return ParamsError(f"{prefix}{'.'.join(keys) or 'params'}: {message}")


def _message(error: Any, parent: type[BaseModel] | None, field: FieldInfo | None) -> str:
    kind, got = error["type"], f", got {_short(error['input'])}"
    if kind == "missing":  # params.yaml is composed with every key: this one was taken out
        return "missing; params.yaml sets every key (`convnet compose` writes it from conf/)"
    if kind == "extra_forbidden" and parent is not None:
        return f"unknown key; valid keys: {', '.join(sorted(parent.model_fields)) or '(none)'}"
    if kind == "literal_error" and field is not None:
        return f"must be one of: {', '.join(map(str, _choices(field.annotation)))}{got}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and field:
        return _range(field) + got
    return _TYPES.get(kind, error["msg"]) + got


def _range(field: FieldInfo) -> str:
    """`must be in [0, 1)`, `must be positive`, ... from the field's bounds."""
    bound = {
        name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt")
        if hasattr(m, name)
    }  # fmt: skip
    low = f"[{bound['ge']}" if "ge" in bound else f"({bound['gt']}" if "gt" in bound else ""
    high = f"{bound['le']}]" if "le" in bound else f"{bound['lt']})" if "lt" in bound else ""
    if low and high:
        return f"must be in {low}, {high}"
    if bound.get("gt") == 0:
        return "must be a positive integer" if field.annotation is int else "must be positive"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {low[1:]}"
    return f"must be {'<=' if high[-1] == ']' else '<'} {high[:-1]}"


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The values of the Literal in `annotation` (itself, or inside list[...])."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return next((c for a in typing.get_args(annotation) if (c := _choices(a))), ())


def _model(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
