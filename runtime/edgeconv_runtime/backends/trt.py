"""Native TensorRT engines through the TensorRT Python API and cuda-python (GPU, Jetson).

Importing ``tensorrt`` or ``cuda`` loads native libraries (libnvinfer, libcudart): a broken install
raises OSError or RuntimeError, not only ImportError. Every such failure marks the backend unavailable
with its reason; it never reaches the CPU backend or ``edgeconv-runtime backends``.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import BackendUnavailable, EdgeconvError, first_line
from ..gpu import gpu_info
from ..manifest import ENGINE_SUFFIXES
from .base import Backend

HINT = "pip install 'edgeconv-runtime[tensorrt-cu12]' on a machine with an NVIDIA GPU, or JetPack's system TensorRT on a Jetson"
REBUILD = "rebuild it here from the bundle's ONNX: edgeconv-runtime build-engine BUNDLE"
# what a CUDA runtime error usually means for someone running a model, and what to do
_CUDA_HINTS = {
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than this CUDA runtime; update the driver or install the cuda-python/TensorRT build for the driver's CUDA version",
    "cudaErrorNoDevice": "CUDA sees no GPU; check the driver and CUDA_VISIBLE_DEVICES",
    "cudaErrorMemoryAllocation": "out of GPU memory; close other GPU programs or use a smaller batch",
}



def _import_tensorrt() -> tuple:
    """(tensorrt module, None), or (None, why it cannot be used)."""
    try:
        import tensorrt
    except ImportError as exc:
        if getattr(exc, "name", None) == "tensorrt":
            return None, f"the tensorrt package is not installed ({HINT})"
        return None, f"the tensorrt package is installed but cannot load ({type(exc).__name__}: {first_line(exc)}); reinstall TensorRT for this CUDA version"
    except Exception as exc:  # libnvinfer or libcudart missing or mismatched: OSError, RuntimeError, ...
        return None, f"the tensorrt package is installed but cannot load ({type(exc).__name__}: {first_line(exc)}); reinstall TensorRT for this CUDA version"
    return tensorrt, None


def _import_cudart() -> tuple:
    """(cuda-python's runtime module, None), or (None, why it cannot be used)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        return cudart, None
    except ImportError:
        pass
    except Exception as exc:
        return None, f"cuda-python is installed but cannot load ({type(exc).__name__}: {first_line(exc)}); reinstall it for this CUDA version"
    try:
        from cuda import cudart  # older cuda-python

        return cudart, None
    except ImportError:
        return None, f"cuda-python is not installed ({HINT})"
    except Exception as exc:
        return None, f"cuda-python is installed but cannot load ({type(exc).__name__}: {first_line(exc)}); reinstall it for this CUDA version"


def tensorrt_status() -> tuple:
    """(usable, reason) of the native TensorRT backend on this machine."""
    return _status_with_gpu(gpu_info())


def _status_with_gpu(gpu: Optional[dict]) -> tuple:
    if gpu is None:
        return False, "no NVIDIA GPU found"
    trt, why = _import_tensorrt()
    if trt is None:
        return False, why
    cudart, why = _import_cudart()
    if cudart is None:
        return False, why
    return True, "ok"


def _cudart():
    cudart, why = _import_cudart()
    if cudart is None:
        raise BackendUnavailable(f"backend tensorrt is unavailable here: {why}")
    return cudart


def cuda_error_name(cudart, err) -> str:
    ok, name = cudart.cudaGetErrorName(err)
    if ok != cudart.cudaError_t.cudaSuccess or not name:
        return str(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def _check(result, what: str = "CUDA call", cudart=None):
    """cuda-python calls return (cudaError_t, *values): raise on an error as NVIDIA's samples do, else return the value(s)."""
    cudart = cudart or _cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if not isinstance(err, cudart.cudaError_t):
        raise TypeError(f"{what} returned {err!r}, not a cudaError_t")
    if err != cudart.cudaError_t.cudaSuccess:
        name = cuda_error_name(cudart, err)
        hint = _CUDA_HINTS.get(name, "check the NVIDIA driver and CUDA installation")
        raise EdgeconvError(f"{what} failed with {name} ({int(err)}): {hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def engine_mismatch(sidecar: dict, trt_version: str, gpu: Optional[dict], engine_name: str = "engine") -> Optional[str]:
    """One line saying why an engine described by ``sidecar`` cannot run here, or None when it can.

    An engine only deserializes on the TensorRT version and GPU architecture (compute capability) it was built for.
    """
    built = sidecar.get("tensorrt_version")
    if built != trt_version:
        return f"{engine_name} was built with TensorRT {built} but this machine has TensorRT {trt_version}; {REBUILD}"
    gpu = gpu or {}
    cc_built, cc_here = sidecar.get("compute_capability"), gpu.get("compute_capability")
    if cc_built and cc_here and str(cc_built) != str(cc_here):
        return (f"{engine_name} was built for {sidecar.get('gpu_name')} (compute {cc_built}) but this GPU is {gpu.get('name')} "
                f"(compute {cc_here}); {REBUILD}")
    return None


def _check_sidecar_hash(sidecar_path: Path, raw: bytes) -> None:
    """Refuse a sidecar whose bytes differ from the sha256 in the manifest of the bundle it sits in (when it lists one)."""
    import hashlib

    from ..manifest import MANIFEST_NAME, hash_mismatch, read_manifest

    root = sidecar_path.parent
    if not (root / MANIFEST_NAME).is_file():
        return  # an engine outside a bundle: nothing to check against
    expected = (read_manifest(root).files or {}).get(sidecar_path.name)
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        raise hash_mismatch(sidecar_path.name, root)


def read_sidecar(engine_path: Path) -> dict:
    """The JSON written beside an engine by the builder; refused in one line when missing or unreadable."""
    engine_path = Path(engine_path)
    sidecar_path = engine_path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise BackendUnavailable(f"{engine_path.name} has no sidecar {sidecar_path.name} saying where it was built; {REBUILD}")
    try:
        raw = sidecar_path.read_bytes()
        _check_sidecar_hash(sidecar_path, raw)
        side = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"{sidecar_path.name} beside {engine_path.name} is not readable JSON ({first_line(exc)[:120]}); {REBUILD}") from exc
    if not isinstance(side, dict):
        raise BackendUnavailable(f"{sidecar_path.name} beside {engine_path.name} holds {type(side).__name__}, not an object; {REBUILD}")
    return side


def check_engine_compatible(engine_path: Path, trt_version: Optional[str] = None) -> dict:
    """Compare the engine's sidecar with this machine; refuse a mismatch with both named. Returns the sidecar."""
    side = read_sidecar(engine_path)
    if trt_version is None:
        trt, why = _import_tensorrt()
        if trt is None:
            raise BackendUnavailable(f"backend tensorrt is unavailable here: {why}")
        trt_version = trt.__version__
    problem = engine_mismatch(side, str(trt_version), gpu_info(), f"engine {Path(engine_path).name}")
    if problem:
        raise BackendUnavailable(problem)
    return side


def _host_array(ptr: int, nbytes: int, dtype) -> np.ndarray:
    """A numpy view of ``nbytes`` of (pinned) host memory at ``ptr``."""
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)


def native_handle_getter():
    """How to turn a cuda-python object (the stream) into the address TensorRT takes: cuda-bindings 12.9.1 and 13.0
    deprecate ``int(obj)`` in favour of ``cuda.bindings.utils.get_cuda_native_handle``; older releases have only int."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except Exception:  # cuda-bindings before 12.9.1, or the old `cuda.cudart` layout
        return int
    return get_cuda_native_handle


class TensorRTBackend(Backend):
    """A serialized engine run through TensorRT's Python API, with pinned host buffers and one CUDA stream.

    The buffers and the execution context belong to one caller at a time (serve runs inference on one thread).
    """

    name = "tensorrt"
    artifact_format = "tensorrt"  # a serialized engine (build-engine), not an ONNX graph
    artifact_variant = "tensorrt"
    triton_platform = "tensorrt_plan"
    extra = "tensorrt-cu12"
    auto_rank = 10.0
    file_suffixes = ENGINE_SUFFIXES

    @classmethod
    def status(cls) -> tuple:
        return tensorrt_status()

    # io_shapes(): None, an engine is built from the bundle's own graph and gated against its reference outputs

    def __init__(self, path: str, threads: Optional[int] = None):
        self.context = self.engine = self.runtime = self.stream = None
        self._buffers = {}  # "in"/"out" -> (host ptr, device ptr, bytes), reused while large enough
        self.path = Path(path)
        trt, why = _import_tensorrt()
        if trt is None:
            raise BackendUnavailable(f"backend tensorrt is unavailable here: {why}")
        self.cudart = _cudart()
        self.side = check_engine_compatible(self.path, trt.__version__)
        try:
            self._open(trt)
        except BaseException:
            self.close()
            raise

    def _open(self, trt) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {self.path.name} (see TensorRT's log above); {REBUILD}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgeconvError(f"TensorRT could not create an execution context for {self.path.name} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.profile = self._profile()
        self.max_batch = self.profile[2][0]
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate", self.cudart)
        self.stream_handle = int(native_handle_getter()(self.stream))

    def _profile(self) -> tuple:
        """(min, opt, max) input shapes of profile 0, as the engine records them (else the sidecar, else its fixed shape)."""
        try:
            shapes = tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            if len(shapes) == 3 and all(shapes):
                return shapes
        except Exception:  # an engine without an optimization profile (fixed shapes)
            pass
        prof = self.side.get("profile") or {}
        if all(isinstance(prof.get(k), list) for k in ("min", "opt", "max")):
            return tuple(tuple(int(d) for d in prof[k]) for k in ("min", "opt", "max"))
        fixed = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))
        return fixed, fixed, fixed

    def _buffer(self, key: str, nbytes: int, dtype) -> tuple:
        """(pinned host array, device pointer) of at least ``nbytes``: allocated once, grown when a batch needs more."""
        host, device, size = self._buffers.get(key, (None, None, 0))
        if size < nbytes:
            cr = self.cudart
            self._buffers.pop(key, None)
            if host is not None:
                _check(cr.cudaFreeHost(host), "cudaFreeHost", cr)
                _check(cr.cudaFree(device), "cudaFree", cr)
            host = _check(cr.cudaMallocHost(nbytes), "cudaMallocHost", cr)
            try:
                device = _check(cr.cudaMalloc(nbytes), "cudaMalloc", cr)
            except EdgeconvError:
                cr.cudaFreeHost(host)
                raise
            self._buffers[key] = (host, device, nbytes)
            size = nbytes
        return _host_array(host, size, dtype), device

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.context is None:
            raise EdgeconvError("this model was closed; load it again (Model.load) to run it")
        if len(x) > self.max_batch:  # the engine's profile caps the batch: run in slices
            return np.concatenate([self.infer(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        cr = self.cudart
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        if not self.context.set_input_shape(self.input_name, x.shape):
            lo, _, hi = self.profile
            raise EdgeconvError(f"TensorRT refused input shape {tuple(x.shape)}: engine {self.path.name} accepts {lo} to {hi}; "
                                "rebuild it with edgeconv-runtime build-engine --batch MIN,OPT,MAX")
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        out_n = int(np.prod(out_shape))
        h_in, d_in = self._buffer("in", x.nbytes, self.in_dtype)
        h_out, d_out = self._buffer("out", out_n * self.out_dtype.itemsize, self.out_dtype)
        h_in[: x.size] = x.ravel()
        stream = self.stream
        _check(cr.cudaMemcpyAsync(d_in, h_in.ctypes.data, x.nbytes, cr.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync", cr)
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        if not self.context.execute_async_v3(self.stream_handle):
            raise EdgeconvError(f"TensorRT could not run {self.path.name} (see TensorRT's log above)")
        _check(cr.cudaMemcpyAsync(h_out.ctypes.data, d_out, out_n * self.out_dtype.itemsize, cr.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                  stream), "cudaMemcpyAsync", cr)
        _check(cr.cudaStreamSynchronize(stream), "cudaStreamSynchronize", cr)
        # a copy: the pinned buffer is reused by the next call
        return h_out[:out_n].reshape(out_shape).astype(np.float32)

    def close(self) -> None:
        """Free the pinned and device buffers, destroy the stream, release context, engine and runtime. Safe to call twice."""
        cr = getattr(self, "cudart", None)
        if cr is not None:
            if self.stream is not None:
                cr.cudaStreamSynchronize(self.stream)  # nothing may still be copying into a buffer about to be freed
            for host, device, _ in self._buffers.values():
                cr.cudaFreeHost(host)
                cr.cudaFree(device)
            if self.stream is not None:
                cr.cudaStreamDestroy(self.stream)
        self._buffers.clear()
        self.stream = None
        # the context before the engine before the runtime that made it
        self.context = None
        self.engine = None
        self.runtime = None

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.side.get("tensorrt_version"), "gpu": self.side.get("gpu_name"),
                "precision": self.side.get("precision"), "profile": [list(s) for s in getattr(self, "profile", ())]}
