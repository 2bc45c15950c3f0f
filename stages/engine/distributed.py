"""DistributedDataParallel under torchrun: process group, data shards, metric reduction.

Without torchrun (no WORLD_SIZE in the environment) everything here is the one-process no-op,
so the training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
