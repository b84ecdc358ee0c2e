"""TensorRT engines built on the device from the bundle's own ONNX files: the one builder, torch-free.

An engine only loads on the GPU model and TensorRT version it was built for, so it is built where it
runs (a Jetson, a GPU server) from what the bundle already carries: ``model.onnx``, ``model.fp16.onnx``
and the TensorRT-ready INT8 graph ``model.int8.trt.onnx`` (explicit quantization from its Q/DQ nodes).

- TensorRT 10/11: strongly typed networks, so each layer's precision comes from the ONNX itself
  (TensorRT 11 has no FP16/INT8 builder flags and no implicit INT8 calibration).
- TensorRT 8.6: no strongly typed mode; the FP16/INT8 builder flags let it use the Q/DQ scales.
- FP32 engines are built without TF32: on Ampere and newer TensorRT would otherwise round FP32
  matmuls/convolutions to a 10-bit mantissa, and FP32 results would drift by ~1e-3 from the reference.

Every engine is checked against the bundle's ``reference/`` with the same tolerance as ``verify``
(parity.py) before anything in the bundle changes; the manifest is then rewritten atomically.
A failed build or gate leaves the bundle exactly as it was.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .backends.ort import DEFAULT_BATCH_PROFILE, check_batch_profile
from .errors import BackendUnavailable, EdgeconvError, first_line
from .fileio import atomic_write_bytes, atomic_write_json, sha256_file
from .manifest import ENGINE_FILES, PRECISIONS, Artifact, Manifest, write_manifest

INSTALL_HINT = ("TensorRT engines are built on the device that runs them: an NVIDIA GPU or Jetson with TensorRT "
                "(pip install 'edgeconv-runtime[tensorrt-cu12]' or '[tensorrt-cu13]' to match the CUDA driver, or JetPack's system TensorRT)")


def require_tensorrt():
    """Import tensorrt on a machine with an NVIDIA GPU, or raise one line naming what is missing."""
    from .gpu import gpu_info

    if gpu_info() is None:
        raise BackendUnavailable(f"no NVIDIA GPU found; {INSTALL_HINT}")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt package is not installed; {INSTALL_HINT}") from exc
    except Exception as exc:  # a broken CUDA/TensorRT install raises OSError/RuntimeError at import
        raise BackendUnavailable(f"tensorrt is installed but cannot load ({first_line(exc)}); reinstall TensorRT for this CUDA version") from exc
    return trt



def parse_batch(spec: str) -> Tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32): the optimization profile's min, opt and max batch."""
    return check_batch_profile(spec)


@dataclass(frozen=True)
class EngineOptions:
    precisions: Tuple[str, ...] = ("fp32",)
    batch: Tuple[int, int, int] = DEFAULT_BATCH_PROFILE
    workspace_mb: int = 2048
    timing_cache: Optional[str] = None
    dla_core: Optional[int] = None
    gpu_fallback: bool = False

    def validate(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise EdgeconvError(f"unknown precision {bad[0] if bad else ''!r}; use a comma list of {', '.join(PRECISIONS)}")
        check_batch_profile(self.batch)
        if self.workspace_mb < 16:
            raise EdgeconvError(f"--workspace-mb {self.workspace_mb} is too small; give at least 16 (default 2048)")
        if self.dla_core is not None and self.dla_core < 0:
            raise EdgeconvError("--dla-core takes a DLA core number (0 or 1 on Jetson AGX/NX)")
        if self.gpu_fallback and self.dla_core is None:
            raise EdgeconvError("--gpu-fallback only applies with --dla-core N")
        for p in self.precisions:
            problem = dla_problem(self, p)
            if problem:
                raise EdgeconvError(problem)


def dla_problem(opts: EngineOptions, precision: str, trt_version: Optional[str] = None) -> Optional[str]:
    """One line saying why a ``precision`` engine cannot be built for ``opts.dla_core``, or None (also without DLA).

    DLA takes one fixed shape (its profile must have min = opt = max) and computes in FP16 or INT8 only: an FP32 build
    either fails or, with GPU fallback, runs wholly on the GPU while its sidecar names a DLA core. Before TensorRT 10,
    DLA cannot run explicitly quantized (Q/DQ) INT8, which is what the bundle's INT8 graph is. ``trt_version`` None:
    the checks that need no TensorRT.
    """
    core = opts.dla_core
    if core is None:
        return None
    lo, opt, hi = opts.batch
    if not lo == opt == hi:
        return (f"--dla-core {core}: DLA engines take one fixed batch size (MIN = OPT = MAX), not {lo},{opt},{hi}; "
                f"pass --batch N,N,N (e.g. --batch {opt},{opt},{opt})")
    if precision == "fp32":
        return (f"--dla-core {core}: DLA runs fp16 and int8 only, not fp32; ask for --precision fp16 (or int8), "
                "or build fp32 without --dla-core for the GPU")
    if precision == "int8" and trt_version is not None and _version_major(trt_version) < 10:
        return (f"--dla-core {core}: TensorRT {trt_version} cannot run the bundle's explicitly quantized (Q/DQ) INT8 graph "
                "on DLA (TensorRT 10 can); use --precision fp16 on DLA, or build int8 without --dla-core for the GPU")
    return None


def _version_major(version) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _major(trt) -> int:
    return _version_major(trt.__version__)


def build_serialized(trt, onnx_path: Path, precision: str, input_name: str, input_shape: tuple, opts: EngineOptions,
                     log_severity=None) -> Tuple[bytes, dict]:
    """Parse ``onnx_path`` and build one serialized engine; returns (bytes, build facts for the sidecar)."""
    problem = dla_problem(opts, precision, str(trt.__version__))
    if problem:
        raise EdgeconvError(problem)
    logger = trt.Logger(log_severity if log_severity is not None else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # e.g. "CUDA initialization failure": driver older than the TensorRT build needs
        raise BackendUnavailable(f"TensorRT cannot start a builder on this GPU ({first_line(exc)}); "
                                 "update the NVIDIA driver or install a TensorRT built for this CUDA version") from exc
    if builder is None:
        raise BackendUnavailable("TensorRT cannot start a builder on this GPU; update the NVIDIA driver or reinstall TensorRT")
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    strongly_typed = _major(trt) >= 10 and hasattr(creation, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(creation.STRONGLY_TYPED)
    elif hasattr(creation, "EXPLICIT_BATCH"):  # 8.6: implicit batch is the default there
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeconvError(f"TensorRT could not parse {Path(onnx_path).name}: {errors[:300]}; re-export the bundle with a supported --opset")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    tf32 = hasattr(trt.BuilderFlag, "TF32")
    if tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 stays FP32 (the verify tolerance assumes it)
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the Q/DQ nodes: no calibrator
    if opts.dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise BackendUnavailable(f"--dla-core {opts.dla_core}: this GPU has no DLA cores (DLA exists on Jetson AGX/NX Xavier and Orin)")
        if opts.dla_core >= builder.num_DLA_cores:
            raise EdgeconvError(f"--dla-core {opts.dla_core}: this device has DLA cores 0..{builder.num_DLA_cores - 1}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(opts.dla_core)
        if opts.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    b0, b1, b2 = opts.batch
    shapes = {"min": (b0, *input_shape), "opt": (b1, *input_shape), "max": (b2, *input_shape)}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_status = None
    if opts.timing_cache:
        cache_status = _attach_timing_cache(trt, config, Path(opts.timing_cache))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeconvError(f"TensorRT failed to build a {precision} engine from {Path(onnx_path).name}; see the TensorRT log above")
    if opts.timing_cache and cache_status != "rejected":
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write_bytes(opts.timing_cache, bytes(cache.serialize()))
    facts = {"strongly_typed": strongly_typed, "tf32": False if tf32 else None, "profile": {k: list(v) for k, v in shapes.items()},
             "timing_cache": cache_status, "workspace_mb": int(opts.workspace_mb), "dla_core": opts.dla_core,
             "gpu_fallback": bool(opts.gpu_fallback) if opts.dla_core is not None else None}
    return bytes(serialized), facts


def _attach_timing_cache(trt, config, path: Path) -> str:
    """Use the timing cache at ``path`` (or start one); a cache TensorRT refuses is said, not ignored."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as exc:
        cache = None
        reason = first_line(exc)
    else:
        reason = "unreadable"
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        import logging

        logging.getLogger("edgeconv.engine").warning(
            "timing cache %s was rejected by TensorRT (%s: built by another TensorRT version or GPU); building without it "
            "and leaving the file as it is: delete it to start a new one", path, reason if cache is None else "device mismatch")
        # still build: a fresh cache for this build only
        fresh = config.create_timing_cache(b"")
        config.set_timing_cache(fresh, ignore_mismatch=False)
        return "rejected"
    return "used" if blob else "created"


def engine_sidecar(trt, engine_file: str, onnx_file: str, onnx_sha256: str, precision: str, input_name: str, facts: dict,
                   engine_sha256: str) -> dict:
    from .gpu import gpu_info

    gpu = gpu_info() or {}
    return {
        "engine": engine_file,
        "onnx": onnx_file,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "driver": gpu.get("driver"),
        "cuda_driver": gpu.get("cuda_driver"),
        "input": input_name,
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **facts,
        "sha256": engine_sha256,
    }


def gate_engine(engine_path: Path, bundle, precision: str) -> dict:
    """Run the bundle's reference inputs through the engine with the native TensorRT backend; raise outside tolerance."""
    from .backends.trt import TensorRTBackend
    from .parity import parity_report, tolerance_problems

    ref = bundle.manifest.reference or {}
    if not ref.get("inputs") or not ref.get("outputs"):
        raise EdgeconvError(f"bundle {bundle.root} has no reference tensors to check engines against; re-export it with `edgeconv export`")
    x = np.load(bundle.path(ref["inputs"]), allow_pickle=False).astype(np.float32)
    expected = np.load(bundle.path(ref["outputs"]), allow_pickle=False)
    backend = TensorRTBackend(str(engine_path))
    try:
        got = backend.infer(x)
    finally:
        backend.close()
    report = parity_report(expected, got)
    report["backend"] = "tensorrt"
    problems = tolerance_problems(report, precision)
    if problems:
        raise EdgeconvError(f"the {precision} TensorRT engine disagrees with the bundle's reference outputs ({'; '.join(problems)}); "
                            "the bundle was left as it was")
    return report


def build_engines(bundle_dir, opts: EngineOptions, quiet: bool = False) -> List[Artifact]:
    """Build, check and add one engine per requested precision; returns the new artifacts.

    Nothing in ``bundle_dir`` changes unless every engine was built and passed its gate.
    """
    from .bundle import read_bundle

    opts.validate()
    bundle = read_bundle(bundle_dir)
    sources = {}
    for p in opts.precisions:  # every source must exist (and match its hash) before TensorRT is touched
        if not bundle.has("onnx", p):
            raise EdgeconvError(f"bundle {bundle.root} has no {p} ONNX model to build an engine from; export it with --precision {p}")
        sources[p] = bundle.artifact("onnx", p, variant="tensorrt")
    trt = require_tensorrt()
    for p in opts.precisions:  # what this TensorRT cannot build on DLA is refused before the first engine is built
        problem = dla_problem(opts, p, str(trt.__version__))
        if problem:
            raise EdgeconvError(problem)
    input_name = bundle.manifest.input.get("name", "input")
    input_shape = tuple(bundle.preprocess.input_shape)
    root = Path(bundle.root)
    staging = Path(tempfile.mkdtemp(prefix=".engines.", suffix=".tmp", dir=root))
    try:
        built = []
        for p in opts.precisions:
            src, record = sources[p]
            data, facts = build_serialized(trt, src, p, input_name, input_shape, opts)
            name = ENGINE_FILES[p]
            atomic_write_bytes(staging / name, data)
            sidecar = engine_sidecar(trt, name, record.file, record.sha256, p, input_name, facts, sha256_file(staging / name))
            atomic_write_json((staging / name).with_suffix(".json"), sidecar)
            report = gate_engine(staging / name, bundle, p)
            built.append(Artifact(name, "tensorrt", p, sidecar["sha256"], (staging / name).stat().st_size, report, sidecar,
                                  purpose=f"TensorRT {trt.__version__} engine for {sidecar['gpu_name']} (compute {sidecar['compute_capability']})"))
            if not quiet:
                print(f"built {name} ({p}) from {record.file}: max|diff| {report['max_abs_diff']:.2e}, "
                      f"top-1 agreement {report['top1_agreement']:.3f} on {report['n']} reference inputs")
        manifest: Manifest = bundle.manifest
        for a in built:
            manifest = manifest.with_artifact(a)
        files = dict(manifest.files or {})  # the sidecars: the TensorRT backend reads them, so the manifest covers them
        for a in built:
            side = (staging / a.file).with_suffix(".json")
            files[side.name] = sha256_file(side)
        manifest.files = files
        for a in built:  # every gate passed: move the engines in, then switch the manifest in one rename
            os.replace(staging / a.file, root / a.file)
            os.replace((staging / a.file).with_suffix(".json"), (root / a.file).with_suffix(".json"))
        write_manifest(root, manifest)
        return built
    finally:
        shutil.rmtree(staging, ignore_errors=True)
