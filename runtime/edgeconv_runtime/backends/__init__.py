"""Backends: one class per backend, one registry built from what each class declares.

``onnxruntime-cpu``, ``onnxruntime-cuda``, ``onnxruntime-tensorrt`` run ONNX files through
ONNX Runtime's execution providers; ``tensorrt`` runs a serialized engine through the
TensorRT Python API; ``openvino-cpu`` runs the ONNX files through OpenVINO's CPU plugin.
GPU packages are imported only when a GPU backend is used.

Adding a backend: one module with a ``Backend`` subclass declaring its name, precisions, artifact, Triton platform,
extra and `auto` rank (see base.py), implementing ``status()``/``create()``/``io_shapes()``/``infer()``/``close()``;
then one line in ``REGISTERED`` below. Everything else (``--backend`` help, `auto`'s order, precision checks,
artifact choice, the v2 platform) reads the registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import BackendUnavailable, EdgeconvError
from ..manifest import PRECISIONS, RUNTIME_PRECISIONS
from .base import Backend
from .openvino import OPENVINO_FIRST, OpenVinoBackend
from .ort import DEFAULT_BATCH_PROFILE, OrtCpuBackend, OrtCudaBackend, OrtTensorrtBackend
from .trt import TensorRTBackend

# the registry: every backend, by name (the order --backend help and `backends` list them in)
REGISTERED = (OrtCpuBackend, OrtCudaBackend, OrtTensorrtBackend, TensorRTBackend, OpenVinoBackend)
REGISTRY = {cls.name: cls for cls in REGISTERED}

# ---- derived views, kept under their old names (code and tests import them)
BACKENDS = {cls.name: (cls, getattr(cls, "provider", None)) for cls in REGISTERED}
# fastest first: what `auto` tries for fp32, falling through to the next when one cannot start
AUTO_ORDER = tuple(sorted((n for n, c in REGISTRY.items() if not c.precisions), key=lambda n: REGISTRY[n].auto_rank))
# precisions a backend runs when not the bundle's fp32/fp16/int8; bf16 = the FP32 graph in OpenVINO's bf16 mode
BACKEND_PRECISIONS = {n: c.precisions for n, c in REGISTRY.items() if c.precisions}
RUNTIME_ONLY_PRECISIONS = tuple(p for p in RUNTIME_PRECISIONS if p not in PRECISIONS)
CPU_BACKENDS = tuple(n for n, c in REGISTRY.items() if c.cpu)  # where INT8 sums depend on the CPU's instructions


def backend_class(name: str) -> type:
    """The class registered as ``name``; EdgeconvError (one line) for a name not registered."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise EdgeconvError(f"unknown backend {name!r}; use one of {', '.join(REGISTRY)} or auto")
    return cls


def auto_order(precision: str = "fp32") -> tuple:
    """The backends `auto` tries for ``precision``, fastest first on this kind of machine; for a precision only some
    backends run (bf16), only those: `auto` then says why they cannot start, not why every other backend cannot either."""
    names = [n for n, c in REGISTRY.items() if precision not in RUNTIME_ONLY_PRECISIONS or precision in (c.precisions or ())]
    return tuple(sorted(names, key=lambda n: REGISTRY[n].auto_rank_for(precision)))


def precision_problem(name: str, precision: str) -> Optional[str]:
    """Why backend ``name`` cannot run ``precision`` at all, or None."""
    runs = REGISTRY[name].precisions if name in REGISTRY else None
    if runs is None and precision in RUNTIME_ONLY_PRECISIONS:
        able = ", ".join(n for n, p in BACKEND_PRECISIONS.items() if precision in p)
        return f"backend {name} does not run {precision}; {precision} runs on {able}"
    if runs is not None and precision not in runs:
        return f"backend {name} runs {', '.join(runs)}, not {precision}"
    return None


def triton_platform(name: Optional[str]) -> str:
    """Triton's platform name for backend ``name`` (v2 model metadata); ONNX Runtime's for one not registered."""
    return REGISTRY[name].triton_platform if name in REGISTRY else Backend.triton_platform


def backend_for_file(path) -> Optional[str]:
    """The backend `auto` runs a bare file on, from its suffix (.onnx: onnxruntime-cpu, .plan: tensorrt), or None."""
    suffix = Path(path).suffix
    return next((n for n, c in REGISTRY.items() if suffix in c.file_suffixes), None)


def _status(name: str, provider: Optional[str] = None) -> tuple:
    try:
        return REGISTRY[name].status()
    except Exception as exc:  # a GPU library that breaks while being probed marks its backend unavailable, nothing more
        text = str(exc).strip().splitlines()
        return False, f"probing it failed ({type(exc).__name__}: {(text[0] if text else '')[:200]})"


def available_backends() -> dict:
    """{name: (usable, reason)} for every registered backend on this machine."""
    return {name: _status(name) for name in REGISTRY}


def create_backend(name: str, path: str, threads: Optional[int] = None, spin: bool = True, precision: str = "fp32",
                   input_name: Optional[str] = None, input_shape=None, batch_profile=None, cache_dir=None,
                   tuning: Optional[dict] = None) -> Backend:
    """The backend ``name`` running ``path``; BackendUnavailable (one line) when it cannot run here.

    ``precision``, ``input_name``/``input_shape``, ``batch_profile`` (MIN, OPT, MAX; None: 1, 8, 32) and ``cache_dir`` configure
    ONNX Runtime's TensorRT provider (profile shapes, FP16/INT8, engine and timing caches); others ignore them.
    ``tuning``: the backend's own options (its ``tuning_keys``: what `tune` measures and a device profile records).
    """
    cls = backend_class(name)
    tuning = cls.check_tuning(tuning)
    ok, why = _status(name)
    if not ok:
        raise BackendUnavailable(f"backend {name} is unavailable here: {why}")
    extra = {"tuning": tuning} if tuning else {}
    return cls.create(path, threads=threads, spin=spin, precision=precision, input_name=input_name, input_shape=input_shape,
                      batch_profile=batch_profile, cache_dir=cache_dir, **extra)


__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_PRECISIONS", "CPU_BACKENDS", "REGISTRY", "auto_order", "backend_class", "backend_for_file",
           "precision_problem", "triton_platform", "DEFAULT_BATCH_PROFILE", "Backend", "available_backends", "create_backend"]
