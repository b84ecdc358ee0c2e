"""Backends: one small protocol, looked up by name, each saying why it is unavailable.

``onnxruntime-cpu``, ``onnxruntime-cuda``, ``onnxruntime-tensorrt`` run ONNX files through
ONNX Runtime's execution providers; ``tensorrt`` runs a serialized engine through the
TensorRT Python API. GPU packages are imported only when a GPU backend is used.
"""
from __future__ import annotations

from typing import Optional

from ..errors import BackendUnavailable, EdgeconvError
from .base import Backend
from .ort import OrtBackend, ort_provider_status
from .trt import TensorRTBackend, tensorrt_status

BACKENDS = {
    "onnxruntime-cpu": (OrtBackend, "CPUExecutionProvider"),
    "onnxruntime-cuda": (OrtBackend, "CUDAExecutionProvider"),
    "onnxruntime-tensorrt": (OrtBackend, "TensorrtExecutionProvider"),
    "tensorrt": (TensorRTBackend, None),
}
# fastest first: what `auto` tries
AUTO_ORDER = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


def available_backends() -> dict:
    """{name: (usable, reason)} for every registered backend on this machine."""
    out = {}
    for name, (_, provider) in BACKENDS.items():
        out[name] = tensorrt_status() if name == "tensorrt" else ort_provider_status(provider)
    return out


def create_backend(name: str, path: str, threads: Optional[int] = None, spin: bool = True) -> Backend:
    if name not in BACKENDS:
        raise EdgeconvError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)} or auto")
    ok, why = available_backends()[name]
    if not ok:
        raise BackendUnavailable(f"backend {name} is unavailable here: {why}")
    cls, provider = BACKENDS[name]
    return cls(path, provider=provider, threads=threads, spin=spin) if provider else cls(path, threads=threads)


__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "available_backends", "create_backend"]
