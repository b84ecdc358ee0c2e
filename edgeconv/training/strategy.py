"""The contract between ``run.py`` and a strategy: what it gets (``Job``), what it returns (``StrategyResult``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as ddp
from ..data import Dataset
from .config import TrainConfig
from .loop import Fitted


@dataclass
class Job:
    """One training run, ready to go: the model is built, the run directory prepared."""

    cfg: TrainConfig
    dataset: Dataset
    model: nn.Module
    out: Path
    meta: dict  # what every saved checkpoint carries besides its epoch and validation figures
    loss_fn: nn.Module
    eval_loss: nn.Module
    ctx: ddp.DistContext = field(default_factory=ddp.DistContext)
    bf16: bool = False
    channels_last: bool = False
    state: Optional[dict] = None  # the resumable state of the run being continued
    shard_log: dict = field(default_factory=dict)  # epoch -> indices this rank trained on (torchrun)

    @property
    def eval_batch_size(self) -> int:
        return max(self.cfg.batch_size, 256)

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.ctx.is_main

    def save_best(self, epoch: int, val: dict, **extra) -> None:
        """The best weights so far into the run's checkpoint (rank 0 writes)."""
        if self.ctx.is_main:
            ckpt.save_checkpoint(self.out / ckpt.CHECKPOINT_NAME, self.model,
                                 {**self.meta, "epoch": epoch, **extra, "val_accuracy": val["accuracy"], "val_loss": val["loss"]})

    def load_best(self) -> None:
        """The checkpoint's weights back into the model, once rank 0 has finished writing it."""
        ddp.barrier(self.ctx)
        self.model.load_state_dict(ckpt.load_checkpoint(self.out / ckpt.CHECKPOINT_NAME)["state_dict"])

    def shard(self, loader, seed: int, record: bool = False):
        """Under torchrun each rank trains on its DistributedSampler share of every epoch
        (``record``: kept in ``shard_log`` for the run's shard files)."""
        if not self.ctx.enabled:
            return loader
        pick = ddp.shard_fn(self.ctx, len(self.dataset.train), seed)
        loader.indices = self._recorded(pick) if record else pick
        return loader

    def _recorded(self, pick):
        def indices(epoch: int):
            idx = pick(epoch)
            self.shard_log[str(epoch)] = idx.tolist()
            return idx

        return indices

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP averages the trainable part's gradients across ranks (frozen parameters are ignored)."""
        if not self.ctx.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def reduce(self):
        """Sums epoch figures over ranks under torchrun; None alone."""
        return (lambda vals: ddp.all_sum(self.ctx, vals)) if self.ctx.enabled else None


@dataclass
class StrategyResult(Fitted):
    """What a strategy hands back to ``run.py``. ``test``: figures a strategy computed itself on the
    best weights (transfer reuses cached features); None lets run.py evaluate the test split.
    ``stats``: the strategy's own figures for metrics.json (its ``transfer`` key)."""

    test: Optional[dict] = None
    stats: dict = field(default_factory=dict)
