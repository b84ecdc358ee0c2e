"""Transfer learning from pretrained backbones: feature extraction and fine-tuning.

The frozen part of a network is a fixed function, so it runs through ONNX Runtime (several
times faster than PyTorch eager on a CPU) while PyTorch trains only what changes: the new
head, and in fine-tuning the top blocks. The result is one ordinary checkpoint holding base
and head together, so export and runtime need not know how it was trained. The backbone is
reached only through its head/base interface: ``forward_features``, ``forward_head``,
``get_classifier``, ``train_head`` and ``split``.
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

from ..augment import build_augmentation
from .loaders import InMemoryLoader, TensorBatches
from .loop import Fitted, Hooks, Plan, Step, WeightAverage, evaluate, fit, make_optimizer, make_scheduler
from .rundir import write_history
from .strategy import Job, StrategyResult

log = logging.getLogger("edgeconv.transfer")

# images per ONNX Runtime call: its arena keeps what the largest call needed (EfficientNet-Lite0's base at
# 300 px: +1.28 GB at 64 images, +0.31 GB at 16), at the same speed per image on a CPU
FROZEN_BATCH = 16


class OrtFrozen:
    """A frozen torch module run by ONNX Runtime: exported once to a temp file, called on batches."""

    def __init__(self, module: nn.Module, input_shape: tuple, threads: Optional[int] = None):
        from edgeconv_export.onnx import export_onnx
        from edgeconv_runtime.backends.ort import OrtBackend

        self._tmp = tempfile.TemporaryDirectory(prefix="edgeconv-frozen-")
        path = Path(self._tmp.name) / "frozen.onnx"
        module.eval()
        export_onnx(module, input_shape, path)
        # no arena: between its runs the session gives its buffers back for PyTorch's training step
        # (phase 2 of the fine-tune recipe peaked 0.31 GB lower, at the same speed)
        self.backend = OrtBackend(str(path), threads=threads, arena=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        return torch.from_numpy(np.concatenate([self.backend.infer(x[i : i + FROZEN_BATCH]) for i in range(0, len(x), FROZEN_BATCH)]))

    def over_split(self, split, pre) -> torch.Tensor:
        return torch.cat([self(x) for x, _ in InMemoryLoader(split, pre, FROZEN_BATCH)])

    def close(self) -> None:
        """Release the session (and its arena) and the temp file, before another session starts."""
        self.backend.close()
        self._tmp.cleanup()


class FeatureNet(nn.Module):
    """The pretrained base alone: image -> pooled feature vector."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def freeze_batchnorm(model: nn.Module) -> None:
    """Batch-norm layers keep their ImageNet statistics (eval mode) while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_transfer(job: Job) -> StrategyResult:
    """Run ``job.cfg.strategy`` on a pretrained model.

    feature-extract: frozen base + new head. Without --augment the base runs once over the
    data and the head trains on cached features (the book's fast mode); with --augment the
    frozen base runs inside the loop on augmented images.
    fine-tune: phase 1 as feature-extract (``cfg.head_epochs``, augmented with --augment as in
    the book), then the top ``cfg.unfreeze`` blocks train with the head at ``cfg.fine_tune_lr``
    with batch-norm statistics frozen.
    """
    run = _Transfer(job)
    result = run.head_phase()
    if job.cfg.strategy == "fine-tune" and not result.interrupted:
        run.fine_tune_phase(result)
    for p in job.model.parameters():
        p.requires_grad_(True)
    # test figures from the best weights, reusing the cached features/activations (the frozen
    # parts are unchanged by construction, so this equals running the whole network)
    job.load_best()
    job.model.eval()
    result.test = run.score_test(result.best)
    if job.ctx.is_main:
        write_history(job.out, result.history)
    return result


def _splits(dataset) -> list:
    return [(name, split) for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)) if split is not None]


class _Transfer:
    """One transfer run: the frozen base's cached features, the phases, the best validation loss."""

    def __init__(self, job: Job):
        self.job, self.cfg, self.model, self.pre = job, job.cfg, job.model, job.dataset.preprocess
        self.stats: dict = {}
        self.best_loss = math.inf
        self.acts: dict = {}  # fine-tune: the frozen prefix's activations
        self.suffix: Optional[nn.Module] = None
        # the frozen base through ONNX Runtime, features cached once
        t0 = time.perf_counter()
        self.base = OrtFrozen(FeatureNet(self.model), self.pre.input_shape, self.cfg.threads)
        self.feats = {name: self.base.over_split(split, self.pre) for name, split in _splits(job.dataset)}
        self.stats["feature_seconds"] = round(time.perf_counter() - t0, 3)
        self.stats["feature_images_per_second"] = round(sum(len(f) for f in self.feats.values()) / self.stats["feature_seconds"], 1)
        self.labels = {name: torch.from_numpy(split.labels) for name, split in _splits(job.dataset)}

    def saver(self, phase: str):
        """on_improve for a phase: phase 2 only replaces the file when it beats phase 1's best."""

        def on_improve(epoch: int, v: dict) -> None:
            if v["loss"] >= self.best_loss:
                return
            self.best_loss = v["loss"]
            self.job.save_best(epoch, v, phase=phase)

        return on_improve

    def _train_loader(self, augment, cached: torch.Tensor, seed: int):
        """Augmented images (the frozen part runs in the loop) or the frozen part's cached output."""
        train, bs = self.job.dataset.train, self.cfg.batch_size
        if augment is not None:
            loader = InMemoryLoader(train, self.pre, bs, shuffle=True, seed=seed, augment=augment)
        else:
            loader = TensorBatches(cached, self.labels["train"], bs, shuffle=True, seed=seed)
        return self.job.shard(loader, seed)

    def head_phase(self) -> StrategyResult:
        """Phase 1 (all of feature-extract): the classifier alone on the frozen base's features."""
        job, cfg, model = self.job, self.cfg, self.model
        train_fc = job.wrap(model.get_classifier())
        epochs = cfg.epochs if cfg.strategy == "feature-extract" else cfg.head_epochs
        opt = make_optimizer(cfg.optimizer, list(model.get_classifier().parameters()), cfg.lr, cfg.weight_decay)
        # fine-tune augments phase 1 too by default, as the book does; --no-head-augment trains the
        # head on cached features (seconds) and keeps augmentation for phase 2
        augment = build_augmentation(cfg.augment_preset) if cfg.strategy == "feature-extract" or cfg.head_augment else None
        self.stats["head_augmented"] = augment is not None
        loader = self._train_loader(augment, self.feats["train"], cfg.seed)
        on_features = lambda f: model.forward_head(f, train_fc)  # noqa: E731
        forward = on_features if augment is None else (lambda x: on_features(self.base(x)))
        val = TensorBatches(self.feats["val"], self.labels["val"], 256)
        hooks = Hooks(model.train_head, lambda: evaluate(model, val, job.eval_loss, forward=model.forward_head), self.saver("head"), reduce=job.reduce())
        f = fit(Step(forward, opt, job.loss_fn, make_scheduler(cfg.lr_schedule, opt, epochs, len(loader))), loader, hooks,
                Plan(epochs, cfg.patience, label="head epoch", progress=job.progress))
        return StrategyResult([dict(h, phase="head") for h in f.history], dict(f.best, phase="head"), f.train_seconds, f.images_seen,
                              f.interrupted, f.stopped_early, stats=self.stats)

    def _unfreeze_top(self):
        """The frozen prefix through ONNX Runtime, the trainable suffix (top blocks + head) in torch."""
        self.job.load_best()  # the best head
        self.base.close()  # its features are cached: one session at a time
        prefix, self.suffix, trainable = self.model.split(self.cfg.unfreeze)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in trainable + list(self.model.get_classifier().parameters()):
            p.requires_grad_(True)
        t1 = time.perf_counter()
        frozen = OrtFrozen(prefix, self.pre.input_shape, self.cfg.threads)
        self.acts = {"val": frozen.over_split(self.job.dataset.val, self.pre)}
        if self.job.dataset.test is not None:
            self.acts["test"] = frozen.over_split(self.job.dataset.test, self.pre)
        aug = build_augmentation(self.cfg.augment_preset)
        if aug is None:
            self.acts["train"] = frozen.over_split(self.job.dataset.train, self.pre)
        loader = self._train_loader(aug, self.acts.get("train"), self.cfg.seed + 1)
        train_suffix = self.job.wrap(self.suffix)
        forward = train_suffix if aug is None else (lambda x: train_suffix(frozen(x)))
        self.stats["prefix_seconds"] = round(time.perf_counter() - t1, 3)
        return loader, forward

    def _set_train_top(self) -> None:
        self.model.train()
        freeze_batchnorm(self.model)

    def fine_tune_phase(self, result: StrategyResult) -> None:
        """Phase 2: the top blocks and the head together at a lower rate; ``result`` gains its epochs."""
        job, cfg, model = self.job, self.cfg, self.model
        loader, forward = self._unfreeze_top()
        params = [p for p in model.parameters() if p.requires_grad]
        lr2 = cfg.fine_tune_lr if cfg.fine_tune_lr is not None else cfg.lr / 10
        opt = make_optimizer(cfg.optimizer, params, lr2, cfg.weight_decay)
        val = TensorBatches(self.acts["val"], self.labels["val"], 128)
        hooks = Hooks(self._set_train_top, lambda: evaluate(model, val, job.eval_loss, forward=self.suffix), self.saver("fine-tune"), reduce=job.reduce())
        start_val = hooks.validate()
        ema = WeightAverage(params, cfg.ema) if cfg.ema else None
        f = fit(Step(forward, opt, job.loss_fn, make_scheduler(cfg.lr_schedule, opt, cfg.epochs, len(loader)), ema=ema), loader, hooks,
                Plan(cfg.epochs, cfg.patience, first_epoch=len(result.history) + 1, label="fine-tune epoch", progress=job.progress))
        if ema is not None:
            self.stats["ema_decay"] = cfg.ema
        self.stats.update(fine_tune_lr=lr2, unfrozen_blocks=cfg.unfreeze, fine_tune_start_val_accuracy=start_val["accuracy"])
        _merge(result, f)

    def score_test(self, best: dict) -> Optional[dict]:
        if "test" not in self.feats:
            return None
        # in batches, as validation: the top blocks over all 1,000 cached test activations at once peaked 1.4 GB higher
        fine_tuned = best.get("phase") == "fine-tune"
        x, forward = (self.acts["test"], self.suffix) if fine_tuned else (self.feats["test"], self.model.forward_head)
        return evaluate(self.model, TensorBatches(x, self.labels["test"], 128), self.job.eval_loss, forward=forward)


def _merge(result: StrategyResult, f2: Fitted) -> None:
    """Phase 2's epochs after phase 1's; the checkpoint holds whichever was best on validation
    loss: head-only or a fine-tuned epoch."""
    result.history += [dict(h, phase="fine-tune") for h in f2.history]
    result.train_seconds += f2.train_seconds
    result.images_seen += f2.images_seen
    result.interrupted = f2.interrupted
    if f2.best["epoch"] and f2.best["val_loss"] < result.best["val_loss"]:
        result.best = dict(f2.best, phase="fine-tune")
    elif f2.best["epoch"]:
        log.warning("fine-tuning did not improve validation loss (%.4f vs %.4f); keeping the head-only model", f2.best["val_loss"], result.best["val_loss"])
