"""TensorRT engines from the exported ONNX files (needs an NVIDIA GPU and `tensorrt`).

Engines are built from strongly typed networks where TensorRT supports them (10.x, always on
in 11): the precision comes from the ONNX itself (model.fp16.onnx, the QDQ model.int8.onnx),
since TensorRT 11 removed implicit INT8 calibration and the FP16/INT8 builder flags. On 8.6,
the same files build with the FP16/INT8 builder flags instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgeconv_runtime.errors import BackendUnavailable, EdgeconvError
from edgeconv_runtime.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from edgeconv_runtime.gpu import gpu_info

from .onnx import INPUT_NAME

log = logging.getLogger("edgeconv.export")

INSTALL_HINT = "TensorRT export needs an NVIDIA GPU and `pip install edgeconv-export[tensorrt]`"


def require_tensorrt():
    """Import tensorrt, or raise a one-line error saying what is missing."""
    if gpu_info() is None:
        raise BackendUnavailable(f"no NVIDIA GPU found (nvidia-smi sees none); {INSTALL_HINT}")
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt package is not installed; {INSTALL_HINT}") from exc
    return trt


def build_engine(onnx_path: Path, engine_path: Path, precision: str, input_shape: tuple, batch_min: int, batch_opt: int,
                 batch_max: int, timing_cache: Path | None = None, workspace_gib: float = 2.0) -> dict:
    """Build a serialized engine and its sidecar JSON; returns the sidecar record."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and major >= 10
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeconvError(f"TensorRT could not parse {Path(onnx_path).name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    shapes = {k: (b, *input_shape) for k, b in (("min", batch_min), ("opt", batch_opt), ("max", batch_max))}
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeconvError(f"TensorRT failed to build a {precision} engine from {Path(onnx_path).name}; see the TensorRT log above")
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    gpu = gpu_info() or {}
    sidecar = {
        "engine": Path(engine_path).name,
        "onnx": Path(onnx_path).name,
        "precision": precision,
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "driver": gpu.get("driver"),
        "strongly_typed": strongly_typed,
        "profile": {k: list(v) for k, v in shapes.items()},
        "input": INPUT_NAME,
        "sha256": sha256_file(engine_path),
    }
    atomic_write_json(Path(engine_path).with_suffix(".json"), sidecar)
    return sidecar
