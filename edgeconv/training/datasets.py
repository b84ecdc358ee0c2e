"""The dataset a training config names, decoded at its model's preprocessing: shared by a training run and by
quantization-aware fine-tuning of a finished run (which re-reads the data the run was trained on)."""
from __future__ import annotations

from ..data import Dataset, inspect_source, load_dataset
from ..models import build_preprocess
from .config import TrainConfig


def load_training_data(cfg: TrainConfig) -> Dataset:
    info = inspect_source(cfg.data)
    pre = build_preprocess(cfg.model, info, cfg.size, cfg.resize)
    return load_dataset(cfg.data, pre, test_data=cfg.test_data, val_fraction=cfg.val_fraction, seed=cfg.seed, info=info)
