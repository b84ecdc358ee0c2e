"""Import a classifier edgeconv did not train (a plain ONNX file) into a normal bundle.

The source graph is read for what it says (input name, layout, sizes, classes, a final Softmax) and
wrapped so the bundle's graph takes the runtime's NCHW RGB float32 ``input`` and gives ``logits``:
a channel flip for BGR models, a transpose for NHWC ones, the final Softmax removed (the runtime
applies its own). ``export_bundle`` then writes the bundle as for edgeconv's own runs (slimmed FP32,
FP16, calibrated INT8, reference I/O, the same gates), with parity measured against the source file
itself, run by ONNX Runtime FP32 on the same real images in its own layout and channel order.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import sha256_file
from edgeconv_runtime.plain import size_problem
from edgeconv_runtime.preprocess import CHANNEL_ORDERS, Preprocess, PreprocessPolicy, resolve_preprocess

from . import onnx as onnx_io
from .bundle import ExportOptions, export_bundle
from .card import write_import_card
from .images import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, gather_images

log = logging.getLogger("edgeconv.export")

LAYOUTS = ("nchw", "nhwc")
OUTPUT_KINDS = ("logits", "probabilities")
MIN_QUANT_OPSET = onnx_io.MIN_QUANT_OPSET  # per-channel QDQ (QuantizeLinear's axis) needs opset 13
UPGRADE_OPSET = onnx_io.DEFAULT_OPSET
SOURCE_INPUT = "edgeconv_source_input"  # the source graph's input, once the bundle's `input` feeds it
LOG_FLOOR = 1e-30  # probabilities -> log-probabilities: softmax(log p) == p, and log(0) stays finite


@dataclass
class ImportRequest:
    """``edgeconv import``'s flags; text values ("128,128", "fp32,int8") are parsed here, so the CLI passes them as typed."""

    onnx: str
    out: str
    labels: Optional[str] = None
    size: Optional[tuple] = None  # (H, W), needed when the graph's are dynamic
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    channel_order: str = "rgb"
    layout: Optional[str] = None  # None: read from the graph
    resize: Optional[str] = None  # None: stretch (a --model: the model's own policy)
    scale: Optional[float] = None  # None: 1/255 (a --model: the model's own)
    calib_data: Optional[str] = None
    val_data: Optional[str] = None
    precisions: Optional[tuple] = None  # None: fp32, fp16, and int8 when --calib-data is given
    output: Optional[str] = None  # None: probabilities when the graph ends in Softmax
    calib_size: int = DEFAULT_CALIB_SIZE
    val_size: int = DEFAULT_VAL_SIZE
    calib_method: str = "auto"
    max_accuracy_drop: float = 1.0
    max_agreement_drop: float = ExportOptions.max_agreement_drop
    max_float_nodes: int = ExportOptions.max_float_nodes
    name: Optional[str] = None
    force: bool = False

    def __post_init__(self) -> None:
        self.size = parse_size(self.size)
        self.mean = parse_floats(self.mean, "--mean")
        self.std = parse_floats(self.std, "--std")
        if isinstance(self.precisions, str):
            self.precisions = tuple(p.strip().lower() for p in self.precisions.split(",") if p.strip())


@dataclass
class GraphInfo:
    """What the source graph says about itself."""

    input_name: str
    input_dims: list  # int where static, None where symbolic
    layout: str
    output_name: str
    num_classes: Optional[int]
    ends_in_softmax: bool
    opset: int
    ir_version: int
    notes: list = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.input_dims[1] if self.layout == "nchw" else self.input_dims[3]

    @property
    def spatial(self) -> tuple:
        return tuple(self.input_dims[2:4] if self.layout == "nchw" else self.input_dims[1:3])


# ---------------------------------------------------------------------------------------------- reading the graph
def load_source(path: str):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise EdgeconvError(f"ONNX file not found: {path}; pass the model file to import")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf decode errors, missing external data
        raise EdgeconvError(f"{p.name} is not a readable ONNX model ({str(exc).splitlines()[0][:120]}); pass an .onnx file") from exc
    if not model.graph.node:
        raise EdgeconvError(f"{p.name} holds no graph nodes; pass an ONNX model file")
    _open_unknown_dims(model)
    if any(not o.type.tensor_type.shape.dim for o in model.graph.output):
        try:  # an exporter that left the output's shape out: ONNX's own inference fills it in
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:
            log.info("shape inference failed: %s", str(exc).splitlines()[0][:120])
    return model


def _open_unknown_dims(model) -> None:
    """Dimensions declared -1 or 0 (what TensorFlow converters and some other exporters write for "any size"; ONNX has
    no such value, and ONNX Runtime would take 0 literally) are made what they mean: dynamic (no value)."""
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()


def _dims(value_info) -> list:
    """The declared dimensions, None where dynamic: a name (dim_param), nothing, or the -1 / 0 other exporters
    write for "any size" (ONNX itself has no such value, but TensorFlow and some converters emit it)."""
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def _real_inputs(graph) -> list:
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _layout(dims: list, asked: Optional[str], name: str) -> str:
    """NCHW or NHWC: from --layout, or the dimension that holds 1 or 3 channels."""
    nchw, nhwc = dims[1] in (1, 3), dims[3] in (1, 3)
    if asked:
        channels = dims[1] if asked == "nchw" else dims[3]
        if channels not in (1, 3, None):
            raise EdgeconvError(f"input {name!r} has shape {_shape_text(dims)}, which has {channels} channels in {asked.upper()}; "
                                f"edgeconv takes 1 or 3 channel images (check --layout)")
        return asked
    if nchw and not nhwc:
        return "nchw"
    if nhwc and not nchw:
        return "nhwc"
    raise EdgeconvError(f"cannot tell the layout of input {name!r} with shape {_shape_text(dims)}; pass --layout nchw or --layout nhwc")


def _shape_text(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def inspect_graph(model, layout: Optional[str] = None) -> GraphInfo:
    """Read input, layout, sizes, classes and a final Softmax; refuse what is not an image classifier."""
    import onnx

    g = model.graph
    inputs = _real_inputs(g)
    if len(inputs) != 1:
        raise EdgeconvError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            "edgeconv imports image classifiers with one image input")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type) if inp.type.tensor_type.elem_type else "unknown"
        raise EdgeconvError(f"input {inp.name!r} is {dtype}, not float32; edgeconv feeds normalised float32 images "
                            "(re-export the model with a float32 input)")
    dims = _dims(inp)
    if len(dims) != 4:
        raise EdgeconvError(f"input {inp.name!r} has shape {_shape_text(dims)}, not an image batch [N, C, H, W] or [N, H, W, C]; "
                            "edgeconv imports image classifiers")
    if len(g.output) != 1:
        raise EdgeconvError(f"the model has {len(g.output)} outputs ({', '.join(o.name for o in g.output)}); edgeconv imports "
                            "classifiers with one output of class scores (cut the graph with onnx.utils.extract_model)")
    out = g.output[0]
    out_dims = _dims(out)
    if len(out_dims) != 2:
        raise EdgeconvError(f"output {out.name!r} has shape {_shape_text(out_dims)}, not [N, classes]; edgeconv imports classifiers "
                            "with one score per class")
    producer = next((n for n in g.node if out.name in n.output), None)
    softmax = producer is not None and producer.op_type == "Softmax" and _softmax_axis(producer) in (-1, 1)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    info = GraphInfo(inp.name, dims, _layout(dims, layout, inp.name), out.name, out_dims[1], softmax, opset, model.ir_version)
    if info.channels not in (1, 3):
        raise EdgeconvError(f"input {inp.name!r} has {info.channels} channels; edgeconv takes 1 (grayscale) or 3 (colour) channel images")
    return info


def _softmax_axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), -1)


# ---------------------------------------------------------------------------------------------- rewriting the graph
def upgrade_opset(model, info: GraphInfo):
    """Graphs older than opset 13 cannot carry per-channel INT8: convert them to opset 17, and say so."""
    import onnx
    from onnx import version_converter

    if info.opset >= MIN_QUANT_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
    except Exception as exc:  # the converter has no adapter for some op
        raise EdgeconvError(f"the model is opset {info.opset} (IR {info.ir_version}), too old for INT8, and onnx could not upgrade it "
                            f"({str(exc).splitlines()[0][:120]}); re-export it at opset {MIN_QUANT_OPSET} or newer") from exc
    upgraded.ir_version = max(upgraded.ir_version, onnx.helper.find_min_ir_version_for(list(upgraded.opset_import)))
    info.notes.append(f"upgraded opset {info.opset} (IR {info.ir_version}) to opset {UPGRADE_OPSET} (IR {upgraded.ir_version}): "
                      f"INT8 needs opset {MIN_QUANT_OPSET} or newer")
    return upgraded


def as_logits(model, info: GraphInfo, output: str):
    """The graph with logits out: a final Softmax removed, or log() of probabilities that come from elsewhere."""
    import onnx

    g = model.graph
    if output == "logits":
        return model
    if info.ends_in_softmax:
        node = next(n for n in g.node if info.output_name in n.output)
        g.node.remove(node)
        _rename(g, node.input[0], info.output_name)
        info.notes.append("the model ends in Softmax: removed it, the runtime applies its own to the logits")
        return model
    probs = info.output_name + "_probabilities"
    _rename(g, info.output_name, probs)
    floor = onnx.helper.make_tensor(probs + "_floor", onnx.TensorProto.FLOAT, [], [LOG_FLOOR])
    g.initializer.append(floor)
    g.node.extend([onnx.helper.make_node("Max", [probs, floor.name], [probs + "_floored"]),
                   onnx.helper.make_node("Log", [probs + "_floored"], [info.output_name])])
    info.notes.append("--output probabilities: the bundle gives their log, which the runtime's softmax turns back into them")
    return model


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def wrap_input(model, info: GraphInfo, size: tuple, channel_order: str):
    """Put the runtime's input in front: `input` [batch, C, H, W] RGB, flipped to BGR and/or transposed to NHWC for the source."""
    import onnx
    from onnx import helper

    g = model.graph
    c = info.channels
    _rename(g, info.input_name, SOURCE_INPUT)
    src = next(i for i in g.input if i.name == info.input_name)
    g.input.remove(src)
    g.input.insert(0, helper.make_tensor_value_info(onnx_io.INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", c, *size]))
    nodes, x = [], onnx_io.INPUT_NAME
    if channel_order == "bgr" and c == 3:
        order = helper.make_tensor("edgeconv_bgr_order", onnx.TensorProto.INT64, [3], [2, 1, 0])
        g.initializer.append(order)
        nodes.append(helper.make_node("Gather", [x, order.name], ["edgeconv_bgr"], axis=1))
        x = "edgeconv_bgr"
    if info.layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [x], ["edgeconv_nhwc"], perm=[0, 2, 3, 1]))
        x = "edgeconv_nhwc"
    nodes.append(helper.make_node("Identity", [x], [SOURCE_INPUT]))
    for n in reversed(nodes):
        g.node.insert(0, n)
    _rename(g, info.output_name, onnx_io.OUTPUT_NAME)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(onnx_io.OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", info.num_classes]))
    del g.value_info[:]  # shapes recorded for a fixed batch or size: inferred again from the new input
    for i in [i for i in g.input if i.name in {t.name for t in g.initializer}]:
        g.input.remove(i)  # old IR: initializers listed as inputs would be inputs of the bundle's graph
    return model


def to_source_layout(x: np.ndarray, info: GraphInfo, channel_order: str) -> np.ndarray:
    """The runtime's NCHW RGB batch as the source graph takes it: the same images for the reference run."""
    if channel_order == "bgr" and x.shape[1] == 3:
        x = x[:, ::-1]
    if info.layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def source_outputs(model, input_name: str, x: np.ndarray, batch_size: int = 32, fixed_batch: Optional[int] = None) -> np.ndarray:
    """The source graph (as serialised bytes) run by ONNX Runtime FP32 on the CPU; a graph with a fixed batch size
    gets batches of exactly that size (the last one padded)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    step = fixed_batch or batch_size
    out = []
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if fixed_batch and len(chunk) < fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - len(chunk), axis=0)])
            out.append(sess.run(None, {input_name: chunk})[0][: len(x) - i])
    except Exception as exc:  # ORT's InvalidGraph / Fail / RuntimeException
        raise EdgeconvError(f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0][:200]}") from exc
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------- user's inputs
def read_labels(path: Optional[str], num_classes: Optional[int]) -> list:
    want = f" ({num_classes} lines for this model)" if num_classes else ""
    if not path:
        raise EdgeconvError(f"the graph does not name its classes; pass --labels FILE with one class name a line{want}")
    p = Path(path)
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeconvError(f"cannot read labels file {path} ({type(exc).__name__}); pass a UTF-8 text file, one class name a line") from exc
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise EdgeconvError(f"{path} has empty lines; give one class name a line{want}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EdgeconvError(f"{path} names class {dup!r} twice; class names must be unique")
    if num_classes is not None and len(names) != num_classes:
        raise EdgeconvError(f"{path} has {len(names)} class names but the model outputs {num_classes} classes; give one name a line, "
                            f"{num_classes} lines")
    return names


def parse_floats(text, what: str) -> Optional[tuple]:
    if text is None or isinstance(text, tuple):
        return text
    if isinstance(text, (list, float, int)):
        return tuple(float(v) for v in np.atleast_1d(text))
    try:
        return tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise EdgeconvError(f"{what} must be a comma list of numbers, got {text!r}") from None


def parse_size(text) -> Optional[tuple]:
    if text is None:
        return None
    vals = parse_floats(text if isinstance(text, (tuple, list, int)) else str(text).lower().replace("x", ","), "--size")
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(v < 1 or v != int(v) for v in vals):
        raise EdgeconvError(f"--size must be H,W (whole numbers), got {text!r}")
    return tuple(int(v) for v in vals)


def _size(info: GraphInfo, asked: Optional[tuple]) -> tuple:
    graph = info.spatial
    if None in graph:
        if asked is None:
            raise EdgeconvError(f"input {info.input_name!r} has dynamic height/width {_shape_text(info.input_dims)}; pass --size H,W")
        fixed = [(g, a) for g, a in zip(graph, asked) if g is not None and g != a]
        if fixed:
            raise EdgeconvError(f"--size {asked[0]},{asked[1]} disagrees with the graph's input {_shape_text(info.input_dims)}")
        return asked
    if asked is not None and tuple(asked) != tuple(graph):
        raise EdgeconvError(f"--size {asked[0]},{asked[1]} disagrees with the graph's input size {graph[0]},{graph[1]}; drop --size")
    return tuple(graph)


def _check_size(info: GraphInfo, size: tuple, asked: Optional[tuple]) -> None:
    """Refuse an absurd declared (or --size) input at once, before images are resized to it or memory is asked for it."""
    item = (info.channels, *size) if info.layout == "nchw" else (*size, info.channels)
    problem = size_problem(item, info.input_dims[0])
    if problem and asked is not None and None in info.spatial:
        raise EdgeconvError(f"--size {size[0]},{size[1]} makes input {info.input_name!r} {_shape_text([info.input_dims[0], *item])}: "
                            f"{problem}; pass a smaller --size H,W")
    if problem:
        raise EdgeconvError(f"input {info.input_name!r} declares {_shape_text(info.input_dims)}: {problem}; fix the graph's input shape "
                            "(re-export the model at the size it was trained for)")


def build_preprocess(req: ImportRequest, channels: int, size: tuple) -> Preprocess:
    if req.mean is None or req.std is None:
        raise EdgeconvError("the graph does not say how pixels are normalised; pass --mean and --std "
                            "(ImageNet: --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 with the default --scale; none: --mean 0,0,0 --std 1,1,1)")
    mean, std = tuple(req.mean), tuple(req.std)
    if channels == 1 and len(mean) == 3 and len(set(mean)) == 1 and len(set(std)) == 1:
        mean, std = mean[:1], std[:1]
    if len(mean) != channels or len(std) != channels:
        raise EdgeconvError(f"the model takes {channels}-channel images: --mean and --std need {channels} values each, got {len(mean)} and {len(std)}")
    if any(s == 0 for s in std):
        raise EdgeconvError("--std values must not be 0")
    asked = {"resize": req.resize, "scale": req.scale, "mean": mean, "std": std}
    return resolve_preprocess(PreprocessPolicy(size=size, channels=channels), None, asked)


# ---------------------------------------------------------------------------------------------- the import
def default_precisions(req: ImportRequest) -> tuple:
    if req.precisions:
        return tuple(req.precisions)
    return ("fp32", "fp16", "int8") if req.calib_data else ("fp32", "fp16")


def check_request(req: ImportRequest) -> None:
    if req.channel_order not in CHANNEL_ORDERS:
        raise EdgeconvError(f"unknown --channel-order {req.channel_order!r}; use rgb or bgr")
    if req.layout is not None and req.layout not in LAYOUTS:
        raise EdgeconvError(f"unknown --layout {req.layout!r}; use nchw or nhwc")
    if req.output is not None and req.output not in OUTPUT_KINDS:
        raise EdgeconvError(f"unknown --output {req.output!r}; use logits or probabilities")
    if Path(req.out).exists() and not req.force:
        raise EdgeconvError(f"{req.out} already exists; pass --force to replace it or choose another --out")
    if not req.calib_data and not req.val_data:
        raise EdgeconvError("parity is checked on real images; pass --val-data DIR or --calib-data DIR (a folder of images)")
    if "int8" in default_precisions(req) and not req.calib_data:
        raise EdgeconvError("INT8 needs calibration images; pass --calib-data with a folder of real images")


def import_onnx(req: ImportRequest):
    """Read, wrap and check ``req.onnx`` and write a bundle at ``req.out``; returns the manifest."""
    t0 = time.perf_counter()
    check_request(req)
    opts = ExportOptions(precisions=default_precisions(req), calibration_method=req.calib_method, max_accuracy_drop=req.max_accuracy_drop,
                         max_agreement_drop=req.max_agreement_drop, max_float_nodes=req.max_float_nodes, force=req.force)
    opts.validate()
    source = load_source(req.onnx)
    info = inspect_graph(source, req.layout)
    output = req.output or ("probabilities" if info.ends_in_softmax else "logits")
    size = _size(info, req.size)
    _check_size(info, size, req.size)
    onnx_io.check_finite_weights(source, Path(req.onnx).name)  # before any image is read or calibrated on
    pre = build_preprocess(req, info.channels, size)
    classes = read_labels(req.labels, info.num_classes)
    info.num_classes = len(classes)

    images = gather_images(req.val_data or req.calib_data, req.calib_data if "int8" in opts.precisions else None, pre,
                           req.val_size, req.calib_size, val_flag="--val-data" if req.val_data else "--calib-data")
    reference = as_logits(copy.deepcopy(source), info, output)  # the source's own graph: layout, opset, names
    ref_logits = source_outputs(reference, info.input_name, to_source_layout(images.val_x, info, req.channel_order),
                                fixed_batch=info.input_dims[0])
    if ref_logits.shape != (len(images.val_x), len(classes)):
        raise EdgeconvError(f"the model outputs shape {list(ref_logits.shape)} for {len(images.val_x)} images, not [N, {len(classes)}]")
    bundle_graph = wrap_input(upgrade_opset(reference, info), info, size, req.channel_order)
    for note in info.notes:
        log.warning("%s", note)
    name = req.name or Path(req.onnx).stem
    with tempfile.TemporaryDirectory(prefix="edgeconv-import-") as tmp:
        graph_path = Path(tmp) / "model.onnx"
        _save_checked(bundle_graph, graph_path, images.val_x[:2], ref_logits[:2])
        inputs = images.export_inputs(
            name, classes, pre, ref_logits, onnx_source=graph_path, reference_name="the source ONNX (ONNX Runtime FP32)",
            source={"imported": str(Path(req.onnx).resolve()), "sha256": sha256_file(req.onnx),
                    "input": {"name": info.input_name, "shape": _shape_text(info.input_dims), "layout": info.layout.upper(),
                              "channel_order": req.channel_order.upper()},
                    "output": {"name": info.output_name, "kind": output}, "opset": info.opset, "ir_version": info.ir_version,
                    "notes": info.notes})
        manifest = export_bundle(inputs, req.out, opts)
    write_import_card(Path(req.out), manifest, round(time.perf_counter() - t0, 3))
    return manifest


def _save_checked(model, path: Path, x: np.ndarray, expected: np.ndarray) -> None:
    """Save the bundle's graph; it must run a batch of two and give the source's outputs (a fixed batch of 1 cannot)."""
    import onnx

    onnx.save(model, str(path))
    try:
        got = source_outputs(model, onnx_io.INPUT_NAME, np.ascontiguousarray(x), batch_size=len(x))
    except EdgeconvError as exc:
        raise EdgeconvError(f"the model cannot run batches of 2 once its batch axis is made dynamic ({str(exc)[:160]}); "
                            "re-export it with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={...}))") from exc
    if got.shape != expected.shape:
        raise EdgeconvError(f"the model gives outputs of shape {list(got.shape)} for a batch of {len(x)}, not {list(expected.shape)}; "
                            "its graph fixes the batch size: re-export it with a dynamic batch axis")
