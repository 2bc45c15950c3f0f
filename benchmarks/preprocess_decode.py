"""Preprocess decode speed: what preprocess does with image files (stages.data.writer: parallel
decoding, blocks written straight into the .npy file) vs a single-process loop over
torchvision.datasets.ImageFolder decoding the same JPEGs with PIL into an array.

    python benchmarks/preprocess_decode.py [--images 6000] [--workers 0]
    python benchmarks/preprocess_decode.py --tree data/tiny-imagenet-200/train   # real files

Either writes --images 64x64 JPEGs (every fifth grayscale, like Tiny ImageNet's) to a temporary
ImageFolder tree, or takes an existing tree of 64x64 JPEGs (--tree: class folders, files at any
depth below them), decodes them both ways into (N, 64, 64, 3) uint8, checks the two arrays are
identical, and prints images/s of each and the ratio. Figures go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stages/
from stages.data.images import available_cores  # noqa: E402
from stages.data.writer import ProcessedWriter  # noqa: E402


def make_jpegs(root: Path, n: int, classes: int = 20, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(exist_ok=True)
        # Smooth gradients + noise: JPEG sizes like real photos (~2 KB), not pure noise.
        base = np.linspace(0, 255, 64)[None, :, None] * rng.random(3)  # (1, 64, 3)
        pixels = np.clip(base + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels).convert("L") if i % 5 == 0 else Image.fromarray(pixels)
        path = folder / f"{i:06d}.JPEG"
        img.save(path, quality=90)
        files.append(path)
    return files


def reference(root: Path) -> tuple[np.ndarray, float]:
    """The usual way: ImageFolder + PIL (its default loader), one process, stacked at the end."""
    from torchvision.datasets import ImageFolder

    start = time.perf_counter()
    dataset = ImageFolder(str(root))
    out = np.empty((len(dataset), 64, 64, 3), dtype=np.uint8)
    for i in range(len(dataset)):
        img, _ = dataset[i]
        out[i] = np.asarray(img)
    return out, time.perf_counter() - start


def ours(files: list[Path], workers: int, folder: Path) -> tuple[np.ndarray, float]:
    """The preprocess stage's path: decode in parallel, write blocks into train_images.npy."""
    start = time.perf_counter()
    ProcessedWriter(folder, workers=workers).decode("train", files, None, 64)
    seconds = time.perf_counter() - start
    return np.load(folder / "train_images.npy"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--tree", type=Path, help="an existing ImageFolder tree of 64x64 JPEGs")
    parser.add_argument("--workers", type=int, default=0, help="0 = every available core")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.tree or Path(tmp) / "jpegs"
        if not args.tree:
            root.mkdir()
            make_jpegs(root, args.images)
        # ImageFolder's order: sorted classes, then the files below each, sorted.
        classes = sorted(d for d in root.iterdir() if d.is_dir())
        files = [f for c in classes for f in sorted(c.rglob("*.JPEG"))]
        reference(root)  # warm the page cache so both read from memory
        ref_s, ours_s = float("inf"), float("inf")
        for _ in range(args.repeats):
            ref, t = reference(root)
            ref_s = min(ref_s, t)
            mine, t = ours(files, args.workers, Path(tmp))
            ours_s = min(ours_s, t)
        assert np.array_equal(ref, mine), "decoders disagree"
    n = len(files)
    workers = args.workers or available_cores()
    print(f"images: {n} 64x64 JPEGs from {root}, cores: {available_cores()}, workers: {workers}")
    print(f"ImageFolder + PIL, 1 process   : {n / ref_s:9.0f} images/s ({ref_s:.2f} s)")
    print(f"preprocess's writer, {workers} workers: {n / ours_s:9.0f} images/s ({ours_s:.2f} s)")
    print(f"ratio: {ref_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
