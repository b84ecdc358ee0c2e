"""The epoch loop every strategy shares (``fit``), evaluation, weight averaging, optimizers and schedules."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger("edgeconv.train")


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def make_scheduler(name: str, optimizer, epochs: int, steps_per_epoch: int):
    """Per-step schedule (None for constant learning rate)."""
    total = max(1, epochs * steps_per_epoch)
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total)
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn=None, forward=None) -> dict:
    """Loss and accuracy over a loader with ``model`` in eval mode; ``forward`` (default the
    model itself) maps a batch to logits, e.g. a head applied to cached features."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    forward = forward or model
    was_training = model.training
    model.eval()
    tally = _Tally()
    for x, y in loader:
        logits = forward(x)
        tally.add(float(loss_fn(logits, y)), logits, y)
    model.train(was_training)
    return {"loss": tally.loss_sum / max(tally.seen, 1), "accuracy": tally.correct / max(tally.seen, 1), "n": tally.seen}


class WeightAverage:
    """Exponential moving average of trained parameters (``--ema``); validation and the saved
    checkpoint use the averaged weights. The decay warms up as (1 + n) / (10 + n), as in
    TensorFlow's ExponentialMovingAverage with num_updates, so early steps are not frozen in."""

    def __init__(self, params, decay: float):  # decay checked with the rest of TrainConfig
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in place of the live ones for the duration of the block."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)


# --------------------------------------------------------------------------- fit


@dataclass
class Step:
    """How one batch trains: ``forward`` maps a batch to logits (a whole model, or a frozen
    base's features into a head); with ``ema`` the averaged weights are validated and saved."""

    forward: Callable
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    scheduler: Optional[object] = None
    bf16: bool = False
    ema: Optional[WeightAverage] = None


@dataclass
class Hooks:
    """What the loop calls: ``set_train()`` before each epoch, ``validate() -> {loss, accuracy}``,
    ``on_improve(epoch, val)`` to save the best weights, ``on_epoch(history, best, bad_epochs,
    seconds, images)`` to persist the resumable state; ``reduce`` sums epoch figures over DDP ranks."""

    set_train: Callable[[], None]
    validate: Callable[[], dict]
    on_improve: Callable[[int, dict], None]
    on_epoch: Optional[Callable] = None
    reduce: Optional[Callable[[list], list]] = None


@dataclass
class Plan:
    """Which epochs run: ``epochs`` from ``first_epoch``, early stop after ``patience`` epochs without a better validation loss."""

    epochs: int
    patience: Optional[int] = None
    first_epoch: int = 1
    label: str = "epoch"
    progress: bool = True

    @property
    def last(self) -> int:
        return self.first_epoch + self.epochs - 1


@dataclass
class Fitted:
    """What one ``fit`` did; ``resume`` (history/best/bad_epochs of a run being continued) seeds it."""

    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "epoch": 0})
    train_seconds: float = 0.0
    images_seen: int = 0
    interrupted: bool = False
    stopped_early: bool = False
    bad_epochs: int = 0

    @classmethod
    def resumed(cls, resume: Optional[dict]) -> "Fitted":
        if not resume:
            return cls()
        return cls(history=list(resume["history"]), best=dict(resume["best"]), bad_epochs=resume["bad_epochs"])


def fit(step: Step, loader, hooks: Hooks, plan: Plan, resume: Optional[dict] = None) -> Fitted:
    """The epoch loop shared by every strategy: train steps, validation, best-epoch tracking,
    early stopping on validation loss, progress bar; Ctrl-C stops it and keeps the best so far."""
    run = Fitted.resumed(resume)
    try:
        for epoch in range(plan.first_epoch, plan.last + 1):
            _epoch(step, loader, hooks, plan, run, epoch)
            if plan.patience is not None and run.bad_epochs >= plan.patience:
                run.stopped_early = True
                break
    except KeyboardInterrupt:
        run.interrupted = True
        log.warning("interrupted: keeping the best checkpoint so far (epoch %s)", run.best["epoch"])
    return run


class _Tally:
    """Running loss sum, correct count and sample count over batches."""

    def __init__(self):
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)


def _progress_bar(plan: Plan, total: int, epoch: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"{plan.label} {epoch}/{plan.last}", leave=False, disable=None if plan.progress else True)


def _train_steps(step: Step, loader, bar) -> _Tally:
    tally = _Tally()
    for x, y in loader:
        step.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step.bf16):
            logits = step.forward(x)
        loss = step.loss_fn(logits.float(), y)
        loss.backward()
        step.optimizer.step()
        if step.ema is not None:
            step.ema.update()
        if step.scheduler is not None:
            step.scheduler.step()
        tally.add(float(loss.detach()), logits.detach(), y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.4f}", acc=f"{tally.correct / tally.seen:.4f}")
    if bar is not None:
        bar.close()
    return tally


def _validate(step: Step, hooks: Hooks, run: Fitted, epoch: int) -> dict:
    """Validation (on the averaged weights under --ema); a better loss saves the weights."""
    with step.ema.swapped() if step.ema is not None else contextlib.nullcontext():
        v = hooks.validate()
        if v["loss"] < run.best["val_loss"]:
            run.best = {"val_loss": v["loss"], "val_accuracy": v["accuracy"], "epoch": epoch}
            run.bad_epochs = 0
            hooks.on_improve(epoch, v)
        else:
            run.bad_epochs += 1
    return v


def _epoch(step: Step, loader, hooks: Hooks, plan: Plan, run: Fitted, epoch: int) -> None:
    loader.set_epoch(epoch)
    hooks.set_train()
    te = time.perf_counter()
    t = _train_steps(step, loader, _progress_bar(plan, len(loader), epoch))
    epoch_train = time.perf_counter() - te
    loss_sum, correct, seen = t.loss_sum, t.correct, t.seen
    if hooks.reduce is not None:  # figures over every rank's share
        loss_sum, correct, seen = hooks.reduce([loss_sum, correct, seen])
        seen = int(seen)
    run.train_seconds += epoch_train
    run.images_seen += seen
    v = _validate(step, hooks, run, epoch)
    row = {
        "epoch": epoch,
        "train_loss": round(loss_sum / seen, 6),
        "train_acc": round(correct / seen, 6),
        "val_loss": round(v["loss"], 6),
        "val_acc": round(v["accuracy"], 6),
        "lr": step.optimizer.param_groups[0]["lr"],
        "seconds": round(time.perf_counter() - te, 3),
        "train_images_per_second": round(seen / epoch_train, 1),
    }
    run.history.append(row)
    if hooks.on_epoch is not None:
        hooks.on_epoch(run.history, run.best, run.bad_epochs, run.train_seconds, run.images_seen)
    log.info("%s %d/%d %s", plan.label, epoch, plan.last, {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")})
