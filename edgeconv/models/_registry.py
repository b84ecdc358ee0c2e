"""One registry for every model: adding a model is one decorated function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from edgeconv_runtime.errors import EdgeconvError

_MODELS: dict = {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    description: str
    default_size: Optional[tuple] = None  # (H, W) for image folders; None: the data's native size
    listed_example: dict = field(default_factory=dict)  # the config `edgeconv models` counts parameters at
    preprocess: dict = field(default_factory=dict)  # resize policy, mean/std, scale
    train_defaults: dict = field(default_factory=dict)
    pretrained: bool = False


def register_model(
    name: str,
    description: str,
    default_size=None,
    listed_example=None,
    preprocess=None,
    train_defaults=None,
    pretrained=False,
):
    def wrap(fn):
        _MODELS[name] = ModelEntry(
            name, fn, description, default_size, listed_example or {}, preprocess or {}, train_defaults or {}, pretrained
        )
        return fn

    return wrap


BACKBONE_TRAIN_DEFAULTS = {"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "augment_preset": "light"}


def register_backbone(name: str, description: str, build, resolution: int, preprocess: dict) -> None:
    """Register a pretrained backbone: ``build(name, num_classes, in_channels, input_size, pretrained, weights, dropout)``."""

    def factory(num_classes, in_channels, input_size, pretrained=True, weights=None, dropout=None):
        return build(name, num_classes, in_channels, input_size, pretrained, weights, dropout)

    register_model(
        name,
        description,
        default_size=(resolution, resolution),
        listed_example={"num_classes": 1000, "in_channels": 3, "input_size": (resolution, resolution), "pretrained": False},
        preprocess=preprocess,
        train_defaults=BACKBONE_TRAIN_DEFAULTS,
        pretrained=True,
    )(factory)


def list_models() -> list:
    return sorted(_MODELS)


def get_model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise EdgeconvError(f"unknown model {name!r}; `edgeconv models` lists the available ones ({', '.join(list_models())})")
    return _MODELS[name]


def create_model(name: str, num_classes: int, in_channels: int, input_size: tuple, **kwargs):
    """Build model ``name`` for data with ``in_channels`` channels at ``input_size`` (H, W)."""
    entry = get_model_entry(name)
    return entry.builder(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **kwargs)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
