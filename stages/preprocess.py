"""Stage 2, preprocess: decode the raw files once into packed arrays nothing downstream re-decodes.

Writes to out/processed/ (as a whole, atomically):
  {train,val}_images.npy  uint8 (N, H, W, 3)      {train,val}_labels.npy  int64 (N,)
  classes.json            readable class names     mean.npy  float32 (H, W, 3), 0-255 units
  mean.png                the mean image, enlarged info.json dataset, sizes, per-channel std
  test_images.npy, test_files.json  unlabelled official test images (Tiny ImageNet only),
                          kept apart from everything with labels
  skipped.txt             files that could not be decoded (only with skip_bad_images: true)
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split

from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import atomic_dir, write_json
from stages.data.images import Decoded, decode_files
from stages.data.processed import digest
from stages.data.shapes import counting_set
from stages.params import Params


class LayoutError(PipelineError):
    """The raw files are not laid out as the dataset should be; the message names the file."""


class BadImagesError(PipelineError):
    """Files that could not be decoded (and preprocess.skip_bad_images is false)."""


@dataclass
class Splits:
    """Decoded images of one dataset; `val_*` is None when the source has no official split."""

    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    classes: list[str]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    test_images: np.ndarray | None = None  # (M, H, W, 3) unlabelled official test set
    test_files: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # undecodable files left out
    wnids: list[str] | None = None  # Tiny ImageNet's class ids, in class order (for submit)


def pad_and_stack(images: np.ndarray, size: int = 32) -> np.ndarray:
    """MNIST-style grey (N, h, w) uint8 -> zero-pad centred to size x size -> (N, size, size, 3)."""
    n, h, w = images.shape
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=np.uint8)
    out[:, top : top + h, left : left + w] = images
    return np.repeat(out[..., None], 3, axis=-1)  # (N, size, size, 3)


def _read_digits(raw: Path, _: Params) -> Splits:
    with gzip.open(raw / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (1797, 65)
    pixels = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) * (255.0 / 16.0))
    # 8x8 -> 28x28 like MNIST's digit box, in one batched call.
    big = F.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False)
    grey = big.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()  # (N, 28, 28)
    return Splits(
        train_images=pad_and_stack(grey),
        train_labels=table[:, 64].astype(np.int64),
        classes=[str(d) for d in range(10)],
    )


def _require(path: Path, what: str = "file") -> Path:
    if not (path.is_file() if what == "file" else path.is_dir()):
        raise LayoutError(
            f"{path}: {what} missing; out/raw is not the expected layout (run the download"
            " stage for this dataset, or check the archive you placed in data/)"
        )
    return path


class _BadImages:
    """Collects undecodable files across splits; fails or skips per preprocess.skip_bad_images."""

    def __init__(self, p: Params) -> None:
        self.skip = p.preprocess.skip_bad_images
        self.bad: list[tuple[str, str]] = []

    def add(self, decoded: Decoded) -> Decoded:
        self.bad.extend(decoded.bad)
        return decoded

    def check(self) -> list[str]:
        for path, why in self.bad:
            print(f"preprocess: cannot decode {path}: {why}")
        if self.bad and not self.skip:
            shown = ", ".join(path for path, _ in self.bad[:10])
            more = f" and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
            raise BadImagesError(
                f"{len(self.bad)} file(s) could not be decoded: {shown}{more};"
                " fix or remove them, or set preprocess.skip_bad_images: true to skip them"
            )
        return [path for path, _ in self.bad]


def _read_tiny_imagenet(raw: Path, p: Params) -> Splits:
    root = _require(raw / "tiny-imagenet-200", "folder")
    wnids_file = _require(root / "wnids.txt")
    # Sorted wnids: the class order torchvision's ImageFolder would give the train folders.
    wnids = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    if not wnids:
        raise LayoutError(f"{wnids_file}: lists no classes")
    words_file = _require(root / "words.txt")
    words = {}
    for line in words_file.read_text().splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    missing = [w for w in wnids if not words.get(w)]
    if missing:
        raise LayoutError(f"{words_file}: no name for class {missing[0]} (from wnids.txt)")
    index = {w: i for i, w in enumerate(wnids)}

    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        folder = _require(root / "train" / w / "images", "folder")
        files = sorted(f for f in folder.iterdir() if f.is_file())
        if not files:
            raise LayoutError(f"{folder}: class folder is empty")
        train_files += files
        train_labels += [index[w]] * len(files)

    ann = _require(root / "val" / "val_annotations.txt")
    val_files: list[Path] = []
    val_labels: list[int] = []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, rest = line.partition("\t")
        wnid = rest.split("\t")[0].strip()
        if wnid not in index:
            raise LayoutError(f"{ann}:{n}: class {wnid!r} of {name} is not in wnids.txt")
        val_files.append(root / "val" / "images" / name)
        val_labels.append(index[wnid])
    if not val_files:
        raise LayoutError(f"{ann}: lists no images")
    test_dir = _require(root / "test" / "images", "folder")
    test_files = sorted(f for f in test_dir.iterdir() if f.is_file())

    bad = _BadImages(p)
    workers = p.preprocess.workers
    train = bad.add(decode_files(train_files, 64, workers=workers, desc="decode train"))
    val = bad.add(decode_files(val_files, 64, workers=workers, desc="decode val"))
    test = bad.add(decode_files(test_files, 64, workers=workers, desc="decode test"))
    skipped = bad.check()
    return Splits(
        train_images=train.images,
        train_labels=np.asarray(train_labels, dtype=np.int64)[train.kept],
        # "goldfish, Carassius auratus" -> "goldfish": short names for plots.
        classes=[words[w].split(",")[0].strip() for w in wnids],
        val_images=val.images,
        val_labels=np.asarray(val_labels, dtype=np.int64)[val.kept],
        test_images=test.images,
        test_files=[test_files[i].name for i in test.kept],
        skipped=skipped,
        wnids=wnids,
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(_require(path).read_bytes(), dtype=np.uint8)
    if data.size == 0 or data.size % 3073:
        raise LayoutError(f"{path}: {data.size} bytes is not a whole number of 3073-byte records")
    records = data.reshape(-1, 3073)  # label byte + 1024 R + 1024 G + 1024 B, row-major 32x32
    labels = records[:, 0].astype(np.int64)  # (n,)
    if labels.max() > 9:
        raise LayoutError(f"{path}: label {labels.max()} out of range 0-9")
    planes = records[:, 1:].reshape(-1, 3, 32, 32)  # (n, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels  # (n, 32, 32, 3)


def _read_cifar10(raw: Path, _: Params) -> Splits:
    root = _require(raw / "cifar-10-batches-bin", "folder")
    meta = _require(root / "batches.meta.txt")
    classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    if len(classes) != 10:
        raise LayoutError(f"{meta}: expected 10 class names, found {len(classes)}")
    train = [_read_cifar_batch(root / f"data_batch_{i}.bin") for i in range(1, 6)]
    val_images, val_labels = _read_cifar_batch(root / "test_batch.bin")
    return Splits(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        classes=classes,
        val_images=val_images,
        val_labels=val_labels,
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An MNIST idx file (gzip): big-endian magic, dims, then uint8 values."""
    try:
        with gzip.open(_require(path), "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise LayoutError(f"{path}: not a readable gzip file ({err})") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise LayoutError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LayoutError(f"{path}: {body.size} values, header says {dims}")
    return body.reshape(dims)


def _read_mnist(raw: Path, _: Params) -> Splits:
    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)  # (n, 28, 28)
        labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801)  # (n,)
        if len(images) != len(labels):
            raise LayoutError(f"{raw}/{prefix}-*: {len(images)} images but {len(labels)} labels")
        return pad_and_stack(images), labels.astype(np.int64)

    train_images, train_labels = split("train")
    val_images, val_labels = split("t10k")
    return Splits(
        train_images=train_images,
        train_labels=train_labels,
        classes=[str(d) for d in range(10)],
        val_images=val_images,
        val_labels=val_labels,
    )


def _image_suffixes() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _read_folder(raw: Path, p: Params) -> Splits:
    root = _require(raw / paths.FOLDER, "folder")
    suffixes = _image_suffixes()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for label, name in enumerate(classes):
        found = []
        for f in sorted((root / name).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
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
    bad = _BadImages(p)
    size = p.preprocess.image_size
    decoded = bad.add(
        decode_files(files, size, fit=True, workers=p.preprocess.workers, desc="decode")
    )
    skipped = bad.check()
    return Splits(
        train_images=decoded.images,
        train_labels=np.asarray(labels, dtype=np.int64)[decoded.kept],
        classes=classes,
        skipped=skipped,
    )


def _read_shapes(_: Path, p: Params) -> Splits:
    s = p.preprocess.shapes
    counts = range(s.min_count, s.max_count + 1)
    images, labels = counting_set(
        counts, s.per_class, p.preprocess.image_size, s.min_radius, s.max_radius, p.seed
    )
    return Splits(train_images=images, train_labels=labels, classes=[str(c) for c in counts])


READERS: dict[str, Callable[[Path, Params], Splits]] = {
    "digits": _read_digits,
    "tiny-imagenet": _read_tiny_imagenet,
    "cifar10": _read_cifar10,
    "mnist": _read_mnist,
    "folder": _read_folder,
    "shapes": _read_shapes,
}


def mean_image(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-pixel mean of (N, H, W, 3) uint8 as float32 (H, W, 3), summed in chunks (low memory)."""
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), chunk):
        total += images[start : start + chunk].sum(axis=0, dtype=np.float64)
    return (total / len(images)).astype(np.float32)


def channel_std(images: np.ndarray, chunk: int = 256) -> list[float]:
    """Per-channel standard deviation of (N, H, W, 3) uint8, in 0-255 units.

    Exact, from each channel's histogram of the 256 values. The only temporary is one chunk's
    channel as integers: a float copy of a chunk and its square (16 bytes per value) took
    0.75 GiB at Tiny ImageNet's size and pushed preprocessing past twice its arrays' memory.
    """
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, 3)  # (n * H * W, 3)
        for c in range(3):
            counts[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64)  # (256,)
    n = counts.sum(axis=1)  # (3,)
    mean = counts @ values / n  # (3,)
    var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / n  # (3,)
    return [float(v) for v in np.sqrt(np.maximum(var, 1e-12))]


def save_image(array: np.ndarray, path: Path, min_side: int = 256) -> None:
    """Write (H, W, 3) 0-255 values as a PNG, enlarged (nearest) so small images stay visible."""
    img = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    scale = max(1, min_side // max(img.size))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def preprocess(p: Params) -> Path:
    """Decode out/raw/ into out/processed/ and return that folder."""
    splits = READERS[p.dataset](paths.RAW, p)
    if splits.val_images is None:
        idx = np.arange(len(splits.train_labels))
        try:
            train_idx, val_idx = train_test_split(
                idx,
                test_size=p.preprocess.val_fraction,
                stratify=splits.train_labels,
                random_state=p.seed,
            )
        except ValueError as err:  # a class too small to appear in both splits
            raise PipelineError(
                f"{p.dataset}: cannot split off preprocess.val_fraction="
                f"{p.preprocess.val_fraction} per class ({err}); add images to small classes"
            ) from None
        splits.val_images = splits.train_images[val_idx]
        splits.val_labels = splits.train_labels[val_idx]
        splits.train_images = splits.train_images[train_idx]
        splits.train_labels = splits.train_labels[train_idx]

    mean = mean_image(splits.train_images)
    arrays = (splits.train_images, splits.val_images, splits.test_images)
    need = sum(a.nbytes for a in arrays if a is not None)  # the rest is small
    with atomic_dir(paths.PROCESSED, need=need) as out:
        for split in ("train", "val"):
            np.save(out / f"{split}_images.npy", getattr(splits, f"{split}_images"))
            np.save(out / f"{split}_labels.npy", getattr(splits, f"{split}_labels"))
        if splits.test_images is not None:
            # Unlabelled: never mixed with train/val; for a challenge-style predictions file.
            np.save(out / "test_images.npy", splits.test_images)
            write_json(out / "test_files.json", splits.test_files)
        if splits.skipped:
            (out / "skipped.txt").write_text("".join(f"{f}\n" for f in splits.skipped))
        np.save(out / "mean.npy", mean)
        save_image(mean, out / "mean.png")
        write_json(out / "classes.json", splits.classes)
        write_json(
            out / "info.json",
            {
                "dataset": p.dataset,
                "params": p.preprocess_inputs(),  # checked by every stage that loads the data
                "image_size": int(splits.train_images.shape[1]),
                "num_classes": len(splits.classes),
                "train_count": len(splits.train_labels),
                "val_count": len(splits.val_labels),
                "test_count": 0 if splits.test_images is None else len(splits.test_images),
                "skipped_images": len(splits.skipped),  # undecodable files left out
                "digests": {  # the MLflow dataset inputs' digests
                    "train": digest(splits.train_images, splits.train_labels),
                    "val": digest(splits.val_images, splits.val_labels),
                },
                **({"wnids": splits.wnids} if splits.wnids else {}),
                "std": channel_std(splits.train_images),
            },
        )
    print(
        f"preprocess: {p.dataset}: {len(splits.train_labels)} train + {len(splits.val_labels)} val"
        f" images of {splits.train_images.shape[1]}px, {len(splits.classes)} classes"
        + (f", {len(splits.skipped)} undecodable files skipped" if splits.skipped else "")
    )
    return paths.PROCESSED
