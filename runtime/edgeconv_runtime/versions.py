"""Versions of the libraries that change a bundle's or a benchmark's figures: recorded by export, training, bench and tune."""
from __future__ import annotations

import platform
from typing import Sequence


def library_versions(extra: Sequence[str] = ()) -> dict:
    """Versions that change the figures: this runtime and every inference library present (not imported), then
    the distributions named in ``extra`` (export and training add torch, onnx...); None for one not installed."""
    from importlib import metadata

    from . import __version__

    out = {"python": platform.python_version(), "edgeconv-runtime": __version__}
    for dist in ("edgeconv", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "openvino", "pillow",
                 *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
