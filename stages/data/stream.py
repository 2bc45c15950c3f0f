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

import contextlib
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

# One step of the loop: the images to gather from ((N or B), H, W, 3) uint8 on the device, this
# rank's batch as indices into them (None: all of them, in order), and its labels (B,).
Step = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]

AHEAD = 2  # batches read ahead by the streaming thread


class Resident:
    """The training images and labels, whole, on the device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        self.images = torch.from_numpy(np.array(images)).to(device)  # (N, H, W, 3)
        self.labels = torch.from_numpy(np.asarray(labels)).to(device)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def steps(self, order: torch.Tensor, batch: int, count: int, part: slice) -> Iterator[Step]:
        """`count` steps of global batches of `batch` from `order`; this rank's `part` of each."""
        for step in range(count):
            idx = order[step * batch : (step + 1) * batch][part]  # (B,)
            yield self.images, idx, self.labels[idx]


READER = "stream-reader"  # the reading thread's name


class Streamed:
    """The training images read from their memory-mapped `.npy` file a batch at a time."""

    def __init__(self, images: np.memmap, labels: np.ndarray, device: torch.device) -> None:
        self.path, self.offset, self.shape = images.filename, images.offset, images.shape
        self.row = int(np.prod(self.shape[1:]))  # bytes per image
        self.labels = torch.from_numpy(np.asarray(labels)).to(device)  # (N,)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def steps(self, order: torch.Tensor, batch: int, count: int, part: slice) -> Iterator[Step]:
        """As Resident.steps, each step's images read only for this rank's part, one step
        ahead, by a background thread."""
        indices = order.cpu().numpy()  # one sync an epoch: the reader thread needs them
        batches: queue.Queue = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read, args=(indices, batch, count, part, batches, stop), daemon=True,
            name=READER,
        )  # fmt: skip
        reader.start()
        try:
            ahead = self._to_device(batches.get())
            for step in range(count):
                images = ahead
                if step + 1 < count:
                    ahead = self._to_device(batches.get())  # the next copy starts now
                idx = order[step * batch : (step + 1) * batch][part]
                yield images, None, self.labels[idx]
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    batches.get_nowait()
                reader.join(timeout=0.05)

    def _to_device(self, item: torch.Tensor | BaseException) -> torch.Tensor:
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, non_blocking=True)

    def _read(
        self, indices: np.ndarray, batch: int, count: int, part: slice, out: queue.Queue,
        stop: threading.Event,
    ) -> None:  # fmt: skip
        pin = self.device.type == "cuda"  # pinned: the copy to the GPU runs asynchronously
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for step in range(count):
                if stop.is_set():
                    return
                rows = indices[step * batch : (step + 1) * batch][part]  # (B,)
                buffer = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8,
                                     pin_memory=pin)  # fmt: skip
                view = buffer.numpy()  # (B, H, W, 3), the buffer's memory
                for k in np.argsort(rows, kind="stable"):  # in file order: fewer seeks
                    position = self.offset + int(rows[k]) * self.row
                    if os.preadv(fd, [memoryview(view[k]).cast("B")], position) != self.row:
                        raise OSError(f"{self.path}: image {rows[k]} is cut short")
                out.put(buffer)
        except BaseException as err:  # handed to the training thread, which raises it
            out.put(err)
        finally:
            os.close(fd)
