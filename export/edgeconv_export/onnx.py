"""PyTorch -> ONNX: a dynamic batch axis, stable names, metadata, checked and simplified."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from edgeconv_runtime.errors import EdgeconvError

log = logging.getLogger("edgeconv.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_QUANT_OPSET = 13  # per-channel Q/DQ (QuantizeLinear/DequantizeLinear's `axis`) first exists in opset 13


def export_onnx(model, input_shape: tuple, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace ``model`` (eval mode, CPU) to ONNX with a dynamic batch axis."""
    import torch

    model = model.eval().cpu()
    dummy = torch.zeros(1, *input_shape)
    try:
        # The TorchScript exporter is deprecated in favour of torch.export (dynamo=True), which
        # needs onnxscript; it still produces plain opset-17 graphs every runtime here accepts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)  # constant-folding notes from the tracer
            _export(torch, model, dummy, path, opset)
    except Exception as exc:  # the exporter raises many types for unsupported ops/opsets
        raise EdgeconvError(f"ONNX export failed at opset {opset}: {str(exc).splitlines()[0][:200]}; try another --opset") from exc


def _export(torch, model, dummy, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def check_onnx(path: Path) -> None:
    """``onnx.checker`` + strict shape inference: the file must be valid ONNX."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise EdgeconvError(f"{path.name} failed onnx.checker: {str(exc).splitlines()[0][:200]}") from exc


def _weight_tensors(model):
    """(name, TensorProto) of every initializer and Constant node value, subgraphs included."""
    def walk(graph):
        for t in graph.initializer:
            yield t.name, t
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield (node.output[0] if node.output else node.name), a.t
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from walk(g)

    return walk(model.graph)


def check_finite_weights(path_or_model, label: str = "the model") -> None:
    """Refuse a graph whose float weights hold NaN or inf (a diverged training run, a damaged file): no calibration,
    parity or INT8 scale means anything for them. One line naming the first such weight and how many there are."""
    import onnx
    from onnx import numpy_helper

    model = path_or_model if hasattr(path_or_model, "graph") else onnx.load(str(path_or_model))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    bad, first = 0, None
    for name, t in _weight_tensors(model):
        if t.data_type not in floats:
            continue
        a = numpy_helper.to_array(t)
        if t.data_type == onnx.TensorProto.BFLOAT16 and a.dtype.kind != "f":  # older onnx: raw bfloat16 bits
            a = (a.astype(np.uint32) << 16).view(np.float32)
        n = int(a.size - np.count_nonzero(np.isfinite(a)))
        if n:
            bad += 1
            nan = int(np.count_nonzero(np.isnan(a)))
            what = " and ".join(f"{k} {w}" for k, w in ((nan, "NaN"), (n - nan, "inf")) if k)
            first = first or (name, what, int(a.size))
    if first:
        others = f" (and {bad - 1} more weight{'s' if bad > 2 else ''})" if bad > 1 else ""
        raise EdgeconvError(f"{label} has non-finite weights: {first[0]!r} holds {first[1]} among its {first[2]} values{others}; "
                            "the model is broken (a diverged training run or a damaged file): retrain it or export it from good weights")


def node_count(path_or_model) -> int:
    import onnx

    m = onnx.load(str(path_or_model), load_external_data=False) if not hasattr(path_or_model, "graph") else path_or_model
    return len(m.graph.node)


def opset_of(path: Path) -> int:
    """The default-domain opset a graph is written in."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def simplify(src: Path, dst: Path) -> bool:
    """Simplify with onnxslim; returns False (and writes nothing) when it is unavailable or fails."""
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim not installed; keeping the unsimplified graph")
        return False
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
            onnxslim.slim(str(src), str(dst))
        return dst.is_file()
    except Exception as exc:  # a simplifier bug must not sink the export
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", str(exc).splitlines()[0][:120])
        return False


def set_metadata(path: Path, props: dict) -> None:
    """Write ``metadata_props`` (string key/values) so the .onnx alone says how to use it."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in props.items():
        entry = m.metadata_props.add()
        entry.key = k
        entry.value = v if isinstance(v, str) else json.dumps(v)
    m.producer_name = "edgeconv"
    onnx.save(m, str(path))


def ort_logits(path: Path, x: np.ndarray, batch_size: int = 64, providers: Optional[list] = None) -> np.ndarray:
    """Run an ONNX file with ONNX Runtime over ``x`` in batches."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)
