"""``TrainConfig``: everything ``edgeconv train`` takes, and the names it accepts."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from edgeconv_runtime.errors import EdgeconvError

from ..models import get_model_entry

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")
TRANSFER_STRATEGIES = ("feature-extract", "fine-tune")
STRATEGIES = ("scratch", *TRANSFER_STRATEGIES)


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
    qat: bool = False  # then fine-tune the best weights with fake quantization: RUN/qat.onnx, the bundle's INT8 graph
    qat_epochs: int = 2  # --qat: epochs of quantization-aware training
    qat_lr: Optional[float] = None  # --qat: learning rate (default lr / 100)
    qat_images: Optional[int] = None  # --qat: training images per epoch (a seeded sample; default all)

    @property
    def transfer(self) -> bool:
        """Whether the strategy starts from a pretrained backbone."""
        return self.strategy in TRANSFER_STRATEGIES

    def resolved(self) -> "TrainConfig":
        """A copy with the model's defaults filled in; raises EdgeconvError on a bad combination."""
        entry = get_model_entry(self.model)
        d = dict(entry.train_defaults)
        c = TrainConfig(**asdict(self))
        c.batch_size = c.batch_size or d.get("batch_size", 32)
        c.optimizer = (c.optimizer or d.get("optimizer", "adam")).lower()
        c.lr = c.lr if c.lr is not None else d.get("lr", 1e-3)
        c.augment_preset = (c.augment_preset or d.get("augment_preset", "book")) if c.augment else None
        c.strategy = c.strategy or ("feature-extract" if entry.pretrained else "scratch")
        c._check_strategy(entry.pretrained)
        c._check_numbers()
        return c

    def _check_strategy(self, pretrained: bool) -> None:
        if self.strategy not in STRATEGIES:
            raise EdgeconvError(f"unknown --strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.strategy != "scratch" and not pretrained:
            raise EdgeconvError(f"{self.model} has no pretrained weights; --strategy {self.strategy} needs a backbone such as efficientnet_lite0")
        if self.ema is not None and self.strategy != "fine-tune":
            raise EdgeconvError("--ema averages the weights of fine-tuning's phase 2; use it with --strategy fine-tune")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise EdgeconvError(f"--ema {self.ema} is not a decay in (0, 1); try 0.99")

    def _check_numbers(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise EdgeconvError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise EdgeconvError(f"unknown --lr-schedule {self.lr_schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.epochs < 1:
            raise EdgeconvError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise EdgeconvError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise EdgeconvError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.qat_epochs < 1:
            raise EdgeconvError(f"--qat-epochs must be at least 1, got {self.qat_epochs}")
        if self.qat_lr is not None and not self.qat_lr > 0:
            raise EdgeconvError(f"--qat-lr must be positive, got {self.qat_lr}")
        if self.qat_images is not None and self.qat_images < 1:
            raise EdgeconvError(f"--qat-images must be at least 1, got {self.qat_images}")
