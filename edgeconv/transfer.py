"""Transfer learning from pretrained backbones: feature extraction and fine-tuning.

The frozen part of a network is a fixed function, so it runs through ONNX Runtime (several
times faster than PyTorch eager on a CPU) while PyTorch trains only what changes: the new
head, and in fine-tuning the top blocks. The result is one ordinary checkpoint holding base
and head together, so export and runtime need not know how it was trained.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .augment import build_augmentation
from .train import InMemoryLoader, WeightAverage, evaluate, fit, make_optimizer, make_scheduler

log = logging.getLogger("edgeconv.transfer")

STRATEGIES = ("scratch", "feature-extract", "fine-tune")


class OrtFrozen:
    """A frozen torch module run by ONNX Runtime: exported once to a temp file, called on batches."""

    def __init__(self, module: nn.Module, input_shape: tuple, threads: Optional[int] = None):
        from edgeconv_export.onnx import export_onnx
        from edgeconv_runtime.backends.ort import OrtBackend

        self._tmp = tempfile.TemporaryDirectory(prefix="edgeconv-frozen-")
        path = Path(self._tmp.name) / "frozen.onnx"
        module.eval()
        export_onnx(module, input_shape, path)
        self.backend = OrtBackend(str(path), threads=threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.backend.infer(np.ascontiguousarray(x.numpy(), dtype=np.float32)))

    def over_split(self, split, pre, batch_size: int = 64) -> torch.Tensor:
        loader = InMemoryLoader(split, pre, batch_size)
        return torch.cat([self(x) for x, _ in loader])


class TensorBatches:
    """Mini-batches over tensors already in memory (cached features or activations)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle, self.seed, self.epoch = x, y, batch_size, shuffle, seed, 0
        self.indices = None  # a DistributedSampler share, under torchrun

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices(self.epoch)) if self.indices is not None else len(self.y)
        return math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.indices is not None:
            order = self.indices(self.epoch)
        elif self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(n)
        for b in range(0, len(order), self.batch_size):
            ii = order[b : b + self.batch_size]
            yield self.x[ii], self.y[ii]


def _freeze_batchnorm(model: nn.Module) -> None:
    """Batch-norm layers keep their ImageNet statistics (eval mode) while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_transfer(cfg, dataset, model: nn.Module, out: Path, meta: dict, loss_fn, eval_loss, ctx=None) -> dict:
    """Run ``cfg.strategy`` on a pretrained ``model``; returns fields for metrics.json and the fitted history.

    feature-extract: frozen base + new head. Without --augment the base runs once over the
    data and the head trains on cached features (the book's fast mode); with --augment the
    frozen base runs inside the loop on augmented images.
    fine-tune: phase 1 as feature-extract (``cfg.head_epochs``, augmented with --augment as in
    the book), then the top ``cfg.unfreeze``
    blocks train with the head at ``cfg.fine_tune_lr`` with batch-norm statistics frozen.
    """
    from . import distributed as ddp

    ctx = ctx or ddp.DistContext()
    pre = dataset.preprocess
    stats: dict = {}
    history: list = []
    reduce = (lambda vals: ddp.all_sum(ctx, vals)) if ctx.enabled else None

    def shard(loader, n, seed):
        """Under torchrun each rank trains on its DistributedSampler share of every epoch."""
        if ctx.enabled:
            loader.indices = ddp.shard_fn(ctx, n, seed)
        return loader

    def wrap(module):
        """DDP averages the trainable part's gradients across ranks (frozen parameters are ignored)."""
        if not ctx.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def load_best():
        ddp.barrier(ctx)  # rank 0 has finished writing the file
        model.load_state_dict(ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)["state_dict"])

    best_loss = [math.inf]

    def save(epoch, v, phase):
        if v["loss"] >= best_loss[0]:  # phase 2 only replaces the file when it beats phase 1's best
            return
        best_loss[0] = v["loss"]
        if not ctx.is_main:
            return
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT_NAME, model, {**meta, "epoch": epoch, "phase": phase, "val_accuracy": v["accuracy"], "val_loss": v["loss"]})

    # ---- the frozen base through ONNX Runtime, features cached once
    t0 = time.perf_counter()
    base = OrtFrozen(FeatureNet(model), pre.input_shape, cfg.threads)
    feats = {name: base.over_split(split, pre) for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)) if split is not None}
    stats["feature_seconds"] = round(time.perf_counter() - t0, 3)
    n_imgs = sum(len(f) for f in feats.values())
    stats["feature_images_per_second"] = round(n_imgs / stats["feature_seconds"], 1)
    labels = {name: torch.from_numpy(split.labels) for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)) if split is not None}

    head = lambda f: model._fc(model._dropout(f))  # noqa: E731
    train_fc = wrap(model._fc)
    train_head = lambda f: train_fc(model._dropout(f))  # noqa: E731

    def eval_head():
        return evaluate(model, TensorBatches(feats["val"], labels["val"], 256), eval_loss, forward=head)

    head_epochs = cfg.epochs if cfg.strategy == "feature-extract" else cfg.head_epochs
    head_params = list(model._fc.parameters())
    opt = make_optimizer(cfg.optimizer, head_params, cfg.lr, cfg.weight_decay)
    # fine-tune augments phase 1 too by default, as the book does; --no-head-augment trains the
    # head on cached features (seconds) and keeps augmentation for phase 2
    head_aug = cfg.strategy == "feature-extract" or cfg.head_augment
    augment = build_augmentation(cfg.augment_preset) if head_aug else None
    stats["head_augmented"] = augment is not None
    if augment is not None:
        loader = shard(InMemoryLoader(dataset.train, pre, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment), len(dataset.train), cfg.seed)
        forward = lambda x: train_head(base(x))  # noqa: E731
    else:
        loader = shard(TensorBatches(feats["train"], labels["train"], cfg.batch_size, shuffle=True, seed=cfg.seed), len(dataset.train), cfg.seed)
        forward = train_head
    sched = make_scheduler(cfg.lr_schedule, opt, head_epochs, len(loader))
    f1 = fit(forward, lambda: model._dropout.train(), opt, sched, loss_fn, loader, eval_head, head_epochs, cfg.patience,
             lambda e, v: save(e, v, "head"), None, cfg.progress and ctx.is_main, label="head epoch", reduce=reduce)
    history += [dict(h, phase="head") for h in f1.history]
    stats.update(train_seconds=f1.train_seconds, images_seen=f1.images_seen, interrupted=f1.interrupted, stopped_early=f1.stopped_early)
    best = dict(f1.best, phase="head")

    if cfg.strategy == "fine-tune" and not f1.interrupted:
        load_best()  # the best head
        prefix, suffix, trainable = model.split(cfg.unfreeze)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable + list(model._fc.parameters()):
            p.requires_grad_(True)
        t1 = time.perf_counter()
        frozen = OrtFrozen(prefix, pre.input_shape, cfg.threads)
        acts = {"val": frozen.over_split(dataset.val, pre)}
        if dataset.test is not None:
            acts["test"] = frozen.over_split(dataset.test, pre)
        aug = build_augmentation(cfg.augment_preset)
        if aug is not None:
            train_suffix = wrap(suffix)
            loader = shard(InMemoryLoader(dataset.train, pre, cfg.batch_size, shuffle=True, seed=cfg.seed + 1, augment=aug), len(dataset.train), cfg.seed + 1)
            forward = lambda x: train_suffix(frozen(x))  # noqa: E731
        else:
            acts["train"] = frozen.over_split(dataset.train, pre)
            loader = shard(TensorBatches(acts["train"], labels["train"], cfg.batch_size, shuffle=True, seed=cfg.seed + 1), len(dataset.train), cfg.seed + 1)
            forward = wrap(suffix)
        stats["prefix_seconds"] = round(time.perf_counter() - t1, 3)
        params = [p for p in model.parameters() if p.requires_grad]
        lr2 = cfg.fine_tune_lr if cfg.fine_tune_lr is not None else cfg.lr / 10
        opt2 = make_optimizer(cfg.optimizer, params, lr2, cfg.weight_decay)
        sched2 = make_scheduler(cfg.lr_schedule, opt2, cfg.epochs, len(loader))

        def set_train():
            model.train()
            _freeze_batchnorm(model)

        def eval_suffix():
            return evaluate(model, TensorBatches(acts["val"], labels["val"], 128), eval_loss, forward=suffix)

        start_val = eval_suffix()
        ema = WeightAverage(params, cfg.ema) if cfg.ema else None
        f2 = fit(forward, set_train, opt2, sched2, loss_fn, loader, eval_suffix, cfg.epochs, cfg.patience,
                 lambda e, v: save(e, v, "fine-tune"), None, cfg.progress and ctx.is_main, first_epoch=len(f1.history) + 1,
                 label="fine-tune epoch", reduce=reduce, ema=ema)
        if ema is not None:
            stats["ema_decay"] = cfg.ema
        history += [dict(h, phase="fine-tune") for h in f2.history]
        stats["train_seconds"] += f2.train_seconds
        stats["images_seen"] += f2.images_seen
        stats["interrupted"] = f2.interrupted
        stats["fine_tune_lr"] = lr2
        stats["unfrozen_blocks"] = cfg.unfreeze
        # the checkpoint holds whichever was best on validation loss: head-only or a fine-tuned epoch
        if f2.best["epoch"] and f2.best["val_loss"] < best["val_loss"]:
            best = dict(f2.best, phase="fine-tune")
        elif f2.best["epoch"]:
            log.warning("fine-tuning did not improve validation loss (%.4f vs %.4f); keeping the head-only model", f2.best["val_loss"], best["val_loss"])
        stats["fine_tune_start_val_accuracy"] = start_val["accuracy"]
    for p in model.parameters():
        p.requires_grad_(True)
    # test figures from the best weights, reusing the cached features/activations (the frozen
    # parts are unchanged by construction, so this equals running the whole network)
    load_best()
    model.eval()
    test = None
    if "test" in feats:
        with torch.no_grad():
            logits = suffix(acts["test"]) if best.get("phase") == "fine-tune" else head(feats["test"])
        y = labels["test"]
        test = {"loss": float(eval_loss(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean()), "n": int(len(y))}
    return {"history": history, "best": best, "test": test, **stats}


class FeatureNet(nn.Module):
    """The pretrained base alone: image -> pooled feature vector."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)
