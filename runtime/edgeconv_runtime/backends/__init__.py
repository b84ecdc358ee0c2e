"""Backends: one small protocol, looked up by name, each saying why it is unavailable.

``onnxruntime-cpu``, ``onnxruntime-cuda``, ``onnxruntime-tensorrt`` run ONNX files through
ONNX Runtime's execution providers; ``tensorrt`` runs a serialized engine through the
TensorRT Python API. GPU packages are imported only when a GPU backend is used.
"""
from __future__ import annotations

from typing import Optional

from ..errors import BackendUnavailable, EdgeconvError
from ..manifest import PRECISIONS, RUNTIME_PRECISIONS
from .base import Backend
from .openvino import OpenVinoBackend, openvino_status
from .ort import DEFAULT_BATCH_PROFILE, OrtBackend, ort_provider_status
from .trt import TensorRTBackend, tensorrt_status

BACKENDS = {
    "onnxruntime-cpu": (OrtBackend, "CPUExecutionProvider"),
    "onnxruntime-cuda": (OrtBackend, "CUDAExecutionProvider"),
    "onnxruntime-tensorrt": (OrtBackend, "TensorrtExecutionProvider"),
    "tensorrt": (TensorRTBackend, None),
    "openvino-cpu": (OpenVinoBackend, "openvino"),
}
# fastest first: what `auto` tries, falling through to the next when one cannot start
AUTO_ORDER = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
# OpenVINO on the CPU: `auto` puts it before onnxruntime-cpu only for the precisions where it measured faster
# (x86-64 with AVX-512, 2 threads, one quiet run each: benchmarks/results/backends.md, openvino_vs_ort_mnist.json):
# - bf16 runs on nothing else (efficientnet_lite0 1.68x ONNX Runtime FP32 at batch 1, 1.84x at 32);
# - int8: lite0 1.04x ONNX Runtime INT8 at batch 1, 1.12x at 32, but chollet_mnist 0.52x at batch 1 (p50 0.080 vs
#   0.042 ms) and 1.30x at 32: not consistently faster, so ONNX Runtime stays first;
# - fp32: lite0 0.96x / 0.90x, chollet_mnist 0.63x / 0.80x; fp16 is ONNX Runtime's (openvino-cpu does not run it).
OPENVINO_FIRST = ("bf16",)
# precisions a backend runs when not the bundle's fp32/fp16/int8; bf16 = the FP32 graph in OpenVINO's bf16 mode
BACKEND_PRECISIONS = {"openvino-cpu": ("fp32", "bf16", "int8")}
RUNTIME_ONLY_PRECISIONS = tuple(p for p in RUNTIME_PRECISIONS if p not in PRECISIONS)


def auto_order(precision: str = "fp32") -> tuple:
    """The backends `auto` tries for ``precision``, fastest first on this kind of machine; for a precision only some
    backends run (bf16), only those: `auto` then says why they cannot start, not why every other backend cannot either."""
    if precision in RUNTIME_ONLY_PRECISIONS:
        return tuple(n for n, runs in BACKEND_PRECISIONS.items() if precision in runs)
    cpu = ("openvino-cpu", "onnxruntime-cpu") if precision in OPENVINO_FIRST else ("onnxruntime-cpu", "openvino-cpu")
    return AUTO_ORDER[:-1] + cpu


def precision_problem(name: str, precision: str) -> Optional[str]:
    """Why backend ``name`` cannot run ``precision`` at all, or None."""
    runs = BACKEND_PRECISIONS.get(name)
    if runs is None and precision in RUNTIME_ONLY_PRECISIONS:
        able = ", ".join(n for n, p in BACKEND_PRECISIONS.items() if precision in p)
        return f"backend {name} does not run {precision}; {precision} runs on {able}"
    if runs is not None and precision not in runs:
        return f"backend {name} runs {', '.join(runs)}, not {precision}"
    return None


def _status(name: str, provider: Optional[str]) -> tuple:
    try:
        if name == "openvino-cpu":
            return openvino_status()
        return tensorrt_status() if name == "tensorrt" else ort_provider_status(provider)
    except Exception as exc:  # a GPU library that breaks while being probed marks its backend unavailable, nothing more
        text = str(exc).strip().splitlines()
        return False, f"probing it failed ({type(exc).__name__}: {(text[0] if text else '')[:200]})"


def available_backends() -> dict:
    """{name: (usable, reason)} for every registered backend on this machine."""
    return {name: _status(name, provider) for name, (_, provider) in BACKENDS.items()}


def create_backend(name: str, path: str, threads: Optional[int] = None, spin: bool = True, precision: str = "fp32",
                   input_name: Optional[str] = None, input_shape=None, batch_profile=None, cache_dir=None) -> Backend:
    """The backend ``name`` running ``path``; BackendUnavailable (one line) when it cannot run here.

    ``precision``, ``input_name``/``input_shape``, ``batch_profile`` (MIN, OPT, MAX; None: 1, 8, 32) and ``cache_dir`` configure
    ONNX Runtime's TensorRT provider (profile shapes, FP16/INT8, engine and timing caches); others ignore them.
    """
    if name not in BACKENDS:
        raise EdgeconvError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)} or auto")
    cls, provider = BACKENDS[name]
    ok, why = _status(name, provider)
    if not ok:
        raise BackendUnavailable(f"backend {name} is unavailable here: {why}")
    if provider is None:
        return cls(path, threads=threads)
    if name == "openvino-cpu":
        return cls(path, threads=threads, precision=precision)
    return cls(path, provider=provider, threads=threads, spin=spin, precision=precision, input_name=input_name, input_shape=input_shape,
               batch_profile=batch_profile or DEFAULT_BATCH_PROFILE, cache_dir=cache_dir)


__all__ = ["AUTO_ORDER", "BACKENDS", "auto_order", "precision_problem", "DEFAULT_BATCH_PROFILE", "Backend", "available_backends", "create_backend"]
