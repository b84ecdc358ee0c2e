"""Single ONNX files, the one place that handles them: for `Model.load` (a file of a bundle, a file carrying edgeconv
metadata, or a plain graph whose classes are its output indices) and for `bench` (any graph with a static or
--shape-given input, fed random inputs or the images of --data, as trtexec and Polygraphy run them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backends.select import graph_mismatch, graph_shapes
from .bundle import Bundle, bundle_from_onnx_metadata, read_bundle
from .errors import EdgeconvError
from .manifest import MANIFEST_NAME, PRECISIONS, Manifest
from .preprocess import Preprocess

# The largest input a graph may declare (or --shape / --size ask for): a side of 8192 pixels is already far beyond
# any classifier's input (ImageNet models take 224-600), and 3 x 8192 x 8192 float32 values are 805 MB for one image.
# A graph that declares more (an exporter's placeholder such as [N, 3, 1000000, 1000000]) is refused at once, not
# after minutes of resizing images to it or an allocation of terabytes.
MAX_INPUT_SIDE = 8192
MAX_INPUT_ELEMENTS = 3 * MAX_INPUT_SIDE * MAX_INPUT_SIDE  # values in one input tensor (one item, or one batch of them)

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(uint8)": np.uint8,
               "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def precision_of(path: Path) -> str:
    parts = path.name.lower().split(".")
    return next((p for p in parts if p in PRECISIONS), "fp32")


def plain_bundle(path: Path, backend) -> tuple:
    """(bundle, info) for an ONNX file without labels or preprocessing: classes are the output indices, images are
    stretched to the graph's size and scaled to [0, 1]. Refused in one line where the graph is no NCHW image classifier."""
    shapes = graph_shapes(backend)
    got_in, got_out = shapes if shapes else ([], [])
    fix = f"give it labels and preprocessing with `edgeconv import {path.name} ...`"
    if len(got_in) == 4 and got_in[3] in (1, 3) and got_in[1] not in (1, 3):
        raise EdgeconvError(f"{path.name} takes NHWC input {got_in}; images are fed NCHW: {fix} --layout nhwc")
    if len(got_in) != 4 or got_in[1] not in (1, 3):
        raise EdgeconvError(f"{path.name} takes input {got_in}, not images [N, C, H, W]; `edgeconv-runtime bench {path.name}` runs any graph")
    if not all(isinstance(d, int) for d in got_in[2:]):
        raise EdgeconvError(f"{path.name} takes images of any height/width {got_in}; {fix} --size H,W")
    if len(got_out) != 2 or not isinstance(got_out[1], int):
        raise EdgeconvError(f"{path.name} outputs {got_out}, not one score per class [N, classes]; `edgeconv-runtime bench {path.name}` runs any graph")
    c = got_in[1]
    pre = Preprocess(size=tuple(got_in[2:]), channels=c, mean=(0.0,) * c, std=(1.0,) * c)  # [0, 1] for 1 or 3 channels
    classes = [str(i) for i in range(got_out[1])]
    bundle = Bundle(path.parent, Manifest(name=path.stem, classes=classes, preprocess=pre.to_dict()), pre, classes)
    note = (f"{path.name} carries no labels or preprocessing: classes are output indices, images are stretched to "
            f"{got_in[2]}x{got_in[3]} and scaled to [0, 1]; {fix}")
    return bundle, {"plain": True, "fixed_batch": got_in[0] if isinstance(got_in[0], int) else None, "note": note}


def onnx_file_bundle(path: Path, backend) -> tuple:
    """(bundle, info) for a single .onnx file: its bundle's manifest, its edgeconv metadata, or none (a plain graph)."""
    meta = backend.session.get_modelmeta().custom_metadata_map if hasattr(backend, "session") else {}
    info: dict = {}
    if (path.parent / MANIFEST_NAME).is_file():
        bundle = read_bundle(path.parent)
    elif "edgeconv.classes" in meta:
        bundle = bundle_from_onnx_metadata(path, meta)
    else:
        bundle, info = plain_bundle(path, backend)
    problem = graph_mismatch(bundle, backend)
    if problem:
        raise EdgeconvError(problem)
    return bundle, info



@dataclass
class BenchTarget:
    """What `bench` measures: a bundle (its reference inputs and images), or a plain ONNX file (random or --data inputs)."""

    name: str
    sha256: str
    inputs: np.ndarray  # one model input per row, tiled to each batch size
    load: Callable  # (backend, precision) -> a model with run(), backend_name, backend, close()
    jpeg_bytes: list = field(default_factory=list)
    batch_sizes: Optional[list] = None  # a graph that fixes its batch size runs only that one
    accuracy: Optional[Callable] = None  # model -> accuracy on --data


class PlainGraph:
    """An ONNX file run as it is by one backend (``auto``: ONNX Runtime on the CPU), at its own precision."""

    def __init__(self, path: Path, backend: str, precision: str, threads: Optional[int]):
        from .backends import backend_for_file, create_backend

        own = precision_of(path)
        precision = precision or own  # bench without --precision: the graph's own
        name = backend_for_file(path) if backend == "auto" else backend  # .onnx: onnxruntime-cpu
        if precision != own and name not in ("onnxruntime-tensorrt",):
            raise EdgeconvError(f"{path.name} is a plain {own} graph and {name} runs it as it is; bench it with --precision {own} "
                                f"(`edgeconv import` makes fp16 and int8 artifacts)")
        self.backend = create_backend(name, str(path), threads, precision=precision)
        self.backend_name = self.backend.name
        self.precision = precision

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.backend.infer(x)

    def close(self) -> None:
        self.backend.close()


def image_axes(item: tuple) -> Optional[tuple]:
    """(height, width) of one item that looks like an image (C,H,W or H,W,C with 1 or 3 channels), else None."""
    if len(item) != 3:
        return None
    if item[0] in (1, 3):
        return tuple(item[1:])
    return tuple(item[:2]) if item[2] in (1, 3) else None


def size_problem(item: tuple, batch: Optional[int] = None) -> Optional[str]:
    """What is absurd about an input of one item shaped ``item`` (None where open) in batches of ``batch``, or None."""
    hw = image_axes(item)
    if hw and any(d is not None and d > MAX_INPUT_SIDE for d in hw):
        return f"{hw[0]} x {hw[1]} pixels, over the {MAX_INPUT_SIDE}-pixel side edgeconv accepts"
    known = [d for d in item if d is not None]
    n = int(np.prod(known, dtype=np.float64)) if known else 0
    if n > MAX_INPUT_ELEMENTS:
        return f"{n:,} values per item, over the {MAX_INPUT_ELEMENTS:,} edgeconv accepts"
    if batch and n * batch > MAX_INPUT_ELEMENTS:
        return f"{n * batch:,} values in a batch of {batch}, over the {MAX_INPUT_ELEMENTS:,} edgeconv accepts in one input"
    return None


def graph_input(path: Path) -> tuple:
    """(name, dims with None where symbolic, numpy dtype) of the graph's first input."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        inp = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_inputs()[0]
    except Exception as exc:  # not ONNX, or a graph ONNX Runtime refuses
        raise EdgeconvError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:160]}") from exc
    if inp.type not in ONNX_DTYPES:
        raise EdgeconvError(f"{path.name} takes {inp.type}; bench feeds numeric tensors")
    return inp.name, [d if isinstance(d, int) and d > 0 else None for d in inp.shape], ONNX_DTYPES[inp.type]


def _shape_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def item_shape(path: Path, dims: list, shape: Optional[tuple]) -> tuple:
    """One item's input shape (no batch): the graph's, with --shape filling (and checked against) its dimensions."""
    graph = ",".join("?" if d is None else str(d) for d in dims[1:])
    if shape is None:
        if None in dims[1:]:
            raise EdgeconvError(f"{path.name} leaves input dimensions open (batch,{graph}); pass --shape with one item's shape, e.g. "
                                f"--shape {','.join('224' if d is None else str(d) for d in dims[1:])}")
        return tuple(dims[1:])
    if len(shape) != len(dims) - 1 or any(d is not None and d != s for d, s in zip(dims[1:], shape)):
        raise EdgeconvError(f"--shape {','.join(map(str, shape))} does not fit the graph's input (batch,{graph}); give one item's shape")
    return tuple(shape)


def image_inputs(folder: str, item: tuple, n: int) -> np.ndarray:
    """Up to ``n`` images of --data stretched to the graph's size, scaled to [0, 1], in its layout (NCHW or NHWC)."""
    from .imagefolder import image_files
    from .preprocess import load_pixels, normalize

    nchw = len(item) == 3 and item[0] in (1, 3)
    if len(item) != 3 or not (nchw or item[2] in (1, 3)):
        raise EdgeconvError(f"--data gives images, but the graph takes items of shape {list(item)}; leave --data out for random inputs")
    channels, size = (item[0], item[1:]) if nchw else (item[2], item[:2])
    root = Path(folder)
    files = image_files(root)[:n] if root.is_dir() else []
    if not files:
        raise EdgeconvError(f"--data {folder} holds no images; pass a folder of images")
    pre = Preprocess(size=size, channels=channels)
    x = normalize(np.stack([load_pixels(f, pre, strict=False) for f in files]), pre)
    return x if nchw else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def graph_target(cfg) -> BenchTarget:
    """`bench FILE.onnx`: random inputs (seeded) or --data images; no labels, so no accuracy."""
    from .fileio import sha256_file

    path = Path(cfg.bundle)
    if not path.is_file():
        raise EdgeconvError(f"model not found: {cfg.bundle}; pass a bundle directory or an .onnx file")
    _, dims, dtype = graph_input(path)
    item = item_shape(path, dims, cfg.shape)
    problem = size_problem(item, dims[0])
    if problem:
        given = "--shape asks for" if cfg.shape and None in dims[1:] else "the graph declares"
        raise EdgeconvError(f"{path.name}: {given} an input of {_shape_text([dims[0], *item])}: {problem}; "
                            + ("pass a smaller --shape" if given.startswith("--") else "fix the graph's input shape (re-export it at its real size)"))
    problem = size_problem(item, max(cfg.batch_sizes)) if dims[0] is None else None
    if problem:
        raise EdgeconvError(f"{path.name} takes items of {_shape_text(list(item))}: {problem}; pass smaller --batch-sizes")
    n = max(cfg.batch_sizes) if dims[0] is None else dims[0]
    if cfg.data:
        x = image_inputs(cfg.data, item, n).astype(dtype)
    elif np.issubdtype(dtype, np.floating):
        x = np.random.default_rng(0).standard_normal((n, *item)).astype(dtype)
    else:
        x = np.random.default_rng(0).integers(0, 2 if dtype == np.bool_ else 100, (n, *item)).astype(dtype)
    return BenchTarget(path.stem, sha256_file(path), x, lambda backend, precision: PlainGraph(path, backend, precision, cfg.threads),
                       batch_sizes=None if dims[0] is None else [dims[0]])
