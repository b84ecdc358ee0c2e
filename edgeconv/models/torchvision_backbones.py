"""torchvision backbones for transfer learning: four registered names (mobilenet_v3_small/large,
resnet18, efficientnet_b0) and any torchvision classifier by name (``torchvision:NAME``).

Weights come through torchvision's weights API: downloaded when the user is online, or read
from ``--weights PATH``. Offline with no file is a one-line error, never a hang.
"""
from __future__ import annotations

import socket
from dataclasses import replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import PreprocessPolicy

from ._backbone import TransferBackbone
from ._registry import backbone_entry, register_lazy, register_namespace

DOWNLOAD_TIMEOUT_S = 20

# name: (torchvision weights enum name, crop size); their preprocessing is read from the enum's IMAGENET1K_V1 transforms
BACKBONES = {
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", 224),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", 224),
    "resnet18": ("ResNet18_Weights", 224),
    "efficientnet_b0": ("EfficientNet_B0_Weights", 224),
}
SUPPORTED_LAYOUTS = "ResNet/ResNeXt, RegNet and features/avgpool/classifier networks (MobileNet, EfficientNet, ConvNeXt, VGG, AlexNet)"


class Backbone(TransferBackbone):
    """A torchvision network cut into ``stem``, ``blocks`` (a list) and a pooled ``neck``, plus ``_fc``."""

    def __init__(self, stem: nn.Module, blocks: list, neck: nn.Module, fc: nn.Linear, dropout: float):
        super().__init__()
        self.stem = stem
        self._blocks = nn.ModuleList(blocks)
        self.neck = neck
        self._dropout = nn.Dropout(dropout)
        self._fc = fc
        self.num_features = fc.in_features

    def pooled(self, x):
        return self.neck(x)

    def pooled_parameters(self) -> list:
        return list(self.neck.parameters())


def _state_dict(name: str, weights: Optional[str], enum) -> dict:
    if weights:
        if not Path(weights).is_file():
            raise EdgeconvError(f"--weights file not found: {weights}")
        try:
            return torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EdgeconvError(f"cannot read --weights {weights}: {str(exc).splitlines()[0][:120]}") from exc
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, timeouts, DNS failures: all mean "not reachable"
        fname = enum.url.rsplit("/", 1)[-1]
        raise EdgeconvError(
            f"cannot download ImageNet weights for {name} (offline? {type(exc).__name__}); pass --weights PATH to a local copy of {fname}"
        ) from exc
    finally:
        socket.setdefaulttimeout(old)


def _cut(name: str, net: nn.Module) -> tuple:
    """(stem, blocks, neck, classifier, its dropout) of a torchvision classifier."""
    if hasattr(net, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return stem, [net.layer1, net.layer2, net.layer3, net.layer4], nn.Sequential(net.avgpool, nn.Flatten(1)), net.fc, 0.0
    if hasattr(net, "trunk_output"):  # RegNet
        return net.stem, list(net.trunk_output), nn.Sequential(net.avgpool, nn.Flatten(1)), net.fc, 0.0
    head = list(getattr(net, "classifier", []))
    if hasattr(net, "features") and hasattr(net, "avgpool") and head and isinstance(head[-1], nn.Linear):
        # the pre-logits layers (e.g. MobileNetV3's Linear + Hardswish) join the neck; the dropout and last Linear become ours
        pre = [m for m in head[:-1] if not isinstance(m, nn.Dropout)]
        flatten = [] if any(isinstance(m, nn.Flatten) for m in pre) else [nn.Flatten(1)]
        drop = next((m.p for m in head if isinstance(m, nn.Dropout)), 0.0)
        return net.features[0], list(net.features[1:]), nn.Sequential(net.avgpool, *flatten, *pre), head[-1], drop
    raise EdgeconvError(f"edgeconv cannot split {name} into base and head; it knows {SUPPORTED_LAYOUTS}")


def _load(name: str, net: nn.Module, sd: dict) -> None:
    """Load ``sd`` into ``net``; a file whose classifier has other classes (a fine-tuned model) brings its own."""
    fc = _cut(name, net)[3]
    key = next(k for k, p in net.named_parameters() if p is fc.weight)
    if key in sd and sd[key].shape[0] != fc.out_features:
        parent, _, attr = key.rpartition(".")[0].rpartition(".")
        setattr(net.get_submodule(parent), attr, nn.Linear(fc.in_features, sd[key].shape[0]))
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:  # torch lists every bad tensor over many lines: keep the start
        raise EdgeconvError(f"the weights do not fit {name} ({' '.join(str(exc).split())[:160]}); pass the file of this architecture") from exc


def build_torchvision(name: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = True,
                      weights: Optional[str] = None, dropout: Optional[float] = None, enum=None) -> Backbone:
    """torchvision's ``name`` with ImageNet weights ``enum`` (default: the registered name's IMAGENET1K_V1)."""
    import torchvision

    if in_channels != 3:
        raise EdgeconvError(f"{name} takes RGB images; this data has {in_channels} channel(s)")
    net = torchvision.models.get_model(name, weights=None)
    if pretrained:
        _load(name, net, _state_dict(name, weights, enum or getattr(torchvision.models, BACKBONES[name][0]).IMAGENET1K_V1))
    stem, blocks, neck, fc, drop = _cut(name, net)
    model = Backbone(stem, blocks, neck, fc, drop if dropout is None else dropout)
    if num_classes != fc.out_features:
        model._fc = nn.Linear(fc.in_features, num_classes)
    return model


def weights_preprocess(enum) -> PreprocessPolicy:
    """The preprocessing torchvision's weights ``enum`` were evaluated with, read from its ``transforms()``."""
    t = enum.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return PreprocessPolicy(size=(crop, crop), channels=3, resize="shorter_center_crop", crop_pct=crop / resize, scale=1 / 255,
                            mean=tuple(t.mean), std=tuple(t.std), interpolation="bicubic" if t.interpolation.value == "bicubic" else "bilinear")


def weights_entry(entry_name: str, name: str, enum, description: str, build: Callable):
    """The registry entry of torchvision's ``name`` with weights ``enum``: their size and preprocessing."""
    pre = weights_preprocess(enum)
    return backbone_entry(entry_name, description, build, pre.size, replace(pre, size=None))  # the size is the entry's default_size


@lru_cache(maxsize=None)
def resolve(name: str):
    """The registry entry for ``torchvision:NAME``: its DEFAULT weights and their preprocessing."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise EdgeconvError(f"unknown torchvision classifier {name!r}; torchvision.models.list_models() lists them")
    enum = torchvision.models.get_model_weights(name).DEFAULT
    return weights_entry(f"torchvision:{name}", name, enum, f"torchvision {name}, ImageNet weights ({enum}) online or --weights PATH",
                         partial(build_torchvision, name, enum=enum))


def short_entry(name: str):
    """The entry of a registered short name (resnet18, ...): its IMAGENET1K_V1 weights and their own transforms."""
    import torchvision

    enum = getattr(torchvision.models, BACKBONES[name][0]).IMAGENET1K_V1
    return weights_entry(name, name, enum, f"torchvision {name}, ImageNet weights via torchvision (online) or --weights PATH",
                         partial(build_torchvision, name))


for _name in BACKBONES:
    register_lazy(_name, partial(short_entry, _name))
register_namespace("torchvision", resolve)
