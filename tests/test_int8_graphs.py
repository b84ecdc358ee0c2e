"""Every INT8 bundle carries two graphs from one calibration (issue 12, 2.2).

``model.int8.onnx``: uint8 activations with zero points, ONNX Runtime's fast CPU path.
``model.int8.trt.onnx``: symmetric int8 activations and weights, every zero point 0 and float
bias, the only QDQ form TensorRT and ORT's TensorRT provider accept. Read node by node here.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from edgeconv_runtime.manifest import INT8_TENSORRT_ONNX, ONNX_FILES, read_manifest

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _graph(path):
    """The model, its initializers as arrays, its Q/DQ nodes, and the element type of every tensor."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    types = {t.name: t.data_type for t in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)})
    return model, inits, [n for n in g.node if n.op_type in QDQ], types


def test_tensorrt_graph_is_symmetric_int8_with_float_bias(mnist_bundle):
    _, inits, nodes, types = _graph(mnist_bundle / INT8_TENSORRT_ONNX)
    assert {n.op_type for n in nodes} == set(QDQ)
    assert not any(n.domain for n in nodes)  # standard ONNX Q/DQ, not com.microsoft contrib ops
    for n in nodes:
        # an omitted zero point means uint8 by the ONNX spec, so it must be there
        assert len(n.input) == 3 and n.input[2] in inits and n.input[1] in inits, n.name
        zp, scale = inits[n.input[2]], inits[n.input[1]]
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point {zp.dtype} {zp.ravel()[:4]}"
        assert scale.dtype == np.float32 and (scale > 0).all() and np.isfinite(scale).all(), n.name
        if n.op_type == "DequantizeLinear":
            assert types[n.input[0]] == TensorProto.INT8, f"{n.name} dequantizes a {TensorProto.DataType.Name(types[n.input[0]])} tensor"
        else:
            assert types[n.output[0]] == TensorProto.INT8, f"{n.name} quantizes to {TensorProto.DataType.Name(types[n.output[0]])}"
    assert not any(v.dtype == np.int32 for v in inits.values())  # float bias: no int32 tensor at all
    weights = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[1]].size > 1 for n in weights if inits[n.input[0]].ndim == 4)  # per-channel conv weights


def test_cpu_graph_keeps_uint8_activations(mnist_bundle):
    _, inits, nodes, types = _graph(mnist_bundle / ONNX_FILES["int8"])
    q = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert q and all(types[n.output[0]] == TensorProto.UINT8 for n in q)
    assert any(inits[n.input[2]].any() for n in q)  # asymmetric: some zero points are not 0
    weights = [inits[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {w.dtype for w in weights} == {np.dtype(np.int8), np.dtype(np.int32)}  # int8 weights, int32 bias


def test_both_graphs_share_one_calibration(mnist_bundle):
    """Same ranges: a symmetric int8 scale is max|range| / 127, and the uint8 scale and zero point
    give that range back to within half a uint8 step (the zero point is rounded)."""
    _, cpu, cpu_nodes, _ = _graph(mnist_bundle / ONNX_FILES["int8"])
    _, trt, trt_nodes, _ = _graph(mnist_bundle / INT8_TENSORRT_ONNX)
    q_cpu = {n.input[0]: n for n in cpu_nodes if n.op_type == "QuantizeLinear"}
    q_trt = {n.input[0]: n for n in trt_nodes if n.op_type == "QuantizeLinear"}
    shared = set(q_cpu) & set(q_trt)
    assert len(shared) == len(q_cpu)  # every CPU activation range is in the TensorRT graph too
    for name in shared:
        s_u, zp = float(cpu[q_cpu[name].input[1]]), int(cpu[q_cpu[name].input[2]])
        absmax = max(zp * s_u, (255 - zp) * s_u)
        assert abs(127 * float(trt[q_trt[name].input[1]]) - absmax) <= 0.501 * s_u, name
    record = read_manifest(mnist_bundle).calibration
    assert [(g["file"], g["variant"], g["activations"], g["bias"]) for g in record["graphs"]] == [
        ("model.int8.onnx", "default", "uint8-asymmetric", "int32 DequantizeLinear"),
        ("model.int8.portable.onnx", "portable", "uint8-asymmetric", "int32 DequantizeLinear"),
        ("model.int8.trt.onnx", "tensorrt", "int8-symmetric", "float"),
    ]
    assert record["calibrated_tensors"] >= len(shared) and record["images"] == 200


def test_both_graphs_pass_the_gate_and_agree(mnist_bundle):
    m = read_manifest(mnist_bundle)
    cpu, trt = m.find("onnx", "int8"), m.find("onnx", "int8", variant="tensorrt")
    assert cpu.file == "model.int8.onnx" and trt.file == INT8_TENSORRT_ONNX
    assert "TensorRT" in trt.purpose and cpu.variant == "default"
    for a in (cpu, trt):
        assert a.parity["n"] == 500 and a.parity["accuracy_drop_points"] <= m.parity["max_accuracy_drop_points"]
    x = np.load(mnist_bundle / "reference" / "inputs.npy")
    top1 = [ort.InferenceSession(str(mnist_bundle / a.file), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)
            for a in (cpu, trt)]
    agreement = float((top1[0] == top1[1]).mean())
    print(json.dumps({"reference_images": len(x), "top1_agreement_cpu_vs_tensorrt_graph": agreement}))
    assert agreement >= 7 / 8
