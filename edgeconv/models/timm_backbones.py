"""timm as the model zoo: any timm classifier by name (``timm:NAME``), on the one backbone interface.

The timm network keeps its own definition and state-dict keys (under ``net.``); the wrapper adds
what training needs: pooled features from timm's ``forward_features``/``forward_head``, our
dropout before timm's classifier, and the base/head split over the network's blocks.
ImageNet weights come from the Hugging Face hub when it is reachable, or from ``--weights PATH``;
offline with no file is a one-line error naming the file to fetch, never a hang.
"""
from __future__ import annotations

import difflib
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError

from ._backbone import TransferBackbone
from ._registry import backbone_entry, register_namespace

DEFAULT_DROPOUT = 0.2  # before the classifier, as for the other backbones; timm's own dropout stays off
PROBE_TIMEOUT_S = 10
# what timm's forward_features runs, by network class: (stem layers, containers of blocks, layers after the blocks);
# timm's forward_head(pre_logits=True) then pools. The split into base and head needs this layout.
LAYOUTS = {
    "EfficientNet": (("conv_stem", "bn1"), ("blocks",), ("conv_head", "bn2")),
    "MobileNetV3": (("conv_stem", "bn1"), ("blocks",), ()),
    "ResNet": (("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4"), ()),
}


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise EdgeconvError("timm models need timm; run `pip install timm`") from exc
    return timm


def _flat(module: nn.Module) -> list:
    """The residual blocks inside nested Sequentials (timm's stages), in order."""
    if isinstance(module, nn.Sequential):
        return [b for child in module for b in _flat(child)]
    return [module]


class TimmBackbone(TransferBackbone):
    """A timm network as a transfer backbone: ``forward_features`` gives the pooled pre-logits (N, C)."""

    def __init__(self, net: nn.Module, name: str, dropout: float):
        super().__init__()
        self.net = net
        self.name = name
        self._dropout = nn.Dropout(dropout)
        self.num_features = net.get_classifier().in_features

    def forward_features(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def _layout(self) -> tuple:
        layout = LAYOUTS.get(type(self.net).__name__)
        if layout is None:
            raise EdgeconvError(f"fine-tuning {self.name} needs its base/head layout, which edgeconv knows for timm's "
                                f"{', '.join(LAYOUTS)} networks; use --strategy feature-extract or scratch")
        return layout

    def stem(self, x):
        for attr in self._layout()[0]:
            x = getattr(self.net, attr)(x)
        return x

    @property
    def _blocks(self) -> list:
        return [b for attr in self._layout()[1] for b in _flat(getattr(self.net, attr))]

    def pooled(self, x):
        for attr in self._layout()[2]:
            x = getattr(self.net, attr)(x)
        return self.net.forward_head(x, pre_logits=True)

    def pooled_parameters(self) -> list:
        """Everything after the blocks but the classifier (timm's head convs and norms)."""
        stem = [getattr(self.net, a) for a in self._layout()[0]]
        taken = {id(p) for m in [*stem, *self._blocks, self.get_classifier()] for p in m.parameters()}
        return [p for p in self.net.parameters() if id(p) not in taken]


class StaticSameConv2d(nn.Conv2d):
    """timm's Conv2dSame (TensorFlow "same" padding, computed on every call) fixed for one input size:
    a ZeroPad2d and a Conv2d, which export to plain constant Pad and Conv ops."""

    def __init__(self, conv: nn.Conv2d, in_hw: tuple):
        from timm.layers.padding import pad_same_arg

        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups, conv.bias is not None)
        self.weight, self.bias = conv.weight, conv.bias
        pad = pad_same_arg(list(in_hw), conv.kernel_size, conv.stride, conv.dilation)
        self.pad = nn.ZeroPad2d(tuple(pad)) if any(pad) else nn.Identity()

    def forward(self, x):
        return super().forward(self.pad(x))


def make_same_padding_static(net: nn.Module, input_size: tuple, in_channels: int) -> None:
    """Replace each of timm's dynamic-padding convs by its static twin for ``input_size`` (H, W)."""
    from timm.layers import Conv2dSame

    sizes = {}

    def record(mod, args) -> None:
        sizes[mod] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return
    was_training = net.training
    with torch.no_grad():
        net.eval()(torch.zeros(1, in_channels, *input_size))
    net.train(was_training)
    for h in hooks:
        h.remove()
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if child in sizes:
                setattr(parent, child_name, StaticSameConv2d(child, sizes[child]))


def hub_file(name: str) -> str:
    """Where timm's ImageNet weights for ``name`` live, for the user to fetch offline."""
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
    if cfg is not None and cfg.url:
        return cfg.url
    raise EdgeconvError(f"timm publishes no pretrained weights for {name}; train it with --strategy scratch")


def _local_weights(name: str, weights: Optional[str]) -> Optional[str]:
    """``--weights``, else the hub's cached copy, else None (download); offline is a one-line error."""
    if weights:
        if not Path(weights).is_file():
            raise EdgeconvError(f"--weights file not found: {weights}")
        return weights
    url = hub_file(name)
    import huggingface_hub

    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg.hf_hub_id:
        cached = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")
        if isinstance(cached, str):
            return cached
    try:  # one quick request: the hub client would retry an unreachable host for about a minute
        huggingface_hub.get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:
        raise EdgeconvError(f"cannot download ImageNet weights for timm:{name} (offline? {type(exc).__name__}); "
                            f"fetch {url} and pass --weights PATH") from exc
    return None


def _file_classes(name: str, path: str) -> int:
    """How many classes the classifier in a weights file has (1000 for ImageNet, fewer for a user's fine-tuned model)."""
    timm = _timm()
    try:
        sd = timm.models.load_state_dict(path)
    except Exception as exc:
        raise EdgeconvError(f"cannot read --weights {path}: {' '.join(str(exc).split())[:120]}") from exc
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.PretrainedCfg()
    w = sd.get(f"{cfg.classifier}.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else cfg.num_classes


def create_timm(name: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = False,
                weights: Optional[str] = None) -> nn.Module:
    """timm's network ``name`` with ``num_classes`` outputs, its "same" padding fixed for ``input_size``.

    A weights file keeps its own classifier when it has ``num_classes`` classes (a fine-tuned model);
    an ImageNet file's classifier is replaced."""
    timm = _timm()
    kwargs = {"in_chans": in_channels, "drop_rate": 0.0}
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:  # e.g. a ViT's position embeddings: built for this size
        kwargs["img_size"] = tuple(input_size)
    path = _local_weights(name, weights) if pretrained else None
    file_classes = _file_classes(name, weights) if pretrained and weights else num_classes
    if path:
        kwargs["pretrained_cfg_overlay"] = {"file": path, "num_classes": file_classes} if weights else {"file": path}
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=file_classes, **kwargs)
    except Exception as exc:  # a damaged or foreign file, a download cut short: all one line
        raise EdgeconvError(f"cannot load timm:{name} weights ({' '.join(str(exc).split())[:160]}); "
                            f"pass --weights PATH to a copy of {hub_file(name)}") from exc
    if file_classes != num_classes:
        net.reset_classifier(num_classes)
    make_same_padding_static(net, input_size, in_channels)
    return net


def build_timm(name: str, num_classes: int, in_channels: int, input_size: tuple, pretrained: bool = True,
               weights: Optional[str] = None, dropout: Optional[float] = None) -> TimmBackbone:
    net = create_timm(name, num_classes, in_channels, input_size, pretrained, weights)
    return TimmBackbone(net, f"timm:{name}", DEFAULT_DROPOUT if dropout is None else dropout)


def timm_preprocess(cfg) -> dict:
    """Our preprocessing policy from timm's pretrained_cfg."""
    return {"resize": "stretch" if cfg.crop_mode == "squash" else "shorter_center_crop", "crop_pct": cfg.crop_pct, "scale": 1 / 255,
            "mean": tuple(cfg.mean), "std": tuple(cfg.std), "channels": 3,
            "interpolation": "bicubic" if cfg.interpolation == "bicubic" else "bilinear"}


@lru_cache(maxsize=None)
def resolve(name: str):
    """The registry entry for ``timm:NAME``."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        raise EdgeconvError(f"unknown timm model {name!r}; " + (f"did you mean {', '.join(close)}?" if close else "`python -c 'import timm; print(timm.list_models())'` lists them"))
    cfg = timm.models.get_pretrained_cfg(name)
    has_weights = cfg is not None and bool(cfg.hf_hub_id or cfg.url)
    cfg = cfg or timm.models.PretrainedCfg()
    return backbone_entry(f"timm:{name}", f"timm {name}" + (", ImageNet weights from the Hugging Face hub or --weights PATH" if has_weights else ""),
                          partial(build_timm, name), cfg.input_size[-2:], timm_preprocess(cfg), pretrained=has_weights)


register_namespace("timm", resolve)
