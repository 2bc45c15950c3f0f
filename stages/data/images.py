"""Reading image files: `read_image`, the one reader of a single file, and `decode_blocks`, many
files into packed uint8 blocks, in parallel over the available cores.

`read_image` is how an image file of any size and mode becomes a stored-size array: preprocess
uses it for your own image folders (`decode_blocks(..., fit=True)`), `predict` and `submit` for
the files they classify, and the served MLflow model for files sent as bytes (`decode_image`,
the same steps from the file's bytes), so the model sees the same pixels in training and
afterwards.

decode_blocks is how preprocess decodes many files (Tiny ImageNet's 120,000 JPEGs, your own image
folders): worker processes each decode a chunk of files and send back one (n, size, size, 3)
block, which preprocess writes straight into its output file (stages.data.writer), so memory
holds a few chunks in flight whatever the number of files.

Complete JPEGs that need no resizing (Tiny ImageNet) go through torchvision.io.decode_jpeg, a
whole chunk per call: the same libjpeg-turbo as PIL, identical pixels (checked by the tests and
the benchmark), about 3x faster per image here because it skips PIL's per-image Python work.
Everything else (PNG, WebP, resizing, and any file the fast path rejects) goes through PIL
(`read_image` when fitting), which also names the reason a file cannot be decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.core.errors import PipelineError, held

CHUNK = 256  # files per task: large enough to amortise IPC, small enough for a smooth bar
# The most pixels a file may decode to (after a JPEG's reduced-scale decoding): Pillow's
# decompression-bomb limit (about 9,500 x 9,500), which Pillow itself only warns about up to
# twice that. Decoding is the one cost that grows with the file; everything after it is bounded
# by the centre square the result is cut from (see `_region`).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
Box = tuple[float, float, float, float]  # left, top, right, bottom, in source pixels


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class ImageFileError(PipelineError):
    """A file that is missing, a directory, or not an image PIL can read."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable although __init__ takes two arguments
        return type(self), (self.path, self.reason)


def _region(img: Image.Image, size: int) -> tuple[Image.Image, Box | None]:
    """The part of `img` its size x size result is made from, and where in that part the result
    lies (None: the part is the result already, no resize needed).

    The result is the centre square of the image resized so its short side is `size`. Resizing
    the whole image first costs its long side times `size`, whatever the file's size: a 2.4 KB
    PNG of 1 x 600,000 pixels became a 64 x 38,400,000 image on the way (12 GB). Only the
    centre square, with the pixels the bicubic filter reads beyond its edges, is kept, so the
    conversion and the resize after it cost at most the square's pixels, and the result's pixels
    are those of resizing the whole image, then cropping.
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + size, top + size)), None
    sx, sy = w / nw, h / nh  # source pixels per result pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    # Bicubic reads 2 result pixels (at least 2 source pixels) either side; one more for rounding.
    mx, my = 2 * max(sx, 1.0) + 1, 2 * max(sy, 1.0) + 1
    x0, y0 = max(0, math.floor(box[0] - mx)), max(0, math.floor(box[1] - my))
    x1, y1 = min(w, math.ceil(box[2] + mx)), min(h, math.ceil(box[3] + my))
    inside = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    if (x0, y0, x1, y1) == (0, 0, w, h):  # all of it (a square image): a crop would copy it
        return img, inside
    return img.crop((x0, y0, x1, y1)), inside


# Modes Pillow gives 16-bit greyscale files (PNG, TIFF): "I;16*" or, from older Pillow or
# other formats, "I" (32-bit integers holding 0-65535).
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _rgb(img: Image.Image) -> Image.Image:
    """Any mode (grey, 16-bit grey, palette, CMYK, with or without transparency) as RGB.

    Consumes `img`: an image as large as MAX_PIXELS is never copied without need (`img` itself
    when it is RGB already) and each step closes the image it was made from, so at most three
    are held at once (a transparent one, while it is composited on white)."""
    if img.mode in _WIDE_GREY:
        # convert("RGB") clips 16-bit values at 255 (a scan turns white): scale them to 8 bits
        # instead, rounding to nearest: v * 255 / 65535 (in place, in 32 bits).
        wide = np.asarray(img).astype(np.int32)  # (H, W)
        img.close()
        np.clip(wide, 0, 65535, out=wide)
        wide *= 255
        wide += 32767
        wide //= 65535
        img = Image.fromarray(wide.astype(np.uint8), "L")
        del wide
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels go on white, not on whatever colour they happen to hold.
        rgba = img
        if img.mode != "RGBA":
            rgba = img.convert("RGBA")
            img.close()
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        rgba.close()
    if img.mode == "RGB":
        return img
    rgb = img.convert("RGB")
    img.close()
    return rgb


class _FirstFrame:
    """Whether this process said yet that files of several frames are read as their first."""

    said = False


def _note_first_frame(path: str | Path, frames: int) -> None:
    # Once, not once per file: a folder of GIFs would bury everything else in notes.
    if not _FirstFrame.said:
        _FirstFrame.said = True
        print(
            f"{path}: holds {frames} frames (an animation, or pages); the first is used, here"
            " and in every other such file",
            file=sys.stderr,
            flush=True,
        )


def _open(path: str | Path, data: bytes, size: int, fit: bool) -> Image.Image:
    """The file's bytes opened, its header read and nothing decoded yet: ImageFileError if it
    would decode to another size than size x size (not `fit`) or to more than MAX_PIXELS. When
    fitting, a JPEG is set to decode at a reduced scale that still covers `size`."""
    img = Image.open(io.BytesIO(data))
    if not fit and img.size != (size, size):  # said before decoding a single pixel
        raise ImageFileError(path, f"is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    if fit:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg downscale big photos cheaply
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageFileError(
            path, f"is {w:,} x {h:,} pixels, more than the {MAX_PIXELS:,} an image may"
            " decode to (Pillow's decompression-bomb limit); make it smaller"
        )  # fmt: skip
    return img


def _pixels(path: str | Path, data: bytes, size: int, fit: bool) -> np.ndarray:
    """The file's bytes -> (size, size, 3) uint8 (see `_decode`)."""
    with _open(path, data, size, fit) as img:
        frames = getattr(img, "n_frames", 1)  # opened at frame 0, the first one
        if frames > 1:
            _note_first_frame(path, frames)
        if not fit:
            return np.array(_rgb(img), dtype=np.uint8)  # (size, size, 3), writable
        # Phone photos store rotation in EXIF. In place: no copy of a possibly huge image.
        ImageOps.exif_transpose(img, in_place=True)
        part, box = _region(img, size)  # the centre square, before any whole-image work
        if part is not img:
            img.close()  # the whole decoded image is not needed past its centre square
        part = _rgb(part)
        if box is not None:
            part = part.resize((size, size), Image.BICUBIC, box, reducing_gap=3.0)
        return np.array(part, dtype=np.uint8)  # (size, size, 3), writable


def _decode(path: str | Path, size: int, fit: bool) -> np.ndarray:
    """One file -> (size, size, 3) uint8, or ImageFileError naming the file and the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageFileError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageFileError(path, "is a directory, not an image") from None
    except OSError as err:
        raise ImageFileError(path, f"cannot be read ({err.strerror or err})") from None
    return _decode_data(data, path, size, fit)


def _decode_data(data: bytes, path: str | Path, size: int, fit: bool) -> np.ndarray:
    """A file's bytes -> (size, size, 3) uint8; `path` names it in the ImageFileError."""
    with _reading(path):
        return _pixels(path, data, size, fit)


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """Whatever PIL raises while reading the file, as an ImageFileError naming `path`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns of sizes past MAX_PIXELS when it reads a header (a frame's too); a big
            # JPEG is then decoded at a fraction of that: `_open` checks the size it decodes.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageFileError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO, not the file
        raise ImageFileError(path, "not an image file PIL can read") from None
    except Exception as err:  # any decoder failure (truncated, corrupt...) is the file's fault
        raise ImageFileError(path, f"{type(err).__name__}: {err}") from None


def read_image(path: str | Path, size: int) -> np.ndarray:
    """The image file at `path` as (size, size, 3) uint8, exactly as preprocess stores it.

    The one reader of image files of any size and mode: preprocess (`folder` datasets, through
    decode_blocks with fit=True), `predict` and `submit` all go through it, so a file reaches the
    model with the same pixels in training and afterwards. JPEGs are decoded at a reduced scale
    when that still covers `size` (libjpeg's draft mode), the EXIF orientation is applied,
    transparency is composited on white, grey/palette/CMYK become RGB (16-bit grey scaled to 8
    bits, not clipped), a file of several frames (GIF, WebP, APNG animation; multi-page TIFF)
    gives its first (said once per run), then the short side is resized to `size` (bicubic)
    and the centre square cropped. What a file may cost is bounded by what it becomes, not by
    its size: it decodes to at most MAX_PIXELS, and only the centre square the result is cut
    from is converted and resized (`_region`). A missing file, a directory, a file over that
    bound or one PIL cannot decode raises ImageFileError with a one-line message naming the path.
    """
    return _decode(path, size, fit=True)


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """An image file's bytes (JPEG, PNG, ... as uploaded) as (size, size, 3) uint8: exactly what
    `read_image` makes of the same file, for callers that hold the bytes, not a path (the
    served MLflow model). ImageFileError names the image by `name`."""
    return _decode_data(bytes(data), name, size, fit=True)


def decoded_pixels(data: bytes, size: int, name: str = "image") -> int:
    """How many pixels `decode_image(data, size)` decodes the file to, read from its header
    (nothing is decoded, a JPEG's reduced scale counted): what decoding it will hold, known
    before it is paid. ImageFileError, as decode_image's, for a file it refuses unread."""
    with _reading(name), _open(name, bytes(data), size, fit=True) as img:
        return img.size[0] * img.size[1]


def _fast_jpegs(files: Sequence[str], size: int) -> np.ndarray | None:
    """Decode a chunk of JPEGs in one torchvision call, or None to fall back to PIL."""
    if not all(f.lower().endswith((".jpeg", ".jpg")) for f in files):
        return None
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    datas = []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        # libjpeg only warns about a missing end marker (and fills grey); PIL raises instead.
        if not (data.startswith(b"\xff\xd8") and data.rstrip(b"\x00").endswith(b"\xff\xd9")):
            return None
        datas.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB)  # list of (3, h, w)
    except RuntimeError:
        return None
    if any(tuple(im.shape) != (3, size, size) for im in images):
        return None
    return torch.stack(images).permute(0, 2, 3, 1).numpy()  # (n, size, size, 3)


def _decode_chunk(
    task: tuple[int, Sequence[str], int, bool],
) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    start, files, size, fit = task
    bad: list[tuple[int, str]] = []
    fast = None if fit else _fast_jpegs(files, size)
    if fast is not None:
        return start, fast, bad
    block = np.zeros((len(files), size, size, 3), dtype=np.uint8)  # (n, size, size, 3)
    for i, path in enumerate(files):
        try:
            # fit: the very reader `predict` uses. Otherwise the file must already be the size.
            block[i] = read_image(path, size) if fit else _decode(path, size, fit=False)
        except ImageFileError as err:  # reported by path, never dropped
            bad.append((start + i, err.reason))
    return start, block, bad


def _worker_init() -> None:
    # The workers are forked from the CLI, whose SIGINT/SIGTERM handler raises Interrupted: in a
    # worker that printed a traceback when the pool was shut down (terminate sends SIGTERM).
    # SIGTERM ends a worker quietly; Ctrl-C reaches the whole process group, and the parent
    # alone handles it, stopping the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by _start_pool
    # One thread per worker process: the processes are the parallelism.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


Block = tuple[int, np.ndarray, list[tuple[int, str]]]  # (first index, images, [(index, why)])


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _start_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of `workers` decoding processes, started so that no Ctrl-C is lost: a signal
    handled inside fork's own hooks (CPython runs them) has its exception printed and dropped,
    so the parent finished as if never interrupted. The handler is held while forking, and the
    signals blocked, so a worker takes them only once `_worker_init` has set its own handlers."""
    # fork (Linux) starts workers in milliseconds; elsewhere fork is unsafe, so spawn.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = None
    try:
        with held():
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pool = ctx.Pool(workers, initializer=_worker_init)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException:  # Ctrl-C while starting: raised here, once the pool exists
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    return pool


def decode_blocks(
    files: Sequence[str | Path], size: int, *, fit: bool = False, workers: int = 0,
    desc: str = "decode",
) -> Iterator[Block]:  # fmt: skip
    """Decode `files` with `workers` processes (0 = all cores), a chunk at a time, in any order:
    yields (start, images (n, size, size, 3) uint8, bad) where images[i] is files[start + i] and
    `bad` lists (index, reason) for the files that could not be decoded (their rows are zeros).
    A progress bar with its ETA shows on a terminal."""
    from tqdm import tqdm

    with contextlib.suppress(ImportError):
        import torchvision.io  # noqa: F401  (imported once here, inherited by forked workers)

    names = [str(f) for f in files]
    tasks = [(s, names[s : s + CHUNK], size, fit) for s in range(0, len(names), CHUNK)]
    workers = min(workers or available_cores(), len(tasks))
    with tqdm(total=len(names), desc=desc, unit="img", disable=None) as bar:
        if workers <= 1:
            for task in tasks:
                block = _decode_chunk(task)
                bar.update(len(block[1]))
                yield block
            return
        pool = _start_pool(workers)
        try:
            for block in pool.imap_unordered(_decode_chunk, tasks):
                bar.update(len(block[1]))
                yield block
        except BaseException:  # an error, an interrupt, or the caller stopped reading
            pool.terminate()
            pool.join()
            raise
        pool.close()  # every task done: the workers exit on their own
        pool.join()
