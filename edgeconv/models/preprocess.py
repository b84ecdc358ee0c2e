"""A model's preprocessing for a data source: channels and size from the data, policy from the model."""
from __future__ import annotations

from typing import Optional

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess, PreprocessPolicy, resolve_preprocess

from ._registry import get_model_entry

__all__ = ["PreprocessPolicy", "build_preprocess", "resolve_preprocess"]


def build_preprocess(model_name: str, info, size: Optional[int], resize: Optional[str] = None) -> Preprocess:
    """The model's preprocessing for this data (``resolve_preprocess``): channels and size from the data, policy from the model.

    ``resize`` overrides the model's resize policy: ``stretch`` keeps the whole picture (the
    book's Keras pipeline), ``shorter_center_crop`` keeps the aspect ratio and crops the centre.
    """
    pre = resolve_preprocess(get_model_entry(model_name), info, {"size": (size, size) if size else None, "resize": resize})
    if info.kind == "arrays" and tuple(pre.size) != tuple(info.native_size):
        raise EdgeconvError(f"{info.path} holds {info.native_size[0]}x{info.native_size[1]} images; {model_name} at {pre.size} "
                            "needs image folders (drop --size)")
    return pre
