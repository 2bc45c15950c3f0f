"""The datasets the pipeline knows, one module each; `SOURCES` is the table built from them.

Params checks, download and preprocess all read this table; adding a dataset is adding a
module here (see base.py for what it declares), its name below, and its conf/dataset/ file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.errors import ParamsError
from stages.data.sources import (
    cifar10,
    digits,
    folder,
    imagenet64,
    mnist,
    shapes,
    tiny_imagenet,
)
from stages.data.sources.base import LayoutError, NotOfficialError, RemoteFile, Source

if TYPE_CHECKING:
    from stages.params import Params

MODULES = (digits, shapes, folder, mnist, cifar10, tiny_imagenet, imagenet64)
SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in MODULES}


def check_params(p: Params) -> None:
    """The params that depend on the dataset's images: the dataset is known, its own rules
    hold (shapes: the circles fit), the crop fits in its images. ParamsError names the key."""
    if p.dataset not in SOURCES:
        raise ParamsError(f"dataset: must be one of: {', '.join(SOURCES)}, got {p.dataset!r}")
    source = SOURCES[p.dataset]
    if source.check is not None:
        source.check(p)
    if p.preprocess.tuning_split and not source.tuning_split:
        supported = ", ".join(name for name, s in SOURCES.items() if s.tuning_split)
        raise ParamsError(
            f"preprocess.tuning_split: supported for {supported}, not {p.dataset}; set it to 0"
        )
    size = source.image_size or p.preprocess.image_size
    if p.train.crop_size > size + 2 * p.train.pad:
        raise ParamsError(
            f"train.crop_size: is {p.train.crop_size} but {p.dataset} images are {size}x{size}"
            f" (+{p.train.pad} padding); use a crop of at most {size + 2 * p.train.pad}"
        )


__all__ = [
    "SOURCES", "MODULES", "LayoutError", "NotOfficialError", "RemoteFile", "Source",
    "check_params",
]  # fmt: skip
