"""Peak memory of a Tiny-ImageNet-size preprocess against the size of the arrays it writes.

    python benchmarks/preprocess_memory.py [--per-class 500] [--val 10000] [--test 10000]

Fabricates the official layout (200 wnids, words.txt, train/<wnid>/images/*.JPEG with
<wnid>_boxes.txt, val/images + val_annotations.txt, test/images; every 50th JPEG grayscale) in a
temporary folder, runs `python -m stages preprocess -S dataset=tiny-imagenet` there as a child
process, and prints the child's peak resident memory (ru_maxrss, what `/usr/bin/time -v`
reports) next to the bytes of the .npy arrays it wrote. The goal is a peak of at most 1.2x the
arrays on the official size, and a peak that does not grow with the dataset (--per-class 1500
makes a set three times as large).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def fabricate(dest: Path, per_class: int, n_val: int, n_test: int) -> int:
    rng = np.random.default_rng(0)
    wnids = [f"n{1000000 + 7919 * i:08d}" for i in range(200)]
    count = 0

    def jpeg(path: Path) -> None:
        nonlocal count
        count += 1
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, photo-sized JPEGs
        pixels = np.asarray(Image.fromarray(small).resize((64, 64), Image.BILINEAR))
        img = Image.fromarray(pixels[..., 0] if count % 50 == 0 else pixels)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())

    dest.mkdir(parents=True)
    (dest / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (dest / "words.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate(wnids)))
    for w in wnids:
        folder = dest / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            jpeg(folder / f"{w}_{i}.JPEG")
        boxes = "".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class))
        (dest / "train" / w / f"{w}_boxes.txt").write_text(boxes)
    (dest / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(n_val):
        jpeg(dest / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 200]}\t0\t0\t63\t63\n")
    (dest / "val" / "val_annotations.txt").write_text("".join(lines))
    (dest / "test" / "images").mkdir(parents=True)
    for i in range(n_test):
        jpeg(dest / "test" / "images" / f"test_{i}.JPEG")
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=500, help="train images per class")
    ap.add_argument("--val", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        n = fabricate(
            root / "out" / "raw" / "tiny-imagenet-200", args.per_class, args.val, args.test
        )
        print(f"fabricated {n:,} JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        env = os.environ | {"PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "stages", "preprocess", "-S", "dataset=tiny-imagenet"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=root, env=env, check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        arrays = sum(f.stat().st_size for f in (root / "out" / "processed").glob("*.npy"))
    print(f"preprocess: {seconds:.0f} s, {n / seconds:,.0f} images/s")
    print(f"arrays written: {arrays / GiB:.2f} GiB; peak RSS {peak / GiB:.2f} GiB;"
          f" ratio {peak / arrays:.2f}x (goal <= 1.2x)")  # fmt: skip


if __name__ == "__main__":
    main()
