"""A model's preprocessing for a data source: channels and size from the data, policy from the model."""
from __future__ import annotations

from typing import Optional

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess

from ._registry import get_model_entry


def build_preprocess(model_name: str, info, size: Optional[int], resize: Optional[str] = None) -> Preprocess:
    """The model's preprocessing for this data: channels and size from the data, policy from the model.

    ``resize`` overrides the model's resize policy: ``stretch`` keeps the whole picture (the
    book's Keras pipeline), ``shorter_center_crop`` keeps the aspect ratio and crops the centre.
    """
    entry = get_model_entry(model_name)
    p = dict(entry.preprocess)
    if resize:
        p["resize"] = resize
    hw = _input_size(entry, info, size)
    if info.kind == "arrays" and tuple(hw) != tuple(info.native_size):
        raise EdgeconvError(f"{info.path} holds {info.native_size[0]}x{info.native_size[1]} images; {model_name} at {hw} needs image folders (drop --size)")
    ch = entry.preprocess.get("channels", info.channels)
    mean = p.get("mean", (0.0,) * ch)
    std = p.get("std", (1.0,) * ch)
    return Preprocess(size=hw, channels=ch, resize=p.get("resize", "stretch"), crop_pct=p.get("crop_pct", 0.875), scale=p.get("scale", 1 / 255), mean=mean, std=std,
                      interpolation=p.get("interpolation", "bilinear"), jpeg_draft=True)


def _input_size(entry, info, size: Optional[int]) -> tuple:
    """--size if given, else the data's own size for a model without one, else the model's."""
    if size:
        return (size, size)
    if info.native_size is not None and entry.default_size is None:
        return info.native_size
    if entry.default_size is not None:
        return entry.default_size
    return info.native_size or (150, 150)
