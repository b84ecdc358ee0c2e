"""ONNX Runtime backends (CPU, CUDA and TensorRT execution providers)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..errors import BackendUnavailable, EdgeconvError
from ..gpu import gpu_info
from .base import Backend

_NAMES = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda", "TensorrtExecutionProvider": "onnxruntime-tensorrt"}


def ort_provider_status(provider: str) -> tuple:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install onnxruntime)"
    if provider not in ort.get_available_providers():
        return False, f"this onnxruntime build has no {provider} (pip install edgeconv-runtime[gpu] on a machine with an NVIDIA GPU)"
    if provider != "CPUExecutionProvider" and gpu_info() is None:
        return False, "no NVIDIA GPU found"
    return True, "ok"


def default_threads() -> int:
    """Physical cores: hyper-threads slow ONNX Runtime's intra-op pool down, they rarely help."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):
        pass
    return max(1, os.cpu_count() or 1)


class OrtBackend(Backend):
    def __init__(self, path: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None, spin: bool = True):
        import onnxruntime as ort

        self.name = _NAMES.get(provider, provider)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        if not spin:
            # a server shares its cores with decoding and HTTP: idle inference threads must sleep, not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = so.intra_op_num_threads
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise EdgeconvError(f"onnxruntime cannot load {os.path.basename(str(path))}: {str(exc).splitlines()[0][:200]}; re-export the bundle") from exc
        if provider not in self.session.get_providers():
            raise BackendUnavailable(f"{provider} could not start on this machine; see onnxruntime's log")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]
        self._run = self.session.run

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._run(self.output_names, {self.input_name: x})[0]

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.session.get_providers(), "threads": self.threads}
