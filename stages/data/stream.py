"""Where each training step's images come from: resident on the device, or streamed from disk.

`Resident`: the whole uint8 training set (this rank's shard) sits on the training device, and a
step's crops are gathered from it by index, in the augmentation itself: nothing moves per step.

`Streamed`, for a set larger than the memory budget: a background thread reads each step's images
straight from the memory-mapped `.npy` file (one `pread` per image into a pinned buffer, in file
order for locality), and the batch is copied to the device one step ahead, so the copy and the
reading overlap the step before. The augmentation is the same batched device work. Both draw the
same batches from the same permutation, so a run streams or not without changing a single weight.

Reads go through `pread`, not through the memory map: a mapped page counts in the process's
resident memory once touched, so a streamed epoch would show the whole file as resident; read
pages sit in the page cache, which the kernel gives back as it needs.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# One step of the loop: the images to gather from (B or N, H, W, 3) uint8 on the device, the
# batch's indices into them (None: all of them, in order), and its labels (B,) on the device.
Step = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]

AHEAD = 2  # batches read ahead by the streaming thread


class Resident:
    """This rank's training images and labels, whole, on the device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, H, W, 3)
        self.labels = torch.from_numpy(np.asarray(labels)).to(device)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def steps(self, order: torch.Tensor, batch: int, count: int) -> Iterator[Step]:
        for step in range(count):
            idx = order[step * batch : (step + 1) * batch]
            yield self.images, idx, self.labels[idx]


class Streamed:
    """This rank's training images read from the `.npy` file a batch at a time."""

    def __init__(
        self, path: Path, rows: np.ndarray, labels: np.ndarray, device: torch.device
    ) -> None:
        header = np.load(path, mmap_mode="r")  # shape and where the data start; nothing read
        self.shape, self.offset = header.shape, header.offset
        del header
        self.row = int(np.prod(self.shape[1:]))  # bytes per image
        self.path, self.device = path, device
        self.rows = np.asarray(rows, dtype=np.int64)  # this rank's images: rows of the file
        self.labels = torch.from_numpy(np.asarray(labels)).to(device)  # (N,) of those rows

    def __len__(self) -> int:
        return len(self.rows)

    def steps(self, order: torch.Tensor, batch: int, count: int) -> Iterator[Step]:
        order_cpu = order.cpu().numpy()  # one sync an epoch: the reader thread needs it
        batches: queue.Queue = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read, args=(order_cpu, batch, count, batches, stop), daemon=True
        )
        reader.start()
        try:
            pending = self._to_device(batches.get())
            for step in range(count):
                images = pending
                if step + 1 < count:
                    pending = self._to_device(batches.get())  # next batch's copy starts now
                idx = order[step * batch : (step + 1) * batch]
                yield images, None, self.labels[idx]
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    batches.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.05)

    def _to_device(self, item: torch.Tensor | BaseException) -> torch.Tensor:
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, non_blocking=True)

    def _read(
        self, order: np.ndarray, batch: int, count: int, out: queue.Queue,
        stop: threading.Event,
    ) -> None:  # fmt: skip
        pin = self.device.type == "cuda"
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for step in range(count):
                if stop.is_set():
                    return
                positions = order[step * batch : (step + 1) * batch]
                buffer = torch.empty((len(positions), *self.shape[1:]), dtype=torch.uint8,
                                     pin_memory=pin)  # fmt: skip
                rows = buffer.numpy()  # (B, H, W, 3), shares the buffer's memory
                files = self.rows[positions]
                for k in np.argsort(files, kind="stable"):  # in file order: fewer seeks
                    got = os.preadv(fd, [memoryview(rows[k]).cast("B")],
                                    self.offset + int(files[k]) * self.row)  # fmt: skip
                    if got != self.row:
                        raise OSError(f"{self.path}: image {files[k]} is cut short")
                out.put(buffer)
        except BaseException as err:  # handed to the training thread, which raises it
            out.put(err)
        finally:
            os.close(fd)


def resident_bytes(images: np.ndarray, rows: np.ndarray) -> int:
    """Bytes this rank's training images take when resident."""
    return len(rows) * int(np.prod(images.shape[1:]))
