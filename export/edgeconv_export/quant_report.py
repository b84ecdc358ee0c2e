"""Layer by layer: how far each quantized tensor of a bundle's INT8 graph is from the FP32 graph's, on real images.

Polygraphy's layer-wise comparison is the model: both graphs run with every compared tensor exposed (graph
optimisations off, so tensors keep their names), and each tensor the INT8 graph quantizes is compared as its
consumers see it (after QuantizeLinear -> DequantizeLinear) with the same tensor of the FP32 graph. Errors
accumulate downstream; a tensor much worse than the ones feeding it is where precision is lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from edgeconv_runtime.errors import EdgeconvError

MAX_IMAGES = 64


@dataclass
class TensorRow:
    tensor: str
    op: str  # the op that produces it in the FP32 graph
    shape: tuple
    cosine: float
    max_abs_err: float
    rel_err: float  # mean |err| / mean |fp32|
    fp32_range: tuple

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "op": self.op, "shape": list(self.shape), "cosine": self.cosine, "max_abs_err": self.max_abs_err,
                "rel_err": self.rel_err, "fp32_min": self.fp32_range[0], "fp32_max": self.fp32_range[1]}


def _pairs(int8_model, fp32_model) -> List[tuple]:
    """(fp32 tensor, int8 tensor as consumers see it, producer op) for every activation the INT8 graph quantizes."""
    produced = {o: n.op_type for n in fp32_model.graph.node for o in n.output}
    produced.update({i.name: "input" for i in fp32_model.graph.input})
    by_input = {}
    for n in int8_model.graph.node:
        if n.op_type == "DequantizeLinear":
            by_input.setdefault(n.input[0], n.output[0])
    pairs = []
    for n in int8_model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in produced and n.output[0] in by_input:
            pairs.append((n.input[0], by_input[n.output[0]], produced[n.input[0]]))
    return list(dict.fromkeys(pairs))


def _run(model, names: List[str], x: np.ndarray, input_name: str) -> List[np.ndarray]:
    from .int8 import exposed_session

    return exposed_session(model, names).run(names, {input_name: x})


def quant_report(bundle_dir, data: Optional[str] = None, variant: str = "default", images: int = 16) -> dict:
    """Rows for every quantized tensor of the bundle's INT8 graph ``variant``, worst (lowest cosine) first."""
    import onnx

    from edgeconv_runtime.bundle import read_bundle
    from edgeconv_runtime.preprocess import IMAGE_EXTENSIONS, preprocess_images

    bundle = read_bundle(bundle_dir)
    if not bundle.has("onnx", "int8", variant):
        have = [a.variant for a in bundle.manifest.artifacts if a.precision == "int8"]
        raise EdgeconvError(f"{bundle_dir} has no INT8 graph of variant {variant!r} (it has {', '.join(have) or 'none'}); "
                            "export it with --precision int8 or pick --variant from those")
    int8_path, art = bundle.artifact("onnx", "int8", variant=variant)
    fp32_path, _ = bundle.artifact("onnx", "fp32")
    images = max(1, min(images, MAX_IMAGES))
    if data:
        root = Path(data)
        if not root.is_dir():
            raise EdgeconvError(f"--data {data} is not a folder of images; pass a folder (class sub-folders are fine)")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:images]
        if not files:
            raise EdgeconvError(f"no images under {data}; pass a folder of JPEG/PNG images")
        x = preprocess_images(files, bundle.preprocess, strict=False)
        source = f"{len(x)} images of {data}"
    else:
        ref = bundle.manifest.reference or {}
        if "inputs" not in ref:
            raise EdgeconvError(f"{bundle_dir} has no reference inputs; pass --data with a folder of real images")
        x = np.load(bundle.path(ref["inputs"]), allow_pickle=False)[:images]
        source = f"the bundle's {len(x)} reference images"
    int8_model, fp32_model = onnx.load(str(int8_path)), onnx.load(str(fp32_path))
    pairs = _pairs(int8_model, fp32_model)
    if not pairs:
        raise EdgeconvError(f"{int8_path.name} has no quantized tensors named like the FP32 graph's; re-export the bundle")
    input_name = bundle.manifest.input.get("name", "input")
    x = np.ascontiguousarray(x.astype(np.float32))
    ref_out = _run(fp32_model, [p[0] for p in pairs], x, input_name)
    got_out = _run(int8_model, [p[1] for p in pairs], x, input_name)
    rows = []
    for (name, _, op), a, b in zip(pairs, ref_out, got_out):
        if a.shape != b.shape:
            continue
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cos = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        err = np.abs(a64 - b64)
        rows.append(TensorRow(name, op, tuple(a.shape[1:]), round(cos, 6), float(err.max()), float(err.mean() / (np.abs(a64).mean() or 1.0)),
                              (float(a64.min()), float(a64.max()))))
    rows.sort(key=lambda r: r.cosine)
    return {"bundle": str(bundle_dir), "graph": art.file, "variant": variant, "images": source, "tensors": len(rows),
            "float_nodes": (art.details.get("int8") or {}).get("float_nodes", []), "rows": [r.to_dict() for r in rows]}


def format_report(report: dict, top: Optional[int] = None) -> str:
    rows = report["rows"][:top] if top else report["rows"]
    lines = [f"{report['graph']} vs FP32 on {report['images']}: {report['tensors']} quantized tensors, worst first"
             + (f"; kept in float: {', '.join(report['float_nodes'])}" if report["float_nodes"] else "")]
    lines.append(f"{'cosine':>9} {'max|err|':>10} {'rel err':>8}  {'op':<18} {'fp32 range':<20} tensor")
    for r in rows:
        rng = f"[{r['fp32_min']:.3g}, {r['fp32_max']:.3g}]"
        lines.append(f"{r['cosine']:>9.6f} {r['max_abs_err']:>10.4g} {r['rel_err']:>8.4f}  {r['op']:<18} {rng:<20} {r['tensor']}")
    return "\n".join(lines)
