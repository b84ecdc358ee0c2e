"""FP16 conversion and INT8 static quantisation (QDQ, per-channel weights) of an FP32 ONNX file."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from edgeconv_runtime.errors import EdgeconvError

from .onnx import INPUT_NAME

log = logging.getLogger("edgeconv.export")

PRECISIONS = ("fp32", "fp16", "int8")
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


class _ArrayReader:
    """ONNX Runtime calibration reader over a preprocessed NCHW float32 array."""

    def __init__(self, x: np.ndarray, batch_size: int = 16):
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


def calibrate_int8(src: Path, dst: Path, calib: np.ndarray, method: str = "minmax", symmetric_activations: bool = False) -> dict:
    """Static QDQ quantisation calibrated on real images; returns the record for the manifest.

    ``symmetric_activations`` gives int8 activations with zero-point 0, which TensorRT's
    explicit quantisation requires; otherwise activations are uint8, ONNX Runtime's fast
    path on x86 (VNNI's u8 x s8 dot product).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise EdgeconvError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if len(calib) == 0:
        raise EdgeconvError("no calibration images; pass --calib-data with a folder of real training images")
    if len(calib) < MIN_CALIBRATION_WARN:
        log.warning("calibrating INT8 on only %d images; 100 or more give steadier ranges (--calib-size / --calib-data)", len(calib))
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep.onnx"
        try:
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantise the raw graph if it fails
            log.info("quant_pre_process skipped: %s", str(exc).splitlines()[0][:120])
            prep = src
        extra = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
        if method == "percentile":
            extra["CalibPercentile"] = 99.99
        quantize_static(
            str(prep),
            str(dst),
            _ArrayReader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=cm,
            extra_options=extra,
        )
    return {
        "method": method,
        "images": int(len(calib)),
        "format": "QDQ",
        "per_channel_weights": True,
        "activations": "int8-symmetric" if symmetric_activations else "uint8",
        "weights": "int8-symmetric",
    }
