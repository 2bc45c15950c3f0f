"""Tiny ImageNet: 200 ImageNet classes at 64x64, 500 train and 50 validation images per class,
10,000 unlabelled test images (Stanford's CS231n).

Accepted in `download.data_dir` as the official `tiny-imagenet-200.zip` (checked by checksum) or
extracted as `tiny-imagenet-200/` (checked by structure against OFFICIAL: the classes in
wnids.txt and their names, every train, val and test file name, 50 validation images per class).
A copy that differs (an extra class, a missing image) is refused, naming the difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.data.sources.base import (
    LayoutError,
    NotOfficialError,
    RemoteFile,
    Source,
    holdout,
    plain,
    require,
    visible,
)

if TYPE_CHECKING:
    from stages.data.writer import ProcessedWriter
    from stages.params import Params

FOLDER = "tiny-imagenet-200"
SIZE = 64
FILES = (
    RemoteFile(
        "tiny-imagenet-200.zip",
        ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
        # Stanford publishes no checksum; this md5 is the one loaders agree on.
        "md5:90528d7ca1a48142e341f4ef8d21d0de",
        248_100_043,
    ),
)


@dataclass(frozen=True)
class Layout:
    """How many of each thing the official set holds."""

    classes: int = 200
    train_per_class: int = 500
    val_per_class: int = 50
    test: int = 10_000


OFFICIAL = Layout()


def _wnids(path: Path) -> list[str]:
    """The class ids in wnids.txt, in file order."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _words(path: Path) -> dict[str, str]:
    """wnid -> its names ("goldfish, Carassius auratus") from words.txt."""
    words = {}
    for line in path.read_text().splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return words


def _annotations(path: Path) -> list[tuple[int, str, str]]:
    """(line number, file name, wnid) per line of val_annotations.txt."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            name, _, rest = line.partition("\t")
            rows.append((n, name.strip(), rest.split("\t")[0].strip()))
    return rows


def _names(folder: Path) -> set[str]:
    return {f.name for f in visible(folder)} if folder.is_dir() else set()


def _compare(found: set[str], expected: set[str]) -> str | None:
    """What differs between the names found and the official ones, or None."""

    def some(names: set[str]) -> str:
        shown = sorted(names)
        return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")

    if expected - found:
        return f"{some(expected - found)} missing"
    if found - expected:
        return f"{some(found - expected)} not in the official set"
    return None


def extracted(data_dir: Path) -> list[Path] | None:
    """data_dir/tiny-imagenet-200, checked against the official structure (file names and counts;
    the pixels are checked when preprocess decodes them)."""
    root = data_dir / FOLDER

    def refuse(where: Path, difference: str) -> NotOfficialError:
        return NotOfficialError(where, difference, "Tiny ImageNet")

    if not root.is_dir():
        return None
    parts = ("wnids.txt", "words.txt", "train", "val", "test")
    absent = [n for n in parts if not (root / n).exists()]
    if absent:
        raise refuse(root, f"{', '.join(absent)} missing")
    wnids = _wnids(root / "wnids.txt")
    twice = [w for w, n in Counter(wnids).items() if n > 1]
    if twice:
        raise refuse(root / "wnids.txt", f"lists {twice[0]} twice")
    if len(wnids) != OFFICIAL.classes:
        raise refuse(
            root / "wnids.txt", f"lists {len(wnids)} classes, the official set {OFFICIAL.classes}"
        )
    words = _words(root / "words.txt")
    unnamed = [w for w in wnids if not words.get(w)]
    if unnamed:
        raise refuse(root / "words.txt", f"has no name for class {unnamed[0]}")
    train = root / "train"
    if difference := _compare({d.name for d in visible(train) if d.is_dir()}, set(wnids)):
        raise refuse(train, f"class folders: {difference}")
    for w in wnids:
        want = {f"{w}_{i}.JPEG" for i in range(OFFICIAL.train_per_class)}
        if difference := _compare(_names(train / w / "images"), want):
            raise refuse(train / w / "images", difference)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise refuse(root / "val", "val_annotations.txt missing")
    rows = _annotations(annotations)
    count = OFFICIAL.classes * OFFICIAL.val_per_class
    if len(rows) != count:
        raise refuse(annotations, f"lists {len(rows):,} images, the official set {count:,}")
    per_class = Counter(wnid for _, _, wnid in rows)
    odd = [w for w in wnids if per_class[w] != OFFICIAL.val_per_class]
    if odd:
        found = f"{per_class[odd[0]]} images"
        raise refuse(annotations, f"class {odd[0]} has {found}, not {OFFICIAL.val_per_class}")
    names = {name for _, name, _ in rows}
    if difference := _compare(names, {f"val_{i}.JPEG" for i in range(count)}):
        raise refuse(annotations, difference)
    if difference := _compare(_names(root / "val" / "images"), names):
        raise refuse(root / "val" / "images", difference)
    tests = {f"test_{i}.JPEG" for i in range(OFFICIAL.test)}
    if difference := _compare(_names(root / "test" / "images"), tests):
        raise refuse(root / "test" / "images", difference)
    return [root]


def read(raw: Path, p: Params, out: ProcessedWriter) -> list[str]:
    root = require(raw / FOLDER, "folder")
    # Sorted wnids: the class order torchvision's ImageFolder would give the train folders.
    listed = require(root / "wnids.txt")
    wnids = sorted({plain(w, str(listed)) for w in _wnids(listed)})  # class folder names
    if not wnids:
        raise LayoutError(f"{root / 'wnids.txt'}: lists no classes")
    words = _words(require(root / "words.txt"))
    missing = [w for w in wnids if not words.get(w)]
    if missing:
        raise LayoutError(f"{root / 'words.txt'}: no name for class {missing[0]} (from wnids.txt)")
    index = {w: i for i, w in enumerate(wnids)}

    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        folder = require(root / "train" / w / "images", "folder")
        files = [f for f in visible(folder) if f.is_file()]
        if not files:
            raise LayoutError(f"{folder}: class folder is empty")
        train_files += files
        train_labels += [index[w]] * len(files)

    annotations = require(root / "val" / "val_annotations.txt")
    val_files: list[Path] = []
    val_labels: list[int] = []
    for n, name, wnid in _annotations(annotations):
        if wnid not in index:
            raise LayoutError(f"{annotations}:{n}: class {wnid!r} of {name} is not in wnids.txt")
        val_files.append(root / "val" / "images" / plain(name, f"{annotations}:{n}"))
        val_labels.append(index[wnid])
    if not val_files:
        raise LayoutError(f"{annotations}: lists no images")
    test_dir = require(root / "test" / "images", "folder")
    test_files = [f for f in visible(test_dir) if f.is_file()]

    if p.preprocess.tuning_split:  # the official validation set stays unseen
        train, held = holdout(np.asarray(train_labels), p)
        val_files, val_labels = [train_files[i] for i in held], [train_labels[i] for i in held]
        train_files, train_labels = (
            [train_files[i] for i in train],
            [train_labels[i] for i in train],
        )
    out.decode("train", train_files, np.asarray(train_labels), SIZE)
    out.decode("val", val_files, np.asarray(val_labels), SIZE)
    # Unlabelled: kept apart from everything with labels, for `convnet submit`.
    kept = out.decode("test", test_files, None, SIZE)
    out.write_json("test_files.json", [f.name for f in kept])
    out.info["wnids"] = wnids  # what `convnet submit` writes per image
    # "goldfish, Carassius auratus" -> "goldfish": short names for plots.
    return [words[w].split(",")[0].strip() for w in wnids]


SOURCE = Source(
    name="tiny-imagenet",
    description="Tiny ImageNet: 200 classes, 100,000 train + 10,000 val (+10,000 unlabelled test)"
    " 64x64 JPEGs",
    image_size=SIZE,
    read=read,
    files=FILES,
    extracted=extracted,
    tuning_split=True,
)
