"""Your own images, one folder per class: `<data_dir>/<download.folder>/<class>/*.jpg`.

Any size and mode (JPEG, PNG, WebP, GIF, ...): preprocess resizes the short side to
`preprocess.image_size` and crops the centre square, through the one image reader that `predict`
uses too. The validation set is a stratified split (`preprocess.val_fraction`). Hidden files and
folders (a name starting with `.`, at any depth) are skipped: `base.visible_files`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from stages.core import paths
from stages.core.errors import PipelineError
from stages.data.fetch import copy_tree
from stages.data.sources.base import (
    LayoutError,
    Source,
    require,
    val_split,
    visible,
    visible_files,
)

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import DownloadParams, Params


def make_raw(dest: Path, d: DownloadParams) -> None:
    """Snapshot your images into out/raw (DVC then tracks them through it)."""
    src = Path(d.data_dir) / d.folder
    if not src.is_dir():
        raise PipelineError(
            f"{src}: not found; put your images in {src}/<class name>/*.jpg (or .png, .webp),"
            " one folder per class, or set download.folder"
        )
    if not src.resolve().is_relative_to(Path(d.data_dir).resolve()):
        raise PipelineError(
            f"{src}: a link to {src.resolve()}, outside {d.data_dir}/; links out of the data"
            f" folder are not followed: move or copy the images into {src}"
        )
    classes = [c for c in visible(src) if c.is_dir()]
    for c in classes:
        try:
            c.name.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system could not decode as UTF-8
            shown = os.fsencode(c).decode("utf-8", "backslashreplace")  # printable
            raise PipelineError(
                f"{shown}: the class folder's name is not valid UTF-8 (class names go into"
                " classes.json, CSV files and plots); rename it"
            ) from None
    if len(classes) < 2:
        raise PipelineError(
            f"{src}: found {len(classes)} class folder(s); need at least 2, as"
            f" {src}/<class name>/<images>"
        )
    count = copy_tree(src, dest / paths.FOLDER, inside=Path(d.data_dir))
    copied = sum(1 for c in (dest / paths.FOLDER).iterdir() if c.is_dir())
    print(f"download: folder: copied {count} files in {copied} class folders from {src}")


def read(raw: Path, p: Params, out: ProcessedWriter) -> list[str]:
    root = require(raw / paths.FOLDER, "folder")
    suffixes = {ext.lower() for ext in Image.registered_extensions()}
    classes = [d.name for d in visible(root) if d.is_dir()]
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for label, name in enumerate(classes):
        found = []
        for f in visible_files(root / name):  # not .DS_Store, nor .thumbnails/*.png
            if f.suffix.lower() in suffixes:
                found.append(f)
            else:
                ignored += 1
        if not found:
            raise LayoutError(f"{root / name}: class folder has no images (jpg, png, webp...)")
        files += found
        labels += [label] * len(found)
    if len(classes) < 2:
        raise LayoutError(f"{root}: needs at least 2 class folders, found {len(classes)}")
    if ignored:
        print(f"preprocess: folder: ignored {ignored} files that are not images (by extension)")
    # Split the file list, then decode each part straight into its own file.
    y = np.asarray(labels, dtype=np.int64)
    size = p.preprocess.image_size
    for split, index in zip(("train", "val"), val_split(y, p), strict=True):
        out.decode(split, [files[i] for i in index], y[index], size, fit=True)
    return classes


SOURCE = Source(
    name="folder",
    description="your own images: data/<download.folder>/<class>/*.{jpg,png,webp,...}",
    read=read,
    make_raw=make_raw,
    local_origin=lambda d: str(Path(d.data_dir) / d.folder),
)
