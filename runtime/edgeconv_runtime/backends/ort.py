"""ONNX Runtime backends (CPU, CUDA and TensorRT execution providers)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import BackendUnavailable, EdgeconvError, first_line
from ..fileio import sha256_file
from .. import ortbuild
from ..gpu import gpu_info
from ..manifest import PRECISIONS
from .base import Backend, Streams


def ort_provider_status(provider: str) -> tuple:
    """(usable, reason): a missing, broken or mixed CPU+GPU onnxruntime install is named with the command that fixes it."""
    try:
        import onnxruntime as ort

        # after `pip uninstall` of one of two builds, what is left imports as an empty namespace package
        available = ort.get_available_providers()
    except Exception as exc:  # a broken CUDA/cuDNN install raises OSError or RuntimeError here, not only ImportError
        return False, ortbuild.import_failure_reason(exc)
    if provider not in available:
        return False, ortbuild.missing_provider_reason(provider, available)
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


# The optimization profile the TensorRT execution provider builds its engine for: batch MIN, OPT, MAX.
# Every batch inside it reuses the cached engine; a larger batch runs in slices of MAX, never a rebuild.
DEFAULT_BATCH_PROFILE = (1, 8, 32)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
CUDNN_CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
# onnxruntime refuses a provider option it does not know (an older build): the key it names is dropped and noted
_UNKNOWN_OPTION = re.compile(r"(?:Invalid TensorRT EP option|Unknown provider option)\W+([A-Za-z0-9_]+)")
# InferenceSession's own fallback: it catches a provider that fails to start (an unknown option is enough), prints
# this to stdout and builds the session again on the CPU (onnxruntime_inference_collection.py, InferenceSession.__init__)
_EP_ERROR = re.compile(r"^EP Error:? (.+?) (?:when )?using \[", re.M | re.S)
_PRELOAD = {"done": False, "error": None}
# The first onnxruntime release that knows each provider option we pass (an older one refuses the whole provider),
# from the microsoft/onnxruntime pull requests that added them: CUDA use_tf32 #19357/#19426 (1.18); TensorRT
# trt_timing_cache_path #17865 (1.17); trt_profile_*_shapes #15546 and trt_timing_cache_enable #14767 (1.15).
# Wheels for JetPack 5 / Python 3.8 predate some of them.
OPTION_SINCE = {
    "use_tf32": (1, 18),
    "trt_timing_cache_path": (1, 17),
    "trt_timing_cache_enable": (1, 15),
    "trt_profile_min_shapes": (1, 15),
    "trt_profile_opt_shapes": (1, 15),
    "trt_profile_max_shapes": (1, 15),
}


def ort_version_tuple(version) -> tuple:
    """'1.16.3' / '1.17.0+cu118' / '1.18.0.dev20240101' -> (1, 16, 3); () when it cannot be read (taken as current)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version or ""))
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def installed_ort_version() -> Optional[str]:
    try:
        import onnxruntime as ort

        return getattr(ort, "__version__", None)
    except Exception:  # a broken install: its status says why; the options stay the newest
        return None


def options_for_version(options: dict, version) -> tuple:
    """(the options ``version`` of onnxruntime knows, the keys left out): an unknown key makes onnxruntime refuse the provider."""
    have = ort_version_tuple(version)
    if not have:
        return dict(options), []
    dropped = [k for k in options if k in OPTION_SINCE and have < OPTION_SINCE[k]]
    return {k: v for k, v in options.items() if k not in dropped}, dropped



def check_batch_profile(batch) -> tuple:
    """(min, opt, max) batch sizes from three numbers or a 'MIN,OPT,MAX' string, 1 <= min <= opt <= max, or one
    line saying what is wrong. The TensorRT provider's profile and `build-engine --batch` both go through here."""
    try:
        b = tuple(int(v) for v in (batch.split(",") if isinstance(batch, str) else batch))
    except (TypeError, ValueError):
        b = ()
    if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
        raise EdgeconvError(f"batch profile {batch!r} must be three sizes MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. 1,8,32")
    return b


def cuda_provider_options(device_id: int = 0, conv_algo_search: str = "HEURISTIC") -> dict:
    """Options for ONNX Runtime's CUDA execution provider.

    ``use_tf32`` 0: on Ampere and newer the provider otherwise runs FP32 convolutions and matmuls in TF32
    (10-bit mantissa) and FP32 outputs drift ~1e-3 from the reference, outside the FP32 verify tolerance.
    ``cudnn_conv_algo_search`` HEURISTIC: cuDNN's own pick; EXHAUSTIVE (onnxruntime's default) benchmarks
    every algorithm on each new input shape, a stall on the first batch of every size (long on a Jetson).
    ``device_id`` 0 is the first device that CUDA_VISIBLE_DEVICES leaves visible.
    """
    if conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
        raise EdgeconvError(f"cudnn_conv_algo_search {conv_algo_search!r} must be one of {', '.join(CUDNN_CONV_ALGO_SEARCH)}")
    return {"device_id": int(device_id), "use_tf32": 0, "cudnn_conv_algo_search": conv_algo_search}


def trt_provider_options(precision: str, input_name: str, input_shape, cache_dir, batch=DEFAULT_BATCH_PROFILE, device_id: int = 0,
                         cache_key: str = "model") -> dict:
    """Options for ONNX Runtime's TensorRT execution provider.

    Engines are cached under ``cache_dir/engines/<cache_key>`` (one folder per artifact and content hash:
    onnxruntime's own cache key ignores the weights) and the timing cache, shared by every model on this
    GPU, under ``cache_dir/timing``. The explicit profile (``input:N x C x H x W`` for N in ``batch``)
    makes every batch up to MAX reuse one engine. FP16/INT8 follow the artifact's precision: the INT8
    graph is the Q/DQ one made for TensorRT, so TensorRT takes its scales and needs no calibration table.
    TensorRT's boolean options must be Python booleans (onnxruntime reads "True"/"False", not 1/0).
    """
    if precision not in PRECISIONS:
        raise EdgeconvError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if not input_name or any(c in str(input_name) for c in ":,"):
        raise EdgeconvError(f"input name {input_name!r} cannot be named in a TensorRT profile (it must be non-empty, without ':' or ','); re-export the bundle")
    dims = tuple(int(d) for d in input_shape)
    if not dims or any(d < 1 for d in dims):
        raise EdgeconvError(f"input shape {tuple(input_shape)} must be fixed positive sizes (C, H, W) for a TensorRT profile")
    lo, opt, hi = check_batch_profile(batch)
    chw = "x".join(str(d) for d in dims)
    cache = Path(cache_dir)
    return {
        "device_id": int(device_id),
        # INT8 too: the layers TensorRT leaves unquantized (first/last, softmax, ...) then run in FP16, not FP32
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache / "engines" / cache_key),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache / "timing"),
        "trt_profile_min_shapes": f"{input_name}:{lo}x{chw}",
        "trt_profile_opt_shapes": f"{input_name}:{opt}x{chw}",
        "trt_profile_max_shapes": f"{input_name}:{hi}x{chw}",
    }


def _usable_dir(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(str(d), os.W_OK | os.X_OK)


def default_trt_cache_dir(bundle_root=None) -> Path:
    """``<bundle>/.trt_cache`` when the bundle is writable, else ``~/.cache/edgeconv/trt`` (XDG_CACHE_HOME honoured)."""
    if bundle_root is not None:
        local = Path(bundle_root) / ".trt_cache"
        if _usable_dir(local):
            return local
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeconv" / "trt"


def provider_list(provider: str, precision: str = "fp32", input_name: Optional[str] = None, input_shape=None, cache_dir=None,
                  batch=DEFAULT_BATCH_PROFILE, device_id: int = 0, cache_key: str = "model", ort_version=None,
                  omitted: Optional[list] = None) -> list:
    """The ``providers`` argument of ``InferenceSession``: the provider asked for, then what takes the nodes it cannot run.

    TensorRT's provider is followed by CUDA's (for layers TensorRT cannot take) and the CPU's. Options older
    onnxruntime releases lack (``ort_version``, default the installed one; see OPTION_SINCE) are left out and their
    keys appended to ``omitted``.
    """
    if provider == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    version = ort_version if ort_version is not None else installed_ort_version()
    left_out = omitted if omitted is not None else []

    def fit(options: dict) -> dict:
        kept, dropped = options_for_version(options, version)
        left_out.extend(k for k in dropped if k not in left_out)
        return kept

    cuda = ("CUDAExecutionProvider", fit(cuda_provider_options(device_id)))
    if provider == "CUDAExecutionProvider":
        return [cuda, "CPUExecutionProvider"]
    if provider == "TensorrtExecutionProvider":
        trt = fit(trt_provider_options(precision, input_name, input_shape, cache_dir, batch, device_id, cache_key))
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]
    raise EdgeconvError(f"unknown execution provider {provider!r}; use one of CPUExecutionProvider, {', '.join(GPU_PROVIDERS)}")


def preload_cuda_libraries(ort) -> Optional[str]:
    """Load CUDA and cuDNN from the nvidia-* pip wheels (onnxruntime-gpu >= 1.21) before the first GPU session.

    Done once per process; returns why it failed, if it did (the session then reports what is missing).
    """
    if not _PRELOAD["done"]:
        _PRELOAD["done"] = True
        if hasattr(ort, "preload_dlls"):
            try:
                with contextlib.redirect_stdout(sys.stderr):  # it prints its diagnostics; stdout may carry --json output
                    ort.preload_dlls()
            except Exception as exc:  # no wheel to preload from, or a directory it cannot find
                _PRELOAD["error"] = f"{type(exc).__name__}: {first_line(exc)}"
    return _PRELOAD["error"]


def _preload_tensorrt_libraries() -> None:
    """Best effort: the tensorrt wheel loads its libnvinfer on import, which lets the provider find it by soname."""
    from .trt import _import_tensorrt

    _import_tensorrt()


def onnx_input(path) -> tuple:
    """(name, (C, H, W)) of the model's first input, read with a bare CPU session (for a .onnx without a manifest)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        inp = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_inputs()[0]
    except Exception as exc:
        raise EdgeconvError(f"onnxruntime cannot read {os.path.basename(str(path))}: {first_line(exc)}; re-export the bundle") from exc
    return inp.name, tuple(inp.shape[1:])


def _drop_option(providers: list, key: str) -> bool:
    for i, p in enumerate(providers):
        if isinstance(p, tuple) and key in p[1]:
            providers[i] = (p[0], {k: v for k, v in p[1].items() if k != key})
            return True
    return False


def _closed(*args, **kwargs):
    raise EdgeconvError("this model was closed; load it again (Model.load) to run it")


class OrtBackend(Backend):
    """A model run by ONNX Runtime with one execution provider (CPU, CUDA or TensorRT)."""

    provider = "CPUExecutionProvider"  # the subclasses' default; ``OrtBackend(path, provider=...)`` picks any

    def __init__(self, path: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None, spin: bool = True,
                 precision: str = "fp32", input_name: Optional[str] = None, input_shape=None, batch_profile=DEFAULT_BATCH_PROFILE,
                 cache_dir=None, device_id: int = 0, arena: bool = True, tuning: Optional[dict] = None):
        """``arena`` False: CPU buffers go back to the system after each run instead of into ONNX Runtime's
        arena, which keeps what the largest run needed (training's frozen parts run beside PyTorch).

        ``tuning`` (what `tune` measures): ``arena`` as above, ``mem_pattern`` False turns ONNX Runtime's memory-pattern
        planning off, ``streams`` N runs a batch as N sub-batches at once, each on ``threads`` intra-op threads."""
        import onnxruntime as ort

        tuning = type(self).check_tuning(tuning) if type(self).tuning_keys else {}
        arena = bool(tuning.get("arena", arena))
        streams = tuning.get("streams") or 1

        # the backend name of this provider, as the subclass for it declares (OrtBackend(path, provider=...) is one too)
        self.name = next((c.name for c in OrtBackend.__subclasses__() if c.provider == provider), provider)
        self.provider = provider
        self.path = str(path)
        self.session = None
        self.dropped_options = []
        self.cache_dir = None
        self.max_batch = None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = arena
        if tuning.get("mem_pattern") is not None:
            so.enable_mem_pattern = bool(tuning["mem_pattern"])
        if not spin:
            # a server shares its cores with decoding and HTTP: idle inference threads must sleep, not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = so.intra_op_num_threads
        self.tuning = tuning
        self._streams = None
        key = "model"
        if provider == "TensorrtExecutionProvider":
            if input_name is None or input_shape is None:
                probed_name, probed_shape = onnx_input(path)
                input_name = input_name or probed_name
                input_shape = input_shape or probed_shape
            batch_profile = check_batch_profile(batch_profile)
            self.max_batch = batch_profile[2]
            self.cache_dir = Path(cache_dir).absolute() if cache_dir is not None else default_trt_cache_dir(Path(path).absolute().parent)
            key = f"{Path(path).name}-{sha256_file(path)[:16]}"
        providers = provider_list(provider, precision, input_name, input_shape, self.cache_dir, batch_profile, device_id, key,
                                  getattr(ort, "__version__", None), self.dropped_options)
        preload_error = None
        if provider in GPU_PROVIDERS:
            preload_error = preload_cuda_libraries(ort)
            if provider == "TensorrtExecutionProvider":
                _preload_tensorrt_libraries()
                for p in providers:
                    if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider":
                        for k in ("trt_engine_cache_path", "trt_timing_cache_path"):
                            if k in p[1] and not _usable_dir(Path(p[1][k])):
                                raise BackendUnavailable(f"the TensorRT cache folder {p[1][k]} cannot be written; pass a writable cache_dir")
        self.session = self._session(ort, so, providers)
        self.providers = self.session.get_providers()
        if provider not in self.providers:
            raise BackendUnavailable(self._fallback_message(ort, preload_error))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]
        self._run = self.session.run
        if self.max_batch:  # the TensorRT profile caps the batch: larger ones run in slices
            self.infer = self._infer_in_slices
        elif streams > 1:
            self._streams = Streams(streams, lambda i, x: self._run(self.output_names, {self.input_name: x})[0])
            self.infer = self._streams

    def _session(self, ort, so, providers: list):
        """The session, with no fallback of onnxruntime's own: ``enable_fallback=0`` makes a provider that cannot start
        raise (onnxruntime releases without that keyword still fall back: their "EP Error" banner is read instead of
        printed, since stdout may carry --json). A refused option is dropped and the session tried again."""
        name = os.path.basename(self.path)
        for _ in range(8):
            banner, error = io.StringIO(), None
            try:
                with contextlib.redirect_stdout(banner):
                    session = ort.InferenceSession(self.path, so, providers=providers, enable_fallback=0)
            except Exception as exc:  # onnxruntime raises its own exception types (a bad file, a provider that cannot start)
                error = exc
            else:
                fell_back = _EP_ERROR.search(banner.getvalue())
                if fell_back is None:
                    if banner.getvalue():  # anything else printed on the way belongs with the diagnostics
                        sys.stderr.write(banner.getvalue())
                    session.disable_fallback()  # nor a silent CPU rerun when the provider fails inside run()
                    return session
                error = RuntimeError(fell_back.group(1).strip())
            unknown = _UNKNOWN_OPTION.search(str(error))
            if unknown and _drop_option(providers, unknown.group(1)):
                self.dropped_options.append(unknown.group(1))  # an older onnxruntime: run without that option, say so
                continue
            if self.provider == "CPUExecutionProvider":
                raise EdgeconvError(f"onnxruntime cannot load {name}: {first_line(error)}; re-export the bundle") from error
            raise BackendUnavailable(f"{self.provider} could not start with {name}: {first_line(error)}") from error
        raise BackendUnavailable(f"{self.provider} refused the options {', '.join(self.dropped_options)}; upgrade onnxruntime-gpu")

    def _fallback_message(self, ort, preload_error: Optional[str]) -> str:
        """Why a GPU provider is missing from the session: onnxruntime drops one that fails to start and runs on without it."""
        version = getattr(ort, "__version__", "?")
        ran = self.providers[0] if self.providers else "nothing"
        preload = f" (preloading CUDA libraries failed: {preload_error})" if preload_error else ""
        if self.provider == "TensorrtExecutionProvider":
            return (f"TensorrtExecutionProvider did not start, so onnxruntime {version} silently fell back to {ran} (usually because "
                    f"TensorRT's libnvinfer could not be loaded{preload}); install the TensorRT this onnxruntime-gpu was built for (JetPack's "
                    "system TensorRT, or pip install tensorrt-cu12) or use --backend onnxruntime-cuda")
        return (f"CUDAExecutionProvider did not start, so onnxruntime {version} silently fell back to the CPU (usually because the "
                f"CUDA 12 / cuDNN 9 libraries it needs are missing or do not match{preload}); install them "
                "(pip install 'onnxruntime-gpu[cuda,cudnn]') or use --backend onnxruntime-cpu")

    # ---- declarations: the three providers are three backends (OrtCpuBackend, OrtCudaBackend, OrtTensorrtBackend below)
    @classmethod
    def status(cls) -> tuple:
        return ort_provider_status(cls.provider)

    @classmethod
    def create(cls, path: str, threads: Optional[int] = None, spin: bool = True, precision: str = "fp32", input_name=None,
               input_shape=None, batch_profile=None, cache_dir=None, **_) -> "OrtBackend":
        return cls(path, provider=cls.provider, threads=threads, spin=spin, precision=precision, input_name=input_name,
                   input_shape=input_shape, batch_profile=batch_profile or DEFAULT_BATCH_PROFILE, cache_dir=cache_dir,
                   tuning=_.get("tuning"))

    def io_shapes(self) -> Optional[tuple]:
        session = self.session
        if session is None or not hasattr(session, "get_inputs"):
            return None
        return list(session.get_inputs()[0].shape), list(session.get_outputs()[0].shape)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._run(self.output_names, {self.input_name: x})[0]

    def _infer_in_slices(self, x: np.ndarray) -> np.ndarray:
        n = self.max_batch
        if len(x) <= n:
            return self._run(self.output_names, {self.input_name: x})[0]
        return np.concatenate([self._run(self.output_names, {self.input_name: x[i : i + n]})[0] for i in range(0, len(x), n)])

    def close(self) -> None:
        """Release the session (and its GPU memory); running the backend afterwards raises. Safe to call twice."""
        self.session = None
        self._run = _closed
        if getattr(self, "_streams", None) is not None:
            self._streams.close()

    def describe(self) -> dict:
        d = {"backend": self.name, "providers": self.providers, "threads": self.threads}
        if self.tuning:
            d["tuning"] = dict(self.tuning)
        if self.cache_dir is not None:
            d["trt_cache"] = str(self.cache_dir)
            d["max_batch"] = self.max_batch
        if self.dropped_options:
            d["dropped_options"] = list(self.dropped_options)
        return d


class OrtCpuBackend(OrtBackend):
    """ONNX Runtime on the CPU: every install has it."""

    name = "onnxruntime-cpu"
    provider = "CPUExecutionProvider"
    auto_rank = 40.0
    cpu = True
    base = True
    file_suffixes = (".onnx",)
    tuning_keys = ("arena", "mem_pattern", "streams")

    @classmethod
    def tunings(cls, cores: int) -> list:
        # the default (physical cores), every core, one thread; one stream per core at one thread each; the arena and
        # the memory-pattern planner off at the default threads (they matter where batch sizes change between runs)
        physical = default_threads()
        out = [(None, {})] + [(t, {}) for t in dict.fromkeys((cores, 1)) if t != physical]
        if cores > 1:
            out.append((1, {"streams": cores}))
        out += [(None, {"arena": False}), (None, {"mem_pattern": False})]
        return out


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime's CUDA execution provider (onnxruntime-gpu)."""

    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    extra = None  # no extra on purpose: onnxruntime-gpu replaces onnxruntime (runtime/pyproject.toml, ortbuild.py)
    auto_rank = 30.0


class OrtTensorrtBackend(OrtBackend):
    """ONNX Runtime's TensorRT execution provider: the graph made for TensorRT where the bundle has one."""

    name = "onnxruntime-tensorrt"
    provider = "TensorrtExecutionProvider"
    extra = None  # as onnxruntime-cuda: onnxruntime-gpu replaces onnxruntime
    artifact_variant = "tensorrt"
    auto_rank = 20.0

    @classmethod
    def missing_artifact(cls, bundle, precision: str) -> Optional[str]:
        missing = super().missing_artifact(bundle, precision)
        if missing is None and precision == "int8" and not bundle.has("onnx", "int8", "tensorrt"):
            # the CPU INT8 graph has uint8 activations with non-zero zero points, which TensorRT refuses
            return ("backend onnxruntime-tensorrt needs the TensorRT-ready INT8 graph (symmetric int8), which this bundle lacks; "
                    "re-export it with this edgeconv version")
        return missing
