"""The datasets the pipeline knows, one module each; `SOURCES` is the table built from them.

Params validation, download and preprocess all read this table; adding a dataset is adding a
module here (see base.py for what it declares) and its name below.
"""

from __future__ import annotations

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

MODULES = (digits, shapes, folder, mnist, cifar10, tiny_imagenet, imagenet64)
SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in MODULES}

__all__ = ["SOURCES", "MODULES", "LayoutError", "NotOfficialError", "RemoteFile", "Source"]
