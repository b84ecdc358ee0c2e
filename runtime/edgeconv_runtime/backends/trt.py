"""Native TensorRT engines through the TensorRT Python API and cuda-python (GPU, Jetson)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgeconvError
from ..gpu import gpu_info
from .base import Backend

HINT = "pip install edgeconv-runtime[tensorrt] on a machine with an NVIDIA GPU"


def tensorrt_status() -> tuple:
    if gpu_info() is None:
        return False, "no NVIDIA GPU found"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, f"the tensorrt package is not installed ({HINT})"
    try:
        _cudart()
    except ImportError:
        return False, f"cuda-python is not installed ({HINT})"
    return True, "ok"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeconvError(f"CUDA call failed with error {err}")
    return rest[0] if len(rest) == 1 else rest


def check_engine_compatible(engine_path: Path) -> dict:
    """Compare the engine's sidecar with this machine; refuse a mismatch with both named."""
    sidecar_path = Path(engine_path).with_suffix(".json")
    if not sidecar_path.is_file():
        raise EdgeconvError(f"{Path(engine_path).name} has no sidecar {sidecar_path.name}; rebuild it with `edgeconv export --format tensorrt`")
    side = json.loads(sidecar_path.read_text())
    import tensorrt as trt

    gpu = gpu_info() or {}
    if side.get("tensorrt_version") != trt.__version__:
        raise EdgeconvError(
            f"engine {Path(engine_path).name} was built with TensorRT {side.get('tensorrt_version')} but this machine has {trt.__version__}; "
            "rebuild it here from the bundle's ONNX (edgeconv export --format tensorrt)"
        )
    if side.get("compute_capability") and gpu.get("compute_capability") and side["compute_capability"] != gpu["compute_capability"]:
        raise EdgeconvError(
            f"engine {Path(engine_path).name} was built for {side.get('gpu_name')} (compute {side['compute_capability']}) but this GPU is "
            f"{gpu.get('name')} (compute {gpu['compute_capability']}); rebuild it here from the bundle's ONNX"
        )
    return side


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str, threads: Optional[int] = None):
        import tensorrt as trt

        self.side = check_engine_compatible(Path(path))
        self.cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EdgeconvError(f"TensorRT could not deserialize {Path(path).name}; rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.max_batch = int(self.side["profile"]["max"][0])
        self._buffers = {}

    def _buffer(self, key: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(key, (None, 0))
        if size < nbytes:
            if ptr is not None:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self._buffers[key] = (ptr, nbytes)
        return self._buffers[key][0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        if len(x) > self.max_batch:  # the engine's profile caps the batch: run in slices
            return np.concatenate([self.infer(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        cr = self.cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(self.input_name, x.shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = np.empty(out_shape, dtype=self.out_dtype)
        d_in = self._buffer("in", x.nbytes)
        d_out = self._buffer("out", out.nbytes)
        _check(cr.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, cr.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        if not self.context.execute_async_v3(self.stream):
            raise EdgeconvError("TensorRT execution failed; see the TensorRT log")
        _check(cr.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, cr.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cr.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.side.get("tensorrt_version"), "gpu": self.side.get("gpu_name"), "precision": self.side.get("precision")}
