"""OpenVINO on the CPU: the bundle's ONNX files compiled by OpenVINO's CPU plugin.

Three precisions, all from the files ONNX Runtime runs too:
- ``fp32``: ``model.onnx`` with the inference precision pinned to f32. OpenVINO's default on a CPU
  with AVX-512 BF16 or AMX is to run an FP32 model in bf16 silently; pinning keeps FP32 exact.
- ``bf16``: the same ``model.onnx`` with the bf16 inference precision hint, where the CPU has the
  instructions for it (AVX-512 BF16 or AMX); elsewhere the backend is unavailable and says why.
- ``int8``: the Q/DQ ``model.int8.onnx``; OpenVINO folds the Q/DQ pairs into int8 kernels and runs
  the layers left in float in f32.

``openvino`` is an optional extra (``pip install edgeconv-runtime[openvino]``), imported only when
this backend is built: probing whether it is installed does not import it (an import costs ~1 s).
"""
from __future__ import annotations

import importlib.util
import threading
from typing import Optional

import numpy as np

from ..errors import BackendUnavailable, EdgeconvError, first_line
from .base import Backend, Streams
from .ort import default_threads

INSTALL_HINT = "OpenVINO is not installed; pip install 'edgeconv-runtime[openvino]'"
# the runtime precision -> OpenVINO's INFERENCE_PRECISION_HINT
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_CORE = {}
OPENVINO_FIRST = ("bf16",)  # the precisions `auto` tries openvino-cpu before onnxruntime-cpu for



def openvino_status() -> tuple:
    """(usable, reason) without importing openvino: only whether the package is there."""
    try:
        found = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        found = False
    return (True, "ok") if found else (False, INSTALL_HINT)


def _core():
    """One ``openvino.Core`` per process (it loads the CPU plugin once)."""
    if "core" not in _CORE:
        try:
            import openvino
        except Exception as exc:  # a broken install raises more than ImportError
            raise BackendUnavailable(f"OpenVINO cannot be imported ({type(exc).__name__}: {first_line(exc)}); "
                                     "pip install 'edgeconv-runtime[openvino]'") from exc
        _CORE["core"] = openvino.Core()
        _CORE["version"] = getattr(openvino, "__version__", "?").split("-")[0]
    return _CORE["core"]


# x86 CPU flags (as /proc/cpuinfo names them) for native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4 and later), AMX
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NO_BF16 = "this CPU has neither AVX-512 BF16 nor AMX, so OpenVINO cannot run bf16 here; use --precision fp32 or int8"


def cpu_flags() -> set:
    """The x86 feature flags of this CPU from /proc/cpuinfo; empty where there are none to read (not Linux, or an Arm
    CPU, whose line is "Features"). Tests replace it to see what a CPU without bf16 gets."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        return set()


def bf16_status() -> tuple:
    """(usable, reason): whether OpenVINO's CPU plugin runs bf16 arithmetic natively on this CPU.

    An x86 CPU whose flags show neither AVX-512 BF16 nor AMX is refused from its flags, without loading OpenVINO; where
    the flags say yes or cannot be read, the plugin decides (it lists BF16 among its optimization capabilities).
    """
    ok, why = openvino_status()
    if not ok:
        return ok, why
    flags = cpu_flags()
    if flags and not flags.intersection(BF16_FLAGS):
        return False, NO_BF16
    try:
        caps = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except BackendUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # a plugin that cannot answer: no bf16 from it
        return False, f"OpenVINO's CPU plugin does not say whether it runs bf16 ({type(exc).__name__}: {first_line(exc)}); use --precision fp32"
    if "BF16" in caps:
        return True, "ok"
    have = sorted(f for f in flags if f in BF16_FLAGS or f.startswith("amx"))
    return False, NO_BF16 + (f" (CPU flags: {', '.join(have)}, but OpenVINO's CPU plugin lists no BF16)" if have else "")


class OpenVinoBackend(Backend):
    """An ONNX file compiled by OpenVINO for the CPU, one inference request, latency-tuned."""

    name = "openvino-cpu"
    precisions = ("fp32", "bf16", "int8")  # bf16 = the FP32 graph in OpenVINO's bf16 mode
    artifact_precision = {"bf16": "fp32"}
    triton_platform = "openvino"
    extra = "openvino"
    auto_rank = 50.0  # after onnxruntime-cpu: measured no faster for fp32 / int8 (see auto_rank_for)
    cpu = True
    tuning_keys = ("hint", "streams")
    HINTS = ("LATENCY", "THROUGHPUT")

    @classmethod
    def tunings(cls, cores: int) -> list:
        # OpenVINO's two performance hints: LATENCY (one stream, every thread on one request) and THROUGHPUT (streams and
        # requests as OpenVINO picks them for this CPU; a batch is split over the requests)
        return [(None, {}), (None, {"hint": "THROUGHPUT"})]

    @classmethod
    def check_tuning(cls, tuning):
        tuning = super().check_tuning(tuning)
        if tuning.get("hint", "LATENCY") not in cls.HINTS:
            raise EdgeconvError(f"OpenVINO hint must be one of {', '.join(cls.HINTS)}, got {tuning['hint']!r}")
        return tuning

    @classmethod
    def status(cls) -> tuple:
        return openvino_status()

    @classmethod
    def auto_rank_for(cls, precision: str) -> float:
        # before onnxruntime-cpu only where it measured faster (x86-64 with AVX-512, 2 threads, one quiet run each:
        # benchmarks/results/backends.md, openvino_vs_ort_mnist.json):
        # - bf16 runs on nothing else (efficientnet_lite0 1.68x ONNX Runtime FP32 at batch 1, 1.84x at 32);
        # - int8: lite0 1.04x ONNX Runtime INT8 at batch 1, 1.12x at 32, but chollet_mnist 0.52x at batch 1 (p50 0.080 vs
        #   0.042 ms) and 1.30x at 32: not consistently faster, so ONNX Runtime stays first;
        # - fp32: lite0 0.96x / 0.90x, chollet_mnist 0.63x / 0.80x; fp16 is ONNX Runtime's (openvino-cpu does not run it).
        return 35.0 if precision in OPENVINO_FIRST else cls.auto_rank

    @classmethod
    def create(cls, path: str, threads: Optional[int] = None, spin: bool = True, precision: str = "fp32", tuning=None,
               **_) -> "OpenVinoBackend":
        return cls(path, threads=threads, precision=precision, tuning=tuning)

    def io_shapes(self) -> Optional[tuple]:
        compiled = self.compiled
        if compiled is None:
            return None

        def dims(port) -> list:  # Dimension objects, static or dynamic
            return [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]

        return dims(compiled.input(0)), dims(compiled.output(0))

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = "fp32", tuning: Optional[dict] = None):
        if precision not in PRECISION_HINTS:
            raise BackendUnavailable(f"backend openvino-cpu runs {', '.join(PRECISION_HINTS)}, not {precision}; "
                                     "use onnxruntime-cpu for it")
        core = _core()
        if precision == "bf16":
            ok, why = bf16_status()
            if not ok:
                raise BackendUnavailable(why)
        self.path = str(path)
        self.precision = precision
        self.threads = int(threads or default_threads())
        self.tuning = type(self).check_tuning(tuning)
        self.hint = self.tuning.get("hint", "LATENCY")
        # LATENCY (default): one stream, every thread on one request (batch 1 is the device's common case; a batch of 32
        # is one request too). THROUGHPUT (`tune` tries it): OpenVINO's streams, a batch split over one request each.
        # f32 pinned for fp32/int8, or OpenVINO would run them in bf16 on a bf16 CPU.
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": self.threads,
                  "PERFORMANCE_HINT": self.hint}
        if self.tuning.get("streams"):
            config["NUM_STREAMS"] = int(self.tuning["streams"])
        try:
            # One compiled model for every batch size. A static batch-1 copy beside it ran batch 1 ~15 % faster, but
            # OpenVINO picked other INT8 kernels for it: efficientnet_lite0's logits moved by up to 0.18 between batch 1
            # and batch 8, so a server's answer to one image depended on what it was batched with.
            self.compiled = core.compile_model(core.read_model(self.path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError for a file it cannot read or convert
            raise EdgeconvError(f"OpenVINO cannot load {self.path.rsplit('/', 1)[-1]}: {first_line(exc)}; re-export the bundle") from exc
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type; its name is "f32", "bf16"
        got = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        if got != PRECISION_HINTS[precision]:  # a plugin that ignores the hint would run another precision than asked
            raise BackendUnavailable(f"OpenVINO compiled the model for {got} instead of {PRECISION_HINTS[precision]}; "
                                     "use another precision or backend")
        self.streams = 1
        if self.hint == "THROUGHPUT":
            self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self.request = self.requests[0]
        self._split = Streams(self.streams, self._run_request)
        self._lock = threading.Lock()  # an infer request runs one inference at a time; ONNX Runtime's run() is thread-safe
        self._closed = False

    def _run_request(self, i: int, x: np.ndarray) -> np.ndarray:
        request = self.requests[i]
        request.infer({0: x}, share_inputs=True)
        # the output tensor is the request's own buffer, rewritten by the next call: copy it out
        return request.get_output_tensor(0).data.copy()

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise EdgeconvError("this model was closed; load it again (Model.load) to run it")
            return self._split(x)

    def close(self) -> None:
        """Release the compiled model; running the backend afterwards raises. Safe to call twice."""
        with self._lock:
            self._closed = True
            self.request = None
            self.requests = []
            self.compiled = None
            self._split.close()

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.threads, "inference_precision": PRECISION_HINTS[self.precision],
                "performance_hint": self.hint, "streams": self.streams, "openvino": _CORE.get("version")}
