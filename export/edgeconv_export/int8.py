"""INT8 post-training quantization that keeps its accuracy on the CPU that runs it.

The pieces ``precision.calibrate_int8`` puts together, each measured on real models:

- ``shape_nodes``: a graph that computes its own padding (TensorFlow "same" padding exported as Shape -> Div ->
  Ceil -> ... -> Cast -> Pad) must keep that arithmetic in float. ONNX Runtime's quantizer puts uint8 Q/DQ pairs
  on it, an exact 3.0 comes back as 2.9999998, the Cast to int64 truncates it to 2, and every feature map after
  that Pad is one pixel short: ImageNet EfficientNet-Lite0 kept 80.7 % top-1 agreement with FP32 (symmetric int8,
  whose scales happen to round exactly, 93.5 %). These nodes are never quantized.
- ``Statistics``: one streaming pass over the calibration images with every float tensor exposed: min/max,
  histograms for percentile/entropy (ONNX Runtime's own collector, fed one image at a time, so memory stays that
  of one image whatever the method) and the per-channel means of every Conv/Gemm input.
- ``correct_biases``: rounding int8 weights shifts every output channel's mean by (W - W_q) . E[x]; adding that
  back to the bias (Nagel et al. 2019, "Data-Free Quantization", empirical bias correction) took Lite0's
  weights-only agreement from 95.8 % to 98.0 % (cosine 0.972 -> 0.995). Computed from the weights as written
  in the quantized graph, so it matches ONNX Runtime's rounding exactly.
- Recipes (``RECIPES``): x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply uint8 activations by int8
  weights with VPMADDUBSW, which adds each pair of products in 16 bits with saturation: 255*127 + 255*127
  overflows. On VNNI (VPDPBUSD) and on ARM (SDOT/UDOT) the sums are exact int32. The ``portable`` recipe keeps
  every pair sum below 2^15 by construction (7-bit weights [-64, 64] on the layers that use that kernel), so its
  answers are the same on every CPU class; ``cpu`` keeps 8-bit weights for the CPUs where that is exact. When the
  7-bit graph misses its budget, ``portable-u8`` is the ``cpu`` graph with the dense layers' int8 weight codes stored as
  uint8 codes + 128 (zero point 128): the same numbers, so natively the same answers bit for bit, but ONNX Runtime runs those
  layers on its U8U8 kernels, which widen both operands to 16 bits (VPMADDWD) on x86 CPUs without VNNI, so no pair sum
  saturates there and the answers are the same on every CPU class (ImageNet Lite0: bit-identical logits under an emulated
  AVX2 CPU, where the U8S8 graph kept 78.1 % top-1 agreement). It is slower (on a VNNI CPU, where it never runs, 1.27x FP32 at
  batch 1 against 2.03x for the int8 graph). It widens every dense layer because the 7-bit graph's loss is spread over all of
  them: on ImageNet Lite0 (percentile ranges, classifier in float, 353 photos) the 7-bit graph kept 92.4 % agreement; widening
  the dense layers to 8 bits one at a time, the most helpful first (each ranked alone), gave 95.5 % at 10 of 33 layers, 95.8 %
  at 30 and 97.2 % only at all 33, so a graph with a few wide layers would not pass. Depthwise weights stay int8: ONNX
  Runtime's U8U8 depthwise kernel made an all-uint8 graph 0.24x FP32. 7-bit activations instead of 7-bit weights lost far more (76.8 % agreement).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("edgeconv.export")

SHAPE_SOURCES = ("Shape", "Size")
# ops whose inputs ONNX Runtime's CPU kernels multiply in int8 (QLinearConv / QLinearMatMul / QGemm)
DENSE_OPS = ("Conv", "Gemm", "MatMul")
# CPU classes: how the 8-bit products are summed there (see the module docstring)
CPU_CLASSES = ("x86-vnni", "x86-novnni", "arm64")
HIST_BINS = 2048
PERCENTILE = 99.99


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def shape_nodes(model) -> List[str]:
    """Names of the nodes that only compute shapes, sizes or pads: everything whose inputs all derive from
    Shape/Size outputs or constants. Quantizing them corrupts integer arithmetic (see the module docstring)."""
    g = model.graph
    const = {t.name for t in g.initializer} | {""}
    shape_like = set()
    names = []
    for n in g.node:  # graph order is topological
        ins = [i for i in n.input if i not in const]
        if n.op_type in SHAPE_SOURCES or n.op_type == "Constant" or (ins and all(i in shape_like for i in ins)) or (not ins and n.op_type != "Constant"):
            shape_like.update(n.output)
            if n.op_type not in SHAPE_SOURCES:
                names.append(n.name)
    return [n for n in names if n]


def dense_inputs(model) -> Dict[str, dict]:
    """{node name: {"input": activation, "weight": initializer, "depthwise": bool}} of every Conv/Gemm/MatMul with a constant weight."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in DENSE_OPS and len(n.input) > 1 and n.input[1] in inits:
            group = _attr(n, "group", 1) or 1
            out[n.name] = {"input": n.input[0], "weight": n.input[1], "op": n.op_type, "depthwise": n.op_type == "Conv" and group > 1,
                           "transB": bool(_attr(n, "transB", 0))}
    return out


@dataclass
class Statistics:
    """What one pass over the calibration images measured, per float tensor."""

    ranges: Dict[str, tuple]  # tensor -> (lowest, highest) for the chosen method
    means: Dict[str, np.ndarray]  # Conv/Gemm input tensor -> per-channel mean
    images: int  # images run through the pass (counted as they ran, not the length of what was handed in)
    method: str
    tensors: int = 0
    distinct_images: int = 0  # how many of them differ (one image run again counts once)

    def tensors_data(self):
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        return TensorsData(CalibrationMethod.MinMax, {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in self.ranges.items()})


def exposed_session(model, names: Sequence[str]):
    """An ONNX Runtime session of ``model`` that outputs the float tensors ``names`` (optimisations off: names kept)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as the graph names it
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def float_tensors(model) -> List[str]:
    """The float activations a quantizer may ask a range for: graph inputs and node outputs, not shape arithmetic."""
    import onnx
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    except Exception:  # noqa: BLE001 - shapes are a filter only; unknown types are kept
        types = {}
    skip = set(shape_nodes(model))
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for n in model.graph.node:
        if n.name in skip or n.op_type in SHAPE_SOURCES:
            continue
        names.extend(o for o in n.output if o)
    return [t for t in dict.fromkeys(names) if types.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]


def collect_statistics(model_path: Path, calib, method: str = "minmax", input_name: str = "input") -> Statistics:
    """One pass, one image at a time: ranges for ``method`` and per-channel input means of every Conv/Gemm."""
    import onnx
    from onnxruntime.quantization.calibrate import HistogramCollector

    model = onnx.load(str(model_path))
    names = float_tensors(model)
    mean_of = {d["input"] for d in dense_inputs(model).values()}
    sess = exposed_session(model, names)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    hist = None
    used = 0
    if method in ("percentile", "entropy"):
        hist = HistogramCollector(method, symmetric=False, num_bins=HIST_BINS, num_quantized_bins=128, percentile=PERCENTILE, scenario="same")
    seen = set()  # digests of the images run: the manifest records what was measured, not what was asked for
    for i in range(len(calib)):
        x = np.ascontiguousarray(calib[i : i + 1])
        seen.add(hashlib.blake2b(x.tobytes(), digest_size=16).digest())
        used += len(x)
        outs = sess.run(names, {input_name: x})
        for name, a in zip(names, outs):
            if a.size == 0:
                continue
            lo[name] = min(lo[name], float(a.min()))
            hi[name] = max(hi[name], float(a.max()))
            if name in mean_of:
                s = a.sum(axis=(0, 2, 3)) if a.ndim == 4 else a.reshape(-1, a.shape[-1]).sum(0)
                sums[name] = sums.get(name, 0) + s.astype(np.float64)
                counts[name] = counts.get(name, 0) + (a.size // a.shape[1] if a.ndim == 4 else a.size // a.shape[-1])
        if hist is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints a line per call
                hist.collect(dict(zip(names, outs)))
    ranges = {n: (lo[n], hi[n]) for n in names if np.isfinite(lo[n])}
    if hist is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            found = hist.compute_collection_result()
        for n, v in found.items():
            if n in ranges:
                ranges[n] = (max(float(v[0]), ranges[n][0]), min(float(v[1]), ranges[n][1]))
    means = {n: (sums[n] / counts[n]).astype(np.float64) for n in sums}
    return Statistics(ranges, means, used, method, len(ranges), distinct_images=len(seen))


@dataclass(frozen=True)
class Recipe:
    """How one INT8 graph is written."""

    name: str
    activation_type: str  # "uint8" | "int8"
    activation_symmetric: bool
    quantize_bias: bool  # int32 bias (ONNX Runtime CPU) or float bias (TensorRT)
    dense_weight_bits: int  # 8, or 7 where the CPU's pair sums could overflow 16 bits
    exact_on: tuple  # CPU classes whose integer sums are exact for this graph
    purpose: str = ""
    dense_weight_type: str = "int8"  # "int8" (U8S8 kernels) or "uint8" (the int8 codes + 128, zero point 128: U8U8 kernels)
    fallback: Optional[str] = None  # the recipe tried next (same CPU classes) when this one's graph misses its budget

    def layout(self) -> dict:
        weights = "int8-symmetric-per-channel" + (", 7-bit [-64, 64] on dense (not depthwise) layers" if self.dense_weight_bits == 7 else "")
        if self.dense_weight_type == "uint8":
            weights = "int8-symmetric-per-channel, stored as uint8 codes + 128 (zero point 128) on dense layers"
        return {"activations": "int8-symmetric" if self.activation_symmetric else f"{self.activation_type}-asymmetric",
                "weights": weights,
                "bias": "int32 DequantizeLinear" if self.quantize_bias else "float"}


RECIPES = {
    "cpu": Recipe("cpu", "uint8", False, True, 8, ("x86-vnni", "arm64"),
                  "ONNX Runtime CPU on VNNI x86 and ARM64: uint8 activations, int8 per-channel weights (U8S8), int32 bias"),
    "portable": Recipe("portable", "uint8", False, True, 7, CPU_CLASSES,
                       "ONNX Runtime CPU on any x86 or ARM64: U8S8 with 7-bit weights on the dense layers, whose pair sums "
                       "cannot saturate the 16-bit adds of x86 CPUs without VNNI", fallback="portable-u8"),
    "portable-u8": Recipe("portable-u8", "uint8", False, True, 8, CPU_CLASSES,
                          "ONNX Runtime CPU on any x86 or ARM64: the cpu graph with its dense weights stored as uint8 (U8U8 "
                          "kernels, which widen both operands to 16 bits on x86 CPUs without VNNI: no pair sum saturates), int8 "
                          "depthwise weights; written when the 7-bit portable graph misses its budget", dense_weight_type="uint8"),
    "tensorrt": Recipe("tensorrt", "int8", True, False, 8, (),
                       "TensorRT / ORT TensorRT provider: symmetric int8, zero points 0, float bias"),
}


def write_int8(prep: Path, dst: Path, stats: Statistics, recipe: Recipe, exclude: Sequence[str] = (), workdir: Optional[Path] = None) -> dict:
    """Quantize ``prep`` (the FP32 graph after ORT's pre-processing) into ``dst`` from ``stats``' ranges, then correct biases.
    ``exclude``: nodes kept in float (accuracy-aware fallback). Returns what the manifest records of it."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    model = onnx.load(str(prep))
    dense = dense_inputs(model)
    overrides = {}
    if recipe.dense_weight_bits == 7:
        for d in dense.values():
            if not d["depthwise"]:  # ONNX Runtime's depthwise kernels widen to 16 bits before multiplying: no pairs to saturate
                axis = 0 if d["op"] == "Conv" or d["transB"] else 1  # the output-channel axis, as per-channel quantization uses
                overrides[d["weight"]] = [{"reduce_range": True, "symmetric": True, "axis": axis}]
    skip = shape_nodes(model)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(stats.tensors_data(), cache)
        act = QuantType.QUInt8 if recipe.activation_type == "uint8" else QuantType.QInt8
        extra = {"WeightSymmetric": True, "ActivationSymmetric": recipe.activation_symmetric, "QuantizeBias": recipe.quantize_bias}
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(prep), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True, activation_type=act,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(skip) + list(exclude),
                            extra_options=extra, calibration_cache_path=str(cache))
    corrected = correct_biases(dst, model, stats.means)
    pinned = keep_float(dst, exclude) if recipe.quantize_bias else 0  # ORT CPU graphs; TensorRT runs no ORT transformer
    recoded = uint8_dense_weights(dst, dense) if recipe.dense_weight_type == "uint8" else 0
    return {"recipe": recipe.name, "dense_weight_bits": recipe.dense_weight_bits, "dense_weight_type": recipe.dense_weight_type,
            "bias_corrected_nodes": corrected, **({"uint8_weight_nodes": recoded} if recoded else {}),
            "float_nodes": list(exclude), "shape_nodes_kept_float": len(skip), "exact_on": list(recipe.exact_on),
            **({"float_inputs_per_axis": pinned} if pinned else {})}


def keep_float(path: Path, names: Sequence[str]) -> int:
    """Make the Conv/Gemm/MatMul nodes ``names`` (kept in float) stay float in ONNX Runtime; returns how many were changed.

    ONNX Runtime >= 1.21 has a level-1 graph transformer, WeightBiasQuantization, for "quantized models that do not
    have Conv/Gemm weight and bias quantized": a Conv/Gemm whose input comes from a DequantizeLinear with a scalar
    scale, whose output leads to a QuantizeLinear, and whose weight is a float initializer gets that weight quantized
    when the session starts: per-tensor int8, and its bias int32. A node the accuracy-aware fallback kept in float so
    becomes a per-tensor int8 node, worse than the per-channel one it replaced: measured on ImageNet
    EfficientNet-Lite0, keeping its first depthwise Conv in float took top-1 agreement from 94.6 % to 83.6 %
    (95.2 % with graph optimizations off). The transformer only matches a scalar input scale, so each such node gets
    its own DequantizeLinear of the same quantized tensor with the scale and zero point repeated along the channel
    axis: the same numbers by the ONNX definition, and a graph every runtime runs as written."""
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    if not wanted:
        return 0
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    changed = 0
    for i, n in enumerate(list(g.node)):
        if n.name not in wanted or n.op_type not in DENSE_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size != 1:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if n.op_type == "Conv":
            channels, axis = w.shape[1] * (_attr(n, "group", 1) or 1), 1
        elif n.op_type == "Gemm":
            channels, axis = (w.shape[1] if _attr(n, "transB", 0) else w.shape[0]), (0 if _attr(n, "transA", 0) else 1)
        else:  # MatMul: the input's last axis
            channels, axis = w.shape[0], -1
        if channels < 2:
            continue
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
        base = f"{n.name}_float_input"
        g.initializer.extend([numpy_helper.from_array(np.full(channels, scale.reshape(()), scale.dtype), base + "_scale"),
                              numpy_helper.from_array(np.full(channels, zp.reshape(()), zp.dtype), base + "_zero_point")])
        g.node.insert(i + changed, onnx.helper.make_node("DequantizeLinear", [dq.input[0], base + "_scale", base + "_zero_point"],
                                                         [base], name=base + "_DequantizeLinear", axis=axis))
        n.input[0] = base
        changed += 1
    if changed:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            g.node.remove(n)  # the old DequantizeLinear, when the float node was its only consumer
        onnx.save(m, str(path))
    return changed


def weight_dequantize(inits: dict, producer: dict, name: str):
    """The DequantizeLinear node that makes the weight tensor ``name`` from a quantized initializer, or None (kept in float)."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    return dq


def _dq_weight(inits: dict, producer: dict, name: str) -> Optional[np.ndarray]:
    """The float weight a DequantizeLinear of an int8 initializer gives, as ONNX Runtime computes it."""
    from onnx import numpy_helper

    dq = weight_dequantize(inits, producer, name)
    if dq is None:
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    axis = _attr(dq, "axis", 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def uint8_dense_weights(path: Path, dense: Dict[str, dict]) -> int:
    """Store the int8 weights of every dense (not depthwise) Conv/Gemm/MatMul as uint8 codes + 128 with zero point 128 (in
    place); returns how many. The same numbers by the ONNX definition ((q + 128) - 128 = q, same scales, same int32 bias),
    so the graph's answers are the ones of the int8 graph it was written as, but ONNX Runtime runs these layers on its U8U8
    kernels, which on x86 CPUs without VNNI widen both operands to 16 bits (VPMADDWD): no pair sum saturates there.
    (Asking ONNX Runtime's quantizer for uint8 weights instead gives other scales, and it skips the int32-bias-overflow
    widening for uint8 weights: 14 ImageNet Lite0 biases were clipped.)"""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    done = 0
    for n in m.graph.node:
        d = dense.get(n.name)  # ``dense``: dense_inputs() of the FP32 graph it was quantized from
        dq = weight_dequantize(inits, producer, n.input[1]) if d is not None and not d["depthwise"] else None
        if dq is None or len(dq.input) < 3 or dq.input[2] not in inits:
            continue
        q_t, zp_t = inits[dq.input[0]], inits[dq.input[2]]
        zp = numpy_helper.to_array(zp_t)
        if q_t.data_type != onnx.TensorProto.INT8 or zp.any():
            continue
        q_t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(q_t).astype(np.int16) + 128).astype(np.uint8), q_t.name))
        zp_t.CopyFrom(numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), zp_t.name))
        done += 1
    if done:
        onnx.save(m, str(path))
    return done


def correct_biases(path: Path, fp32_model, means: Dict[str, np.ndarray]) -> int:
    """Add (W - W_q) . E[x] to the bias of every quantized Conv/Gemm of the graph at ``path`` (in place); returns how many."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    fp_inits = {t.name: t for t in fp32_model.graph.initializer}
    dense = dense_inputs(fp32_model)
    done = 0
    for n in g.node:
        d = dense.get(n.name)
        if d is None or len(n.input) < 3 or not n.input[2] or d["input"] not in means:
            continue
        wq = _dq_weight(inits, producer, n.input[1])
        if wq is None:
            continue  # kept in float
        w = numpy_helper.to_array(fp_inits[d["weight"]]).astype(np.float64)
        err, mean = w - wq, means[d["input"]]
        if d["op"] == "Conv":
            e = err.sum(axis=tuple(range(2, err.ndim)))
            delta = e[:, 0] * mean if d["depthwise"] and e.shape[1] == 1 and len(mean) == e.shape[0] else e @ mean
        else:
            delta = err @ mean if d["transB"] else mean @ err
        bias_in = n.input[2]
        dq = producer.get(bias_in)
        if dq is not None and dq.op_type == "DequantizeLinear":  # int32 bias
            b = inits[dq.input[0]]
            scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            new = numpy_helper.to_array(b).astype(np.float64) + np.round(delta / scale)
            b.CopyFrom(numpy_helper.from_array(np.clip(new, -(2**31), 2**31 - 1).astype(np.int32), b.name))
        elif bias_in in inits:
            b = inits[bias_in]
            b.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(b).astype(np.float64) + delta).astype(np.float32), b.name))
        else:
            continue
        done += 1
    if done:
        onnx.save(m, str(path))
    return done


def cpu_classes_json(recipe: Recipe) -> str:
    return json.dumps(list(recipe.exact_on))


@dataclass
class Candidate:
    """One INT8 graph on the parity images: what the export gates and the manifest records."""

    recipe: Recipe
    path: Path
    record: dict = field(default_factory=dict)


INT16_MAX = 32767


def _u8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 codes of ``x`` as ONNX Runtime's asymmetric uint8 quantization gives them (range widened to hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return np.clip(np.round(x / scale) + zp, 0, 255).astype(np.int32)


def _s8(w: np.ndarray, bits: int = 8) -> np.ndarray:
    """Per-output-channel symmetric int8 codes (axis 0), ONNX Runtime's weight quantization."""
    qmax = 127 if bits == 8 else 64
    amax = np.abs(w.reshape(w.shape[0], -1)).max(1)
    scale = np.where(amax > 0, amax / qmax, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int32)


def _patches(x: np.ndarray, node) -> np.ndarray:
    """(positions, K) rows in the NHWC im2col order (kh, kw, cin) the x86 int8 GEMM reads, for a group-1 Conv."""
    n, c, h, w = x.shape
    kh, kw = _attr(node, "kernel_shape")
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    pt, pl, pb, pr = _attr(node, "pads", [0, 0, 0, 0])
    xp = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = [xp[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw, :] for i in range(kh) for j in range(kw)]
    return np.concatenate(cols, axis=-1).reshape(-1, kh * kw * c)


def pair_sum_peaks(model_path: Path, calib, stats: Statistics, images: int = 16, input_name: str = "input") -> Dict[str, float]:
    """For every dense (not depthwise) Conv/Gemm: the largest |a0*w0 + a1*w1| over adjacent pairs of the reduction axis, in
    units of the int16 limit, on real images with uint8 activations and 8-bit weights. Above 1.0 the VPMADDUBSW kernel of x86
    CPUs without VNNI saturates on that layer; the others give the same sums on every CPU."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    dense = {k: d for k, d in dense_inputs(model).items() if not d["depthwise"] and d["input"] in stats.ranges}
    weights = {}
    for k, d in dense.items():
        w = numpy_helper.to_array(inits[d["weight"]]).astype(np.float64)
        if d["op"] != "Conv":
            w = w if d["transB"] else w.T  # (out, K)
        q = _s8(w)
        if d["op"] == "Conv":  # (out, cin, kh, kw) -> (out, kh*kw*cin), the im2col order
            q = q.transpose(0, 2, 3, 1).reshape(q.shape[0], -1)
        if q.shape[1] % 2:
            q = np.concatenate([q, np.zeros((q.shape[0], 1), np.int32)], 1)
        weights[k] = q.reshape(q.shape[0], -1, 2)
    names = list(dict.fromkeys(d["input"] for d in dense.values()))
    sess = exposed_session(model, names)
    peaks = {k: 0.0 for k in dense}
    for i in range(min(images, len(calib))):
        acts = dict(zip(names, sess.run(names, {input_name: np.ascontiguousarray(calib[i : i + 1])})))
        for k, d in dense.items():
            lo, hi = stats.ranges[d["input"]]
            a = _u8(acts[d["input"]], lo, hi)
            rows = _patches(a, nodes[k]) if d["op"] == "Conv" else a.reshape(-1, a.shape[-1])
            if rows.shape[1] % 2:
                rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), np.int32)], 1)
            rows = rows.reshape(rows.shape[0], -1, 2)
            wq = weights[k]
            for s in range(0, len(rows), 512):  # (positions, 1, pairs, 2) x (1, out, pairs, 2) -> pair sums
                pair = (rows[s : s + 512, None] * wq[None]).sum(-1)
                peaks[k] = max(peaks[k], float(np.abs(pair).max()) / INT16_MAX)
    return peaks
