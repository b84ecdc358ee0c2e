"""INT8 from quantization-aware training: the run's QDQ graph (``qat.onnx``, written by ``edgeconv train --qat``)
becomes the bundle's CPU INT8 graph as it is, and its TensorRT-ready twin is derived from the same learned ranges.

Nothing is calibrated here: scales and zero points are the ones training learned. The CPU graph keeps uint8
activations with their zero points, int8 per-channel weights holding 7-bit values (no int16 overflow in the u8 x s8
pair sums of AVX2 CPUs without VNNI) and int32 biases. The TensorRT graph (symmetric int8 activations, zero points 0,
float bias) maps each learned activation range [lo, hi] onto int8 with scale max(|lo|, |hi|) / 127: the same
ranges, one bit coarser where an activation is one-sided (after a ReLU); the export's gates judge it like any other.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgeconv_runtime.errors import EdgeconvError

from .onnx import INPUT_NAME, OUTPUT_NAME

QAT_CPU_LAYOUT = {"activations": "uint8-asymmetric (ranges learned in training)", "weights": "int8-symmetric-per-channel, 7-bit values [-64, 63]",
                  "bias": "int32 DequantizeLinear"}
QAT_TENSORRT_LAYOUT = {"activations": "int8-symmetric (the learned ranges, symmetrised)", "weights": "int8-symmetric-per-channel, 7-bit values [-64, 63]",
                       "bias": "float"}
METADATA_KEY = "edgeconv.qat"


def write_qat_int8(qat_onnx: Path, cpu_dst: Path, tensorrt_dst: Path) -> dict:
    """Copy the QAT graph to ``cpu_dst``, derive the symmetric TensorRT graph at ``tensorrt_dst``; the calibration record."""
    import json

    import onnx

    model = _load_checked(qat_onnx)
    meta = next((json.loads(p.value) for p in model.metadata_props if p.key == METADATA_KEY), {})
    weights = _weight_range(model)
    shutil.copyfile(qat_onnx, cpu_dst)
    symmetric, activations = tensorrt_variant(model)
    onnx.save(symmetric, str(tensorrt_dst))
    return {
        "method": "qat",
        "images": None,
        "format": "QDQ",
        "per_channel_weights": True,
        "quantized_activations": activations,
        "weight_values": weights,
        "training": {k: meta[k] for k in ("epochs", "lr", "best_epoch", "weight_range", "activation_range") if k in meta},
        "graphs": [
            {"file": cpu_dst.name, "variant": "default", **QAT_CPU_LAYOUT, "ranges": "learned in quantization-aware training (qat.onnx as written)"},
            {"file": tensorrt_dst.name, "variant": "tensorrt", **QAT_TENSORRT_LAYOUT,
             "ranges": "the same learned ranges, each mapped onto symmetric int8"},
        ],
    }


def _load_checked(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise EdgeconvError(f"{path} is not a readable QAT graph ({str(exc).splitlines()[0][:160]}); rerun `edgeconv train --qat --from RUN`") from exc
    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME] or not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise EdgeconvError(f"{path} is not a QAT graph written by `edgeconv train --qat` (inputs {ins}, outputs {outs}); rerun it")
    return model


def _weight_range(model) -> list:
    """[min, max] over every int8 initializer (the weights)."""
    from onnx import numpy_helper

    lo, hi = 0, 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.int8 and a.size > 1:
            lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return [lo, hi]


def tensorrt_variant(model):
    """A copy of a QDQ graph with symmetric int8 activations (zero points 0) and float biases; (model, activations changed)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    pairs = {(n.input[1], n.input[2]) for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) == 3}
    users: dict = {}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3:
            users.setdefault(n.input[2], set()).add(n.input[1])
    changed = 0
    for scale_name, zp_name in sorted(pairs):
        if scale_name not in inits or zp_name not in inits or users.get(zp_name) != {scale_name}:
            raise EdgeconvError("the QAT graph's scales are not initializers paired with their zero points; cannot derive its TensorRT graph")
        zp = numpy_helper.to_array(inits[zp_name])
        if zp.dtype != np.uint8:
            continue
        s = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        lo, hi = (0 - zp.astype(np.float64)) * s, (255 - zp.astype(np.float64)) * s
        new_s = (np.maximum(np.abs(lo), np.abs(hi)) / 127.0).astype(np.float32)
        inits[scale_name].CopyFrom(numpy_helper.from_array(new_s.reshape(s.shape), scale_name))
        inits[zp_name].CopyFrom(numpy_helper.from_array(np.zeros(zp.shape, dtype=np.int8), zp_name))
        changed += 1
    # int32 biases behind DequantizeLinear become float initializers
    keep = []
    for n in g.node:
        x = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if x is not None and x.data_type == onnx.TensorProto.INT32:
            q = numpy_helper.to_array(x).astype(np.float64)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            g.initializer.append(numpy_helper.from_array((q * s).astype(np.float32), n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.checker.check_model(m, full_check=True)
    return m, changed
