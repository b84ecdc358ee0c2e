"""One training run: resolve the config, load the data, build the model, run a strategy, write
metrics.json, the history, the curves and the model card."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgeconv_runtime.versions import library_versions
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_json

from .. import checkpoint as ckpt
from .. import distributed as ddp
from ..data import Dataset, shown
from ..model_card import write_model_card
from ..models import count_parameters, create_model, get_model_entry
from .config import TrainConfig
from .datasets import load_training_data
from .loaders import InMemoryLoader
from .loop import evaluate
from .rundir import load_state, plot_history, prepare_out, seed_everything, write_history, write_shard_record
from .scratch import train_scratch
from .strategy import Job, StrategyResult
from .transfer import train_transfer

log = logging.getLogger("edgeconv.train")

STRATEGY_FUNCTIONS = {"scratch": train_scratch, "feature-extract": train_transfer, "fine-tune": train_transfer}


@dataclass
class RunResult:
    out: Path
    metrics: dict
    history: list = field(default_factory=list)


def train(config: TrainConfig, dataset: Optional[Dataset] = None, resume: bool = False) -> RunResult:
    """Train one model as ``config`` says; writes the run directory and returns its metrics.

    Under torchrun (WORLD_SIZE > 1) this process is one DDP rank: it trains on its shard of
    each epoch and only rank 0 writes. With ``resume`` the run in ``config.out`` continues
    from its last resumable state.
    """
    ctx = ddp.init_distributed()
    made = [] if resume else _missing_dirs(Path(config.out))
    try:
        return _train(config, dataset, resume, ctx)
    except EdgeconvError:
        if ctx.is_main:  # refused before anything was written (bad weights, hub offline): leave no empty folders behind
            with contextlib.suppress(OSError):
                for d in made:
                    d.rmdir()
        raise
    finally:
        ddp.cleanup(ctx)


def _missing_dirs(out: Path) -> list:
    """``out`` and the ancestors of it that do not exist yet, deepest first."""
    missing = []
    while not out.exists() and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def _train(config: TrainConfig, dataset: Optional[Dataset], resume: bool, ctx: ddp.DistContext) -> RunResult:
    cfg, out, state = _resolve(config, resume, ctx)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    dataset = dataset if dataset is not None else load_training_data(cfg)
    load_seconds = time.perf_counter() - t0
    job = _make_job(cfg, dataset, out, ctx, state)
    result = STRATEGY_FUNCTIONS[cfg.strategy](job)
    if ctx.enabled:
        write_shard_record(job.out, ctx, job.shard_log, job.model)
        ddp.barrier(ctx)
    if not result.history or result.best["epoch"] == 0:
        raise EdgeconvError("training was interrupted before the first epoch finished; nothing was saved")
    # Final figures come from the best epoch's weights, reloaded from the file we ship.
    best_ck = ckpt.load_checkpoint(job.out / ckpt.CHECKPOINT_NAME)
    job.model.load_state_dict(best_ck["state_dict"])
    metrics = _metrics(job, result, _test_figures(job, result), load_seconds)
    if ctx.is_main:
        _write_outputs(job, best_ck, metrics, result.history)
        if cfg.qat and not result.interrupted:  # quantization-aware fine-tuning of the best weights: RUN/qat.onnx
            from .qat import QatSettings, qat_from_run

            metrics["qat"] = qat_from_run(job.out, QatSettings(cfg.qat_epochs, cfg.qat_lr, cfg.threads, cfg.progress, cfg.qat_images), dataset)
    return RunResult(job.out, metrics, result.history)


def _resolve(config: TrainConfig, resume: bool, ctx: ddp.DistContext) -> tuple:
    """(the resolved config, the run directory, the resumable state or None); a new run's directory is prepared."""
    if not resume:
        cfg = config.resolved()
        if ctx.is_main:
            prepare_out(Path(cfg.out), cfg.force)
        ddp.barrier(ctx)
        return cfg, Path(cfg.out), None
    state = load_state(Path(config.out))
    cfg = TrainConfig(**{**state["train_config"], "progress": config.progress}).resolved()
    if cfg.strategy != "scratch":
        raise EdgeconvError(f"--resume continues training from scratch; a {cfg.strategy} run is quick to rerun, so start it again")
    return cfg, Path(config.out), state


def _model_kwargs(cfg: TrainConfig) -> dict:
    kwargs = {}
    if cfg.downsample:
        kwargs["downsample"] = cfg.downsample
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    if get_model_entry(cfg.model).pretrained:
        kwargs["pretrained"] = cfg.transfer
        if cfg.weights:
            kwargs["weights"] = cfg.weights
    return kwargs


def _use_bf16(cfg: TrainConfig) -> bool:
    bf16 = cfg.bf16 and cpu_has_bf16()
    if cfg.bf16 and not bf16:
        log.warning("--bf16 ignored: this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16)")
    return bf16


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _make_job(cfg: TrainConfig, dataset: Dataset, out: Path, ctx: ddp.DistContext, state: Optional[dict]) -> Job:
    pre = dataset.preprocess
    kwargs = _model_kwargs(cfg)
    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes=dataset.num_classes, in_channels=pre.channels, input_size=pre.size, **kwargs)
    meta = _checkpoint_meta(cfg, dataset, kwargs, count_parameters(model))
    bf16 = _use_bf16(cfg)
    channels_last = cfg.channels_last and pre.channels == 3  # a 1-channel NHWC tensor gains nothing
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Job(cfg, dataset, model, out, meta, loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), eval_loss=nn.CrossEntropyLoss(),
               ctx=ctx, bf16=bf16, channels_last=channels_last, state=state)


def _checkpoint_meta(cfg: TrainConfig, dataset: Dataset, kwargs: dict, n_params: int) -> dict:
    """What every checkpoint of this run carries: model recipe, classes, preprocessing, data, config."""
    return {
        "model": {"name": cfg.model, "kwargs": {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}, "parameters": n_params},
        "strategy": cfg.strategy,
        "classes": list(dataset.classes),
        "preprocess": dataset.preprocess.to_dict(),
        "data": {k: v for k, v in dataset.describe().items() if k != "class_counts"} | {"val_fraction": cfg.val_fraction, "seed": cfg.seed},
        "train_config": asdict(cfg),
        "versions": library_versions(("torch", "torchvision")),
    }


def _test_figures(job: Job, result: StrategyResult) -> Optional[dict]:
    """The strategy's own test figures, else the best weights evaluated on the test split (None without one)."""
    if result.test is not None or job.dataset.test is None:
        return result.test
    loader = InMemoryLoader(job.dataset.test, job.dataset.preprocess, job.eval_batch_size, channels_last=job.channels_last)
    return evaluate(job.model, loader, job.eval_loss)


def _metrics(job: Job, result: StrategyResult, test: Optional[dict], load_seconds: float) -> dict:
    cfg, dataset, best, seconds = job.cfg, job.dataset, result.best, result.train_seconds
    return {
        "model": cfg.model,
        "parameters": job.meta["model"]["parameters"],
        "test_accuracy": test["accuracy"] if test else None,
        "test_loss": test["loss"] if test else None,
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "interrupted": result.interrupted,
        "train_seconds": round(seconds, 3),
        "train_images_per_second": round(result.images_seen / seconds, 1) if seconds else None,
        "train_images_seen": result.images_seen,  # over every epoch run, resumed ones included
        "data_load_seconds": round(load_seconds, 3),
        "sizes": {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test) if dataset.test is not None else 0},
        "skipped_images": dataset.skipped,
        "seed": cfg.seed,
        "strategy": cfg.strategy,
        "world_size": job.ctx.world_size,
        "resumed": job.state is not None,
        **({"transfer": result.stats} if result.stats else {}),
    }


def _write_outputs(job: Job, best_ck: dict, metrics: dict, history: list) -> None:
    """The shipped checkpoint gains the final metrics; metrics.json, history, curves and model card."""
    out, cfg = job.out, job.cfg
    best_ck.update({"test_accuracy": metrics["test_accuracy"], "metrics": metrics})
    ckpt.save_checkpoint(out / ckpt.CHECKPOINT_NAME, job.model, {k: v for k, v in best_ck.items() if k not in ("state_dict", "format", "version")})
    atomic_write_json(out / "metrics.json", metrics)
    write_history(out, history)
    plot_history(out, history, f"{cfg.model} on {shown(Path(str(job.dataset.source)).name)}")
    write_model_card(out, dataset=job.dataset, metrics=metrics, config=asdict(cfg), history=history)
