"""torchvision backbones (mobilenet_v3_small/large, resnet18, efficientnet_b0) for transfer learning.

Weights come through torchvision's weights API: downloaded when the user is online, or read
from ``--weights PATH``. Offline with no file is a one-line error, never a hang.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError

from ._backbone import TransferBackbone
from ._registry import register_backbone

DOWNLOAD_TIMEOUT_S = 20

# name: (torchvision weights enum name, crop size)
BACKBONES = {
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", 224),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", 224),
    "resnet18": ("ResNet18_Weights", 224),
    "efficientnet_b0": ("EfficientNet_B0_Weights", 224),
}


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


def _state_dict(name: str, weights: Optional[str]) -> dict:
    import torchvision

    if weights:
        if not Path(weights).is_file():
            raise EdgeconvError(f"--weights file not found: {weights}")
        try:
            return torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EdgeconvError(f"cannot read --weights {weights}: {str(exc).splitlines()[0][:120]}") from exc
    enum = getattr(torchvision.models, BACKBONES[name][0]).IMAGENET1K_V1
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


def build_torchvision(name: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = True,
                      weights: Optional[str] = None, dropout: Optional[float] = None) -> Backbone:
    import torchvision

    if in_channels != 3:
        raise EdgeconvError(f"{name} takes RGB images; this data has {in_channels} channel(s)")
    net = torchvision.models.get_model(name, weights=None)
    if pretrained:
        net.load_state_dict(_state_dict(name, weights))
    if name.startswith("resnet"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = [net.layer1, net.layer2, net.layer3, net.layer4]
        neck = nn.Sequential(net.avgpool, nn.Flatten(1))
        fc, drop = net.fc, 0.0
    elif name.startswith("mobilenet_v3"):
        stem, blocks = net.features[0], list(net.features[1:])
        # keep the pre-logits layers (Linear + Hardswish) in the neck; the dropout and last Linear become ours
        neck = nn.Sequential(net.avgpool, nn.Flatten(1), net.classifier[0], net.classifier[1])
        fc, drop = net.classifier[3], 0.2
    else:  # efficientnet_b0
        stem, blocks = net.features[0], list(net.features[1:])
        neck = nn.Sequential(net.avgpool, nn.Flatten(1))
        fc, drop = net.classifier[1], 0.2
    model = Backbone(stem, blocks, neck, fc, drop if dropout is None else dropout)
    if num_classes != fc.out_features:
        model._fc = nn.Linear(fc.in_features, num_classes)
    return model


_PRE = {"resize": "shorter_center_crop", "crop_pct": 0.875, "scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "channels": 3}
for _name, (_enum, _res) in BACKBONES.items():
    register_backbone(_name, f"torchvision {_name}, ImageNet weights via torchvision (online) or --weights PATH", build_torchvision, _res, _PRE)
