"""DDP through torchrun: PyTorch's own process groups, nothing home-made.

``torchrun --nproc-per-node N -m edgeconv train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we
join the group (NCCL on GPUs, gloo on CPU), shard each epoch with DistributedSampler,
let DDP average gradients, sum metrics across ranks, and let rank 0 alone write files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, backend)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_sum(ctx: DistContext, values: list) -> list:
    """Sum a few floats over all ranks (epoch loss sums, correct counts, sample counts)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shard_fn(ctx: DistContext, n: int, seed: int):
    """Per-epoch indices of this rank's share: DistributedSampler with the epoch as its seed offset."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False)

    def indices(epoch: int) -> torch.Tensor:
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    return indices


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
