"""FP16 conversion and INT8 static quantisation (QDQ, per-channel weights) of an FP32 ONNX file.

INT8 gives two graphs from one calibration: one for CPUs, one for TensorRT."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import PRECISIONS  # noqa: F401  (re-exported: the runtime owns the list)

from .onnx import INPUT_NAME

log = logging.getLogger("edgeconv.export")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MIN_CALIBRATION_WARN = 100


def convert_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in float16; the graph's input and output stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(half.graph)  # the converter appends its input casts at the end of the node list
    onnx.save(half, str(dst))


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise EdgeconvError("FP16 conversion produced a graph with a cycle or a missing input; export FP16 with another --opset")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# images per calibration run. ONNX Runtime runs the calibration graph (a ReduceMin/ReduceMax on every tensor)
# unoptimised, holding about 200 MB per 300 px EfficientNet-Lite0 image: +3.2 GB at 16, +0.29 GB at 1, as fast.
# The ranges do not depend on it: min/max merge across batches, the histogram methods gather every batch first.
CALIBRATION_BATCH = 1


class _ArrayReader:
    """ONNX Runtime calibration reader over preprocessed NCHW float32 images (an array or NormalizedImages)."""

    def __init__(self, x: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self.x = x
        self.batch_size = batch_size
        self.i = 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        batch = self.x[self.i : self.i + self.batch_size]
        self.i += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.i = 0


INT8_CPU_LAYOUT = {"activations": "uint8-asymmetric", "weights": "int8-symmetric-per-channel", "bias": "int32 DequantizeLinear"}
INT8_TENSORRT_LAYOUT = {"activations": "int8-symmetric", "weights": "int8-symmetric-per-channel", "bias": "float"}
INT8_CPU_PURPOSE = "ONNX Runtime CPU, x86 and aarch64: uint8 activations, int8 per-channel weights (U8S8)"
INT8_TENSORRT_PURPOSE = "TensorRT / ORT TensorRT provider: symmetric int8, zero points 0, float bias"
MIN_ORT_CALIBRATION_CACHE = "1.27"  # first onnxruntime whose quantize_static takes calibration_cache_path


def calibrate_int8(src: Path, cpu_dst: Path, tensorrt_dst: Path, calib: np.ndarray, method: str = "minmax") -> dict:
    """Calibrate once on real images and write both INT8 QDQ graphs from those same ranges.

    ``cpu_dst``: uint8 activations with zero points, int8 symmetric per-channel weights, int32
    bias. ONNX Runtime's U8S8 path: fast on x86 (VNNI/AVX2); ORT's quantisation guide says U8S8
    is no slower than U8U8 on high-end ARM64 and faster on low-end, so aarch64 CPUs use it too.
    ``tensorrt_dst``: int8 symmetric activations and weights (every zero point 0) and float
    bias: the QDQ form TensorRT's explicit quantisation and ORT's TensorRT provider accept.
    ONNX Runtime's x86 CPU kernels run it 2.5-4.7x slower than the uint8 graph (lite0, batch 1), hence two files.
    Returns the calibration record for the manifest.
    """
    import inspect

    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise EdgeconvError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if len(calib) == 0:
        raise EdgeconvError("no calibration images; pass --calib-data with a folder of real training images")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise EdgeconvError(f"INT8 export needs onnxruntime >= {MIN_ORT_CALIBRATION_CACHE} (found {onnxruntime.__version__}) "
                            f"to give both INT8 graphs one calibration; run `pip install -U 'onnxruntime>={MIN_ORT_CALIBRATION_CACHE}'`")
    if len(calib) < MIN_CALIBRATION_WARN:
        log.warning("calibrating INT8 on only %d images; 100 or more give steadier ranges (--calib-size / --calib-data)", len(calib))
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    common = {"WeightSymmetric": True}
    if method == "percentile":
        common["CalibPercentile"] = 99.99
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep.onnx"
        try:
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantise the raw graph if it fails
            log.info("quant_pre_process skipped: %s", str(exc).splitlines()[0][:120])
            prep = src
        ranges = Path(tmp) / "ranges.json"

        def quantize(dst: Path, reader, activation_type, extra: dict) -> None:
            quantize_static(str(prep), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=activation_type, weight_type=QuantType.QInt8, calibrate_method=cm,
                            extra_options={**common, **extra}, calibration_cache_path=str(ranges))

        # the one calibration pass: ORT computes the ranges and saves them to `ranges`
        # one image a run (CALIBRATION_BATCH): histograms (entropy, percentile) are stacked per tensor across
        # batches, so every batch must have one size, and memory stays that of one image
        quantize(cpu_dst, _ArrayReader(calib), QuantType.QUInt8, {"ActivationSymmetric": False})
        # no reader: quantize_static must read the saved ranges back (it raises rather than calibrate again)
        quantize(tensorrt_dst, None, QuantType.QInt8, {"ActivationSymmetric": True, "QuantizeBias": False})
        tensors = len(json.loads(ranges.read_text())["data"])
    return {
        "method": method,
        "images": int(len(calib)),
        "format": "QDQ",
        "per_channel_weights": True,
        "calibrated_tensors": tensors,
        "graphs": [
            {"file": cpu_dst.name, "variant": "default", **INT8_CPU_LAYOUT,
             "ranges": "calibrated on these images (the one calibration pass)"},
            {"file": tensorrt_dst.name, "variant": "tensorrt", **INT8_TENSORRT_LAYOUT,
             "ranges": "the same ranges, read back from that calibration (no second pass)"},
        ],
    }
