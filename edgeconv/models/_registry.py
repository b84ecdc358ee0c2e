"""One registry for every model: adding a model is one decorated function."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import PreprocessPolicy

_MODELS: dict = {}
_NAMESPACES: dict = {}  # prefix: resolve(NAME) -> ModelEntry
_LAZY: dict = {}  # name: make() -> ModelEntry, made on first use (e.g. an entry that reads torchvision's weights)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    description: str
    default_size: Optional[tuple] = None  # (H, W) for image folders; None: the data's native size
    listed_example: dict = field(default_factory=dict)  # the config `edgeconv models` counts parameters at
    preprocess: PreprocessPolicy = field(default_factory=PreprocessPolicy)  # what the model fixes (a dict is read as one)
    train_defaults: dict = field(default_factory=dict)
    pretrained: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "preprocess", PreprocessPolicy.of(self.preprocess, f"model {self.name!r} preprocess"))


def _check_name(name: str) -> None:
    if name in _MODELS or name in _LAZY:
        by = _MODELS[name].builder.__module__ if name in _MODELS else _LAZY[name].__module__
        raise ValueError(f"model {name!r} is already registered (by {by}); pick another name")
    if ":" in name:
        raise ValueError(f"model name {name!r}: ':' is reserved for namespaces such as timm:NAME")


def _add(entry: ModelEntry) -> None:
    _check_name(entry.name)
    _MODELS[entry.name] = entry


def register_lazy(name: str, make: Callable) -> None:
    """Register model ``name`` whose entry ``make()`` builds on first use (it may import a hub's package to read its weights)."""
    _check_name(name)
    _LAZY[name] = make


def register_model(
    name: str,
    description: str,
    default_size=None,
    listed_example=None,
    preprocess=None,
    train_defaults=None,
    pretrained=False,
):
    """Decorator: register ``fn(num_classes, in_channels, input_size, **kwargs)`` as model ``name`` (names are unique)."""

    def wrap(fn):
        _add(ModelEntry(name, fn, description, default_size, listed_example or {}, preprocess or {}, train_defaults or {}, pretrained))
        return fn

    return wrap


BACKBONE_TRAIN_DEFAULTS = {"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "augment_preset": "light"}


def backbone_entry(name: str, description: str, build: Callable, size: tuple, preprocess, pretrained: bool = True) -> ModelEntry:
    """The entry of a backbone built by ``build(num_classes, in_channels, input_size, pretrained, weights, dropout)``."""
    size = tuple(size)
    return ModelEntry(name, build, description, default_size=size,
                      listed_example={"num_classes": 1000, "in_channels": 3, "input_size": size, "pretrained": False},
                      preprocess=preprocess, train_defaults=BACKBONE_TRAIN_DEFAULTS, pretrained=pretrained)


def register_backbone(name: str, description: str, build: Callable, resolution: int, preprocess) -> None:
    """Register a pretrained backbone: ``build(name, num_classes, in_channels, input_size, pretrained, weights, dropout)``."""
    _add(backbone_entry(name, description, partial(build, name), (resolution, resolution), preprocess))


def register_namespace(prefix: str, resolve: Callable) -> None:
    """Models named ``PREFIX:NAME`` (e.g. timm:resnet18): ``resolve(NAME)`` gives their entry, or raises EdgeconvError."""
    if prefix in _NAMESPACES:
        raise ValueError(f"model namespace {prefix!r} is already registered")
    _NAMESPACES[prefix] = resolve


def list_models() -> list:
    """The registered names; any ``timm:NAME`` and ``torchvision:NAME`` resolve as well."""
    return sorted({*_MODELS, *_LAZY})


def get_model_entry(name: str) -> ModelEntry:
    if name in _MODELS:
        return _MODELS[name]
    if name in _LAZY:
        return _MODELS.setdefault(name, _LAZY[name]())
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _NAMESPACES:
        return _NAMESPACES[prefix](rest)
    namespaces = ", ".join(f"{p}:NAME" for p in sorted(_NAMESPACES))
    raise EdgeconvError(f"unknown model {name!r}; `edgeconv models` lists the available ones ({', '.join(list_models())}; also {namespaces})")


def create_model(name: str, num_classes: int, in_channels: int, input_size: tuple, **kwargs):
    """Build model ``name`` for data with ``in_channels`` channels at ``input_size`` (H, W)."""
    entry = get_model_entry(name)
    return entry.builder(num_classes=num_classes, in_channels=in_channels, input_size=tuple(input_size), **kwargs)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
