"""Training from scratch: every weight trains on (optionally augmented) images; resumable per epoch."""
from __future__ import annotations

import logging
from dataclasses import asdict

from edgeconv_runtime.errors import EdgeconvError

from ..augment import build_augmentation
from .loaders import InMemoryLoader
from .loop import Hooks, Plan, Step, evaluate, fit, make_optimizer, make_scheduler
from .rundir import rng_state, save_state, set_rng_state, write_history
from .strategy import Job, StrategyResult

log = logging.getLogger("edgeconv.train")


def train_scratch(job: Job) -> StrategyResult:
    cfg, model, pre = job.cfg, job.model, job.dataset.preprocess
    augment = build_augmentation(cfg.augment_preset)
    loader = InMemoryLoader(job.dataset.train, pre, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, channels_last=job.channels_last)
    job.shard(loader, cfg.seed, record=True)
    val_loader = InMemoryLoader(job.dataset.val, pre, job.eval_batch_size, channels_last=job.channels_last)
    optimizer = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg.lr_schedule, optimizer, cfg.epochs, len(loader))
    prior = _restore(job, optimizer, scheduler)
    # DDP averages gradients across ranks in backward
    step = Step(job.wrap(model), optimizer, job.loss_fn, scheduler, bf16=job.bf16)
    hooks = Hooks(set_train=model.train, validate=lambda: evaluate(model, val_loader, job.eval_loss),
                  on_improve=job.save_best, on_epoch=_StateWriter(job, optimizer, scheduler, prior), reduce=job.reduce())
    plan = Plan(cfg.epochs - prior["epoch"], cfg.patience, first_epoch=prior["epoch"] + 1, progress=job.progress)
    f = fit(step, loader, hooks, plan, resume=prior["fitted"])
    return StrategyResult(f.history, f.best, prior["seconds"] + f.train_seconds, prior["images"] + f.images_seen, f.interrupted, f.stopped_early)


def _restore(job: Job, optimizer, scheduler) -> dict:
    """Where a resumed run stands (epoch, seconds and images so far, the loop's own record);
    the model, optimizer, schedule and random generators continue from ``job.state``."""
    st = job.state
    if st is None:
        return {"epoch": 0, "seconds": 0.0, "images": 0, "fitted": None}
    job.model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    if scheduler is not None and st.get("scheduler"):
        scheduler.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    epoch = int(st["epoch"])
    log.warning("resuming %s at epoch %d of %d", job.out, epoch + 1, job.cfg.epochs)
    if epoch >= job.cfg.epochs:
        raise EdgeconvError(f"{job.out} already finished its {job.cfg.epochs} epochs; nothing to resume")
    return {"epoch": epoch, "seconds": float(st["train_seconds"]), "images": int(st["images_seen"]),
            "fitted": {"history": st["history"], "best": st["best"], "bad_epochs": st["bad_epochs"]}}


class _StateWriter:
    """After each epoch (rank 0): the history files and the resumable state."""

    def __init__(self, job: Job, optimizer, scheduler, prior: dict):
        self.job, self.optimizer, self.scheduler, self.prior = job, optimizer, scheduler, prior

    def __call__(self, history: list, best: dict, bad_epochs: int, seconds: float, images: int) -> None:
        job = self.job
        if not job.ctx.is_main:
            return
        write_history(job.out, history)
        save_state(job.out, {
            "epoch": history[-1]["epoch"], "model": job.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None, "rng": rng_state(),
            "best": best, "bad_epochs": bad_epochs, "history": history, "train_config": asdict(job.cfg),
            "train_seconds": self.prior["seconds"] + seconds, "images_seen": self.prior["images"] + images,
        })
