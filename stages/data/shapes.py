"""The synthetic counting set: images of N non-overlapping filled circles, class = N.

The classic question of whether a convnet can count. Drawn from the seed alone, so the same
seed and options give identical bytes on every machine; no network, no files.
"""

from __future__ import annotations

import numpy as np

from stages.core.errors import PipelineError

GAP = 2  # pixels between circles: they never touch, even diagonally, so each is one component
TRIES = 200  # random placements per circle before the image is started again


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r**2  # (2r+1, 2r+1) bool


def _place(
    rng: np.random.Generator, n: int, size: int, r_min: int, r_max: int
) -> list[tuple[int, int, int]] | None:
    """n (y, x, r) circles inside the image, pairwise at least GAP pixels apart, or None."""
    circles: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _ in range(TRIES):
            r = int(rng.integers(r_min, r_max + 1))
            y, x = (int(v) for v in rng.integers(r, size - r, 2))
            if all((y - cy) ** 2 + (x - cx) ** 2 >= (r + cr + GAP) ** 2 for cy, cx, cr in circles):
                circles.append((y, x, r))
                break
        else:
            return None
    return circles


def counting_set(
    counts: range, per_class: int, size: int, r_min: int, r_max: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8 and labels (N,) int64, label = index of the count in
    `counts`. Each image: black background, circles of one random bright colour."""
    rng = np.random.default_rng(seed)
    disks = {r: _disk(r) for r in range(r_min, r_max + 1)}
    n = len(counts) * per_class
    images = np.zeros((n, size, size, 3), dtype=np.uint8)  # (N, size, size, 3)
    labels = np.repeat(np.arange(len(counts), dtype=np.int64), per_class)  # (N,)
    mask = np.zeros((size, size), dtype=bool)
    for i, label in enumerate(labels):
        for _ in range(20):
            circles = _place(rng, counts[label], size, r_min, r_max)
            if circles is not None:
                break
        else:
            raise PipelineError(
                f"preprocess.shapes: could not place {counts[label]} circles of radius up to"
                f" {r_max} in {size}x{size} images; lower max_count or max_radius, or raise"
                " preprocess.image_size"
            )
        mask[:] = False
        for y, x, r in circles:
            mask[y - r : y + r + 1, x - r : x + r + 1] |= disks[r]
        colour = rng.integers(128, 256, 3, dtype=np.uint8)  # (3,)
        images[i][mask] = colour
    return images, labels
