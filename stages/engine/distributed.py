"""DistributedDataParallel under torchrun: process group, data shards, metric reduction.

Without torchrun (no WORLD_SIZE in the environment) everything here is the one-process no-op,
so the training loop has a single code path. The same holds on one machine or several: torchrun
sets RANK (global), LOCAL_RANK (the process's place, and GPU, on its node) and the rendezvous
(MASTER_ADDR/PORT) for `env://` initialisation, whichever node a process runs on.

Training samples as one process would: every rank draws the same permutation of the whole
training set from the same seed and takes its `part` of each global batch (augmentation draws
included, see stages.data.augment), so N ranks end with the weights one process reaches with
the same global batch, up to the order in which the gradient all-reduce adds their shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's share of n items (every world-th one), all shards within one item."""
        return slice(self.rank, n, self.world)

    def part(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n; ranks in order cover it once,
        all shares within one item (equal when world divides n, as the loop's full batches)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def cleanup(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Sum a float tensor over ranks (identity in one process)."""
    if d.world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def from_main(d: Dist, value: T) -> T:
    """Rank 0's `value` on every rank (pickled): what only rank 0's files can tell, such as the
    run to resume, when out/ is not shared between nodes."""
    if d.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, d: Dist, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """DDP-wrap `model` (after optional SyncBatchNorm conversion) when there are several ranks."""
    if d.world == 1:
        return model
    if sync_batchnorm and device.type != "cuda":
        if d.main:
            print("train: sync_batchnorm skipped: SyncBatchNorm runs on GPUs only")
    elif sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
