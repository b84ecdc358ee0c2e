"""Training: in-memory loaders, the epoch loop, best-epoch checkpoints, history and curves."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from edgeconv_runtime.preprocess import Preprocess

from . import checkpoint as ckpt
from .augment import build_augmentation
from .data import Dataset, Split, inspect_source, load_dataset, shown
from .models import count_parameters, create_model, get_model_entry

log = logging.getLogger("edgeconv.train")

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")


@dataclass
class TrainConfig:
    """Everything ``edgeconv train`` takes; None means the model's own default."""

    data: str
    model: str
    out: str
    epochs: int = 10
    test_data: Optional[str] = None
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    augment: bool = False
    augment_preset: Optional[str] = None
    dropout: Optional[float] = None
    downsample: Optional[str] = None
    seed: int = 0
    patience: Optional[int] = None
    val_fraction: float = 0.1
    size: Optional[int] = None
    resize: Optional[str] = None  # stretch | shorter_center_crop; default: the model's
    ema: Optional[float] = None  # fine-tune: exponential moving average of phase-2 weights
    label_smoothing: float = 0.0
    threads: Optional[int] = None
    progress: bool = True
    force: bool = False
    strategy: Optional[str] = None  # scratch | feature-extract | fine-tune (pretrained backbones)
    unfreeze: int = 3  # fine-tune: top blocks to unfreeze
    head_epochs: int = 10  # fine-tune: phase 1 (head only) epochs
    head_augment: bool = True  # fine-tune: augment phase 1 too (False: the head trains on cached features, in seconds)
    fine_tune_lr: Optional[float] = None  # fine-tune: phase 2 learning rate (default lr / 10)
    weights: Optional[str] = None  # local ImageNet weights file for a backbone
    channels_last: bool = True  # NHWC memory layout: oneDNN's fast path for CPU convolutions
    bf16: bool = False  # bfloat16 autocast for forward/backward where the CPU has bf16 instructions

    def resolved(self) -> "TrainConfig":
        entry = get_model_entry(self.model)
        d = dict(entry.train_defaults)
        c = TrainConfig(**asdict(self))
        c.batch_size = c.batch_size or d.get("batch_size", 32)
        c.optimizer = (c.optimizer or d.get("optimizer", "adam")).lower()
        c.lr = c.lr if c.lr is not None else d.get("lr", 1e-3)
        if c.augment and not c.augment_preset:
            c.augment_preset = d.get("augment_preset", "book")
        if not c.augment:
            c.augment_preset = None
        c.strategy = c.strategy or ("feature-extract" if entry.pretrained else "scratch")
        from .transfer import STRATEGIES

        if c.strategy not in STRATEGIES:
            raise EdgeconvError(f"unknown --strategy {c.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if c.strategy != "scratch" and not entry.pretrained:
            raise EdgeconvError(f"{c.model} has no pretrained weights; --strategy {c.strategy} needs a backbone such as efficientnet_lite0")
        if c.ema is not None and c.strategy != "fine-tune":
            raise EdgeconvError("--ema averages the weights of fine-tuning's phase 2; use it with --strategy fine-tune")
        if c.ema is not None and not 0.0 < c.ema < 1.0:
            raise EdgeconvError(f"--ema {c.ema} is not a decay in (0, 1); try 0.99")
        if c.optimizer not in OPTIMIZERS:
            raise EdgeconvError(f"unknown optimizer {c.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if c.lr_schedule not in SCHEDULES:
            raise EdgeconvError(f"unknown --lr-schedule {c.lr_schedule!r}; use one of {', '.join(SCHEDULES)}")
        if c.epochs < 1:
            raise EdgeconvError(f"--epochs must be at least 1, got {c.epochs}")
        if c.batch_size < 1:
            raise EdgeconvError(f"--batch-size must be at least 1, got {c.batch_size}")
        if not 0 < c.val_fraction < 1:
            raise EdgeconvError(f"--val-fraction must be between 0 and 1, got {c.val_fraction}")
        return c


# --------------------------------------------------------------------------- loaders


class InMemoryLoader:
    """Batches from uint8 pixels held in memory, normalised exactly as the runtime does.

    Without augmentation a batch is one gather and one fused scale/normalise, so the data
    path costs next to nothing beside the model. With augmentation each sample goes through
    torchvision.transforms.v2 on its uint8 tensor. ``indices`` lets a distributed sampler
    choose this rank's share.
    """

    def __init__(self, split: Split, pre: Preprocess, batch_size: int, shuffle: bool = False, seed: int = 0, augment: Optional[Callable] = None, channels_last: bool = False):
        self.x = torch.from_numpy(np.array(split.pixels, copy=True)).permute(0, 3, 1, 2).contiguous()
        self.y = torch.from_numpy(split.labels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.augment = augment
        self.channels_last = channels_last
        self.scale = float(pre.scale)
        c = pre.channels
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, c, 1, 1) if any(pre.mean) else None
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(1, c, 1, 1) if any(s != 1 for s in pre.std) else None
        self.indices: Optional[Callable[[int], torch.Tensor]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices(self.epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            return torch.randperm(len(self.y), generator=g)
        return torch.arange(len(self.y))

    def __len__(self) -> int:
        return math.ceil(len(self.order()) / self.batch_size) if self.indices is not None else math.ceil(len(self.y) / self.batch_size)

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
        order = self.order()
        for b in range(0, len(order), self.batch_size):
            ii = order[b : b + self.batch_size]
            xb = self.x[ii]
            if self.augment is not None:
                xb = torch.stack([self.augment(img) for img in xb])
            yield self.normalize(xb), self.y[ii]


# --------------------------------------------------------------------------- helpers


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        logits = forward(x)
        loss_sum += float(loss_fn(logits, y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1), "n": total}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def write_history(out: Path, history: list) -> None:
    atomic_write_json(out / "history.json", history)
    if history:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
        atomic_write_text(out / "history.csv", buf.getvalue())


def plot_history(out: Path, history: list, title: str) -> None:
    """The book's training/validation accuracy and loss charts, side by side, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "bo-", ms=3, label=f"training {label}")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "r.-", label=f"validation {label}")
        ax.set_xlabel("epoch")
        ax.set_title(f"Training and validation {label}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out / "curves.png", buf.getvalue())


def build_preprocess(model_name: str, info, size: Optional[int], resize: Optional[str] = None) -> Preprocess:
    """The model's preprocessing for this data: channels and size from the data, policy from the model.

    ``resize`` overrides the model's resize policy: ``stretch`` keeps the whole picture (the
    book's Keras pipeline), ``shorter_center_crop`` keeps the aspect ratio and crops the centre.
    """
    entry = get_model_entry(model_name)
    p = dict(entry.preprocess)
    if resize:
        p["resize"] = resize
    if size:
        hw = (size, size)
    elif info.native_size is not None and entry.default_size is None:
        hw = info.native_size
    elif entry.default_size is not None:
        hw = entry.default_size
    else:
        hw = info.native_size or (150, 150)
    if info.kind == "arrays" and tuple(hw) != tuple(info.native_size):
        raise EdgeconvError(f"{info.path} holds {info.native_size[0]}x{info.native_size[1]} images; {model_name} at {hw} needs image folders (drop --size)")
    ch = entry.preprocess.get("channels", info.channels)
    mean = p.get("mean", (0.0,) * ch)
    std = p.get("std", (1.0,) * ch)
    return Preprocess(size=hw, channels=ch, resize=p.get("resize", "stretch"), crop_pct=p.get("crop_pct", 0.875), scale=p.get("scale", 1 / 255), mean=mean, std=std,
                      jpeg_draft=True)


@dataclass
class Fitted:
    history: list
    best: dict
    train_seconds: float
    images_seen: int
    interrupted: bool
    stopped_early: bool


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


def fit(forward, set_train, optimizer, scheduler, loss_fn, train_loader, evaluate_val, epochs: int, patience: Optional[int],
        on_improve, on_epoch=None, progress: bool = True, first_epoch: int = 1, label: str = "epoch", bf16: bool = False,
        reduce=None, resume: Optional[dict] = None, ema: Optional[WeightAverage] = None) -> Fitted:
    """The epoch loop shared by every strategy: train steps, validation, best-epoch tracking,
    early stopping on validation loss, progress bar; Ctrl-C stops it and keeps the best so far.

    ``forward`` maps a batch to logits (a whole model, or a frozen base's features into a head);
    ``on_improve(epoch, val)`` saves the best weights; ``on_epoch(history, best, bad_epochs)``
    persists the history and the resumable state. ``reduce`` sums epoch figures over DDP ranks;
    ``resume`` carries history/best/bad_epochs of a run being continued; with ``ema`` the
    averaged weights are validated and saved.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    resume = resume or {}
    history: list = list(resume.get("history", []))
    best = dict(resume.get("best", {"val_loss": math.inf, "epoch": 0}))
    bad_epochs, train_seconds, images_seen = resume.get("bad_epochs", 0), 0.0, 0
    interrupted = stopped_early = False
    last = first_epoch + epochs - 1
    try:
        for epoch in range(first_epoch, last + 1):
            train_loader.set_epoch(epoch)
            set_train()
            te = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(total=len(train_loader), desc=f"{label} {epoch}/{last}", leave=False, disable=None if progress else True) if tqdm else None
            for x, y in train_loader:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = forward(x)
                loss = loss_fn(logits.float(), y)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update()
                if scheduler is not None:
                    scheduler.step()
                n = len(y)
                loss_sum += float(loss.detach()) * n
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += n
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
            if bar is not None:
                bar.close()
            epoch_train = time.perf_counter() - te
            if reduce is not None:  # figures over every rank's share
                loss_sum, correct, seen = reduce([loss_sum, correct, seen])
                seen = int(seen)
            train_seconds += epoch_train
            images_seen += seen
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                v = evaluate_val()
                if v["loss"] < best["val_loss"]:
                    best = {"val_loss": v["loss"], "val_accuracy": v["accuracy"], "epoch": epoch}
                    bad_epochs = 0
                    on_improve(epoch, v)
                else:
                    bad_epochs += 1
            row = {
                "epoch": epoch,
                "train_loss": round(loss_sum / seen, 6),
                "train_acc": round(correct / seen, 6),
                "val_loss": round(v["loss"], 6),
                "val_acc": round(v["accuracy"], 6),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - te, 3),
                "train_images_per_second": round(seen / epoch_train, 1),
            }
            history.append(row)
            if on_epoch is not None:
                on_epoch(history, best, bad_epochs, train_seconds, images_seen)
            log.info("%s %d/%d %s", label, epoch, last, {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")})
            if patience is not None and bad_epochs >= patience:
                stopped_early = True
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping the best checkpoint so far (epoch %s)", best["epoch"])
    return Fitted(history, best, train_seconds, images_seen, interrupted, stopped_early)


# --------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    out: Path
    metrics: dict
    history: list = field(default_factory=list)


STATE_NAME = "state.pt"
PREV_STATE_NAME = "state.prev.pt"


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgeconvError(f"--out {out} is a file; choose a directory")
    if (out / ckpt.CHECKPOINT_NAME).exists() and not force:
        raise EdgeconvError(f"{out} already holds a trained model; pass --force to overwrite it, --resume {out} to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (STATE_NAME, PREV_STATE_NAME):
        (out / stale).unlink(missing_ok=True)


def save_state(out: Path, state: dict) -> None:
    """The resumable state of the epoch just finished; the one before it is kept as a fallback.

    The new file is complete on disk (temp + fsync + rename) before the old one is rotated, so
    a crash or a full disk at any moment leaves at least one good state.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = out / f".{STATE_NAME}.new"
    atomic_write_bytes(tmp, buf.getvalue())
    if (out / STATE_NAME).exists():
        os.replace(out / STATE_NAME, out / PREV_STATE_NAME)
    os.replace(tmp, out / STATE_NAME)


def load_state(out: Path) -> dict:
    """The newest readable state in ``out``; falls back to the previous one with a warning."""
    errors = []
    for name in (STATE_NAME, PREV_STATE_NAME):
        p = out / name
        if not p.exists():
            continue
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if name == PREV_STATE_NAME:
                log.warning("%s is unreadable (%s); resuming from the previous epoch's state", STATE_NAME, errors[-1] if errors else "missing")
            return state
        except Exception as exc:  # truncated/corrupt file: try the older one
            errors.append(f"{name}: {type(exc).__name__} {(str(exc).splitlines() or [''])[0][:80]}")
    raise EdgeconvError(f"no resumable state in {out} ({'; '.join(errors) or 'no state.pt'}); it was not written by `edgeconv train`, or no epoch finished")


def _rng_state() -> dict:
    """Every generator a resumed run must continue: torch (augmentation), numpy, python."""
    _, keys, pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "python": list(random.getstate()[1])}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(st["python"]), None))


def train(config: TrainConfig, dataset: Optional[Dataset] = None, resume: bool = False) -> RunResult:
    """Train one model as ``config`` says; writes the run directory and returns its metrics.

    Under torchrun (WORLD_SIZE > 1) this process is one DDP rank: it trains on its shard of
    each epoch and only rank 0 writes. With ``resume`` the run in ``config.out`` continues
    from its last resumable state.
    """
    from . import distributed as ddp

    ctx = ddp.init_distributed()
    try:
        return _train(config, dataset, resume, ctx)
    finally:
        ddp.cleanup(ctx)


def _train(config: TrainConfig, dataset: Optional[Dataset], resume: bool, ctx) -> RunResult:
    from . import distributed as ddp

    state = None
    if resume:
        out = Path(config.out)
        state = load_state(out)
        cfg = TrainConfig(**{**state["train_config"], "progress": config.progress}).resolved()
        if cfg.strategy != "scratch":
            raise EdgeconvError(f"--resume continues training from scratch; a {cfg.strategy} run is quick to rerun, so start it again")
    else:
        cfg = config.resolved()
        out = Path(cfg.out)
        if ctx.is_main:
            prepare_out(out, cfg.force)
        ddp.barrier(ctx)
    main = ctx.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    t0 = time.perf_counter()
    if dataset is None:
        info = inspect_source(cfg.data)
        pre = build_preprocess(cfg.model, info, cfg.size, cfg.resize)
        dataset = load_dataset(cfg.data, pre, test_data=cfg.test_data, val_fraction=cfg.val_fraction, seed=cfg.seed, info=info)
    pre = dataset.preprocess
    load_seconds = time.perf_counter() - t0

    entry = get_model_entry(cfg.model)
    kwargs = {}
    if cfg.downsample:
        kwargs["downsample"] = cfg.downsample
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    transfer = cfg.strategy in ("feature-extract", "fine-tune")
    if entry.pretrained:
        kwargs["pretrained"] = transfer
        if cfg.weights:
            kwargs["weights"] = cfg.weights
    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes=dataset.num_classes, in_channels=pre.channels, input_size=pre.size, **kwargs)
    n_params = count_parameters(model)

    augment = build_augmentation(cfg.augment_preset)
    bf16 = cfg.bf16 and cpu_has_bf16()
    if cfg.bf16 and not bf16:
        log.warning("--bf16 ignored: this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16)")
    cl = cfg.channels_last and pre.channels == 3  # a 1-channel NHWC tensor gains nothing
    if cl:
        model = model.to(memory_format=torch.channels_last)
    train_loader = InMemoryLoader(dataset.train, pre, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, channels_last=cl)
    shard_log: dict = {}
    if ctx.enabled:
        shard = ddp.shard_fn(ctx, len(dataset.train), cfg.seed)

        def indices(epoch: int) -> torch.Tensor:
            idx = shard(epoch)
            shard_log[str(epoch)] = idx.tolist()
            return idx

        train_loader.indices = indices
    eval_bs = max(cfg.batch_size, 256)
    val_loader = InMemoryLoader(dataset.val, pre, eval_bs, channels_last=cl)
    test_loader = InMemoryLoader(dataset.test, pre, eval_bs, channels_last=cl) if dataset.test is not None else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg.lr_schedule, optimizer, cfg.epochs, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()

    meta = {
        "model": {"name": cfg.model, "kwargs": {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}, "parameters": n_params},
        "strategy": cfg.strategy,
        "classes": list(dataset.classes),
        "preprocess": pre.to_dict(),
        "data": {k: v for k, v in dataset.describe().items() if k != "class_counts"} | {"val_fraction": cfg.val_fraction, "seed": cfg.seed},
        "train_config": asdict(cfg),
        "versions": ckpt.library_versions(),
    }

    first_epoch, prior_seconds, prior_images = 1, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        first_epoch = int(state["epoch"]) + 1
        prior_seconds, prior_images = float(state["train_seconds"]), int(state["images_seen"])
        log.warning("resuming %s at epoch %d of %d", out, first_epoch, cfg.epochs)

    transfer_stats: dict = {}
    if transfer:
        from .transfer import train_transfer

        res = train_transfer(cfg, dataset, model, out, meta, loss_fn, eval_loss, ctx)
        history, best, transfer_test = res.pop("history"), res.pop("best"), res.pop("test")
        train_seconds, images_seen = res.pop("train_seconds"), res.pop("images_seen")
        interrupted, stopped_early = res.pop("interrupted"), res.pop("stopped_early")
        transfer_stats = res
        if main:
            write_history(out, history)
    else:
        forward = model
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(model)  # averages gradients across ranks in backward
        def on_epoch(history, best, bad_epochs, seconds, images):
            if not main:
                return
            write_history(out, history)
            save_state(out, {
                "epoch": history[-1]["epoch"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": _rng_state(),
                "best": best, "bad_epochs": bad_epochs, "history": history, "train_config": asdict(cfg),
                "train_seconds": prior_seconds + seconds, "images_seen": prior_images + images,
            })

        resume_from = {"history": state["history"], "best": state["best"], "bad_epochs": state["bad_epochs"]} if state else None
        remaining = cfg.epochs - first_epoch + 1
        if remaining < 1:
            raise EdgeconvError(f"{out} already finished its {cfg.epochs} epochs; nothing to resume")
        fitted = fit(
            forward=forward,
            set_train=lambda: model.train(),
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            train_loader=train_loader,
            evaluate_val=lambda: evaluate(model, val_loader, eval_loss),
            epochs=remaining,
            patience=cfg.patience,
            on_improve=lambda epoch, v: main and ckpt.save_checkpoint(out / ckpt.CHECKPOINT_NAME, model, {**meta, "epoch": epoch, "val_accuracy": v["accuracy"], "val_loss": v["loss"]}),
            on_epoch=on_epoch,
            progress=cfg.progress and main,
            bf16=bf16,
            first_epoch=first_epoch,
            reduce=(lambda vals: ddp.all_sum(ctx, vals)) if ctx.enabled else None,
            resume=resume_from,
        )
        history, best = fitted.history, fitted.best
        train_seconds, images_seen = prior_seconds + fitted.train_seconds, prior_images + fitted.images_seen
        interrupted, stopped_early = fitted.interrupted, fitted.stopped_early

    if ctx.enabled:
        import hashlib

        digest = hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
        atomic_write_json(out / f"shards.rank{ctx.rank}.json", {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend,
                                                               "epochs": shard_log, "final_weights_sha256": digest})
        ddp.barrier(ctx)
    if not history or best["epoch"] == 0:
        raise EdgeconvError("training was interrupted before the first epoch finished; nothing was saved")

    # Final figures come from the best epoch's weights, reloaded from the file we ship.
    best_ck = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    model.load_state_dict(best_ck["state_dict"])
    if test_loader is None:
        test = None
    elif transfer:
        test = transfer_test
    else:
        test = evaluate(model, test_loader, eval_loss)
    metrics = {
        "model": cfg.model,
        "parameters": n_params,
        "test_accuracy": test["accuracy"] if test else None,
        "test_loss": test["loss"] if test else None,
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "interrupted": interrupted,
        "train_seconds": round(train_seconds, 3),
        "train_images_per_second": round(images_seen / train_seconds, 1) if train_seconds else None,
        "data_load_seconds": round(load_seconds, 3),
        "sizes": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test) if dataset.test is not None else 0},
        "skipped_images": dataset.skipped,
        "seed": cfg.seed,
        "strategy": cfg.strategy,
        "world_size": ctx.world_size,
        "resumed": state is not None,
        **({"transfer": transfer_stats} if transfer_stats else {}),
    }
    if main:
        best_ck.update({"test_accuracy": metrics["test_accuracy"], "metrics": metrics})
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT_NAME, model, {k: v for k, v in best_ck.items() if k not in ("state_dict", "format", "version")})
        atomic_write_json(out / "metrics.json", metrics)
        write_history(out, history)
        plot_history(out, history, f"{cfg.model} on {shown(Path(str(dataset.source)).name)}")
        from .model_card import write_model_card

        write_model_card(out, dataset=dataset, metrics=metrics, config=asdict(cfg), history=history)
    return RunResult(out, metrics, history)
