"""Mini-batches from data already in memory: uint8 pixels (``InMemoryLoader``) or tensors
such as cached features (``TensorBatches``)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from edgeconv_runtime.preprocess import Preprocess

from ..data import Split

Indices = Callable[[int], torch.Tensor]  # epoch -> this rank's share (a DistributedSampler, under torchrun)


class _Batches:
    """The epoch order shared by both loaders: this rank's share, a seeded shuffle, or in order."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0
        self.indices: Optional[Indices] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices(self.epoch)
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        return torch.arange(self.n)

    def __len__(self) -> int:
        n = len(self.indices(self.epoch)) if self.indices is not None else self.n
        return math.ceil(n / self.batch_size)

    def batch_indices(self):
        order = self.order()
        for b in range(0, len(order), self.batch_size):
            yield order[b : b + self.batch_size]


class InMemoryLoader(_Batches):
    """Batches from uint8 pixels held in memory, normalised exactly as the runtime does.

    Without augmentation a batch is one gather and one fused scale/normalise, so the data
    path costs next to nothing beside the model. With augmentation each sample goes through
    torchvision.transforms.v2 on its uint8 tensor. ``indices`` lets a distributed sampler
    choose this rank's share.
    """

    def __init__(self, split: Split, pre: Preprocess, batch_size: int, shuffle: bool = False, seed: int = 0, augment: Optional[Callable] = None, channels_last: bool = False):
        super().__init__(len(split.labels), batch_size, shuffle, seed)
        # the split's own NHWC pixels, shared rather than copied (a read-only IDX array is copied once):
        # each batch is gathered and moved to NCHW on its own
        pixels = split.pixels if split.pixels.flags.writeable else split.pixels.copy()
        self.x = torch.from_numpy(pixels)
        self.y = torch.from_numpy(split.labels)
        self.augment = augment
        self.channels_last = channels_last
        self.scale = float(pre.scale)
        c = pre.channels
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, c, 1, 1) if any(pre.mean) else None
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(1, c, 1, 1) if any(s != 1 for s in pre.std) else None

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.to(torch.float32).mul_(self.scale)
        if self.mean is not None:
            x.sub_(self.mean)
        if self.std is not None:
            x.div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self):
        for ii in self.batch_indices():
            xb = self.x[ii].permute(0, 3, 1, 2).contiguous()
            if self.augment is not None:
                with one_thread():
                    xb = torch.stack([self.augment(img) for img in xb])
            yield self.normalize(xb), self.y[ii]


@contextlib.contextmanager
def one_thread():
    """Per-image augmentation on one intra-op thread: each op is too small to share, and two threads made
    it 16x slower on a busy 2-core machine (0.7 vs 11.5 ms a 28 px digit, 17 vs 216 ms a 300 px photo)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class TensorBatches(_Batches):
    """Mini-batches over tensors already in memory (cached features or activations)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0):
        super().__init__(len(y), batch_size, shuffle, seed)
        self.x, self.y = x, y

    def __iter__(self):
        for ii in self.batch_indices():
            yield self.x[ii], self.y[ii]
