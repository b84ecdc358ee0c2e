"""FP16 conversion and INT8 static quantisation (QDQ, per-channel weights) of an FP32 ONNX file.

INT8 gives up to three graphs from one calibration (int8.py says why): one for CPUs whose 8-bit sums are exact
(VNNI x86, ARM64), a portable one for every CPU, one for TensorRT; each is judged on its own and, when it misses the
accuracy budget, keeps its most sensitive nodes in float (``fit_to_budget``)."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import PRECISIONS  # noqa: F401  (re-exported: the runtime owns the list)

from .int8 import RECIPES, Recipe, collect_statistics, dense_inputs, write_int8
from .onnx import INPUT_NAME

log = logging.getLogger("edgeconv.export")

CALIBRATION_METHODS = ("auto", "minmax", "entropy", "percentile")
# "auto": min/max ranges first; a graph that misses its budget is written again from the 99.99th-percentile ranges (a
# second calibration pass, made only then) and the better of the two is the start of the float fallback. Measured on
# ImageNet EfficientNet-Lite0 (200 calibration, 353 validation photos, VNNI CPU): top-1 agreement 94.6 % from min/max,
# 96.6 % from percentile; on the cats/dogs flagship min/max already keeps it (98.6 % vs FP32 98.7 %).
AUTO_RANGES = ("minmax", "percentile")
# ImageNet Lite0, cpu recipe, percentile ranges, no float node: 94.6 % top-1 agreement from 50 calibration photos, 95.8 %
# from 100, 96.6 % from 200; 300 more gave 95.8 or 97.2 % by which 300 (benchmarks/int8_cheap_fixes.py; per-tensor weights: 85.6 %)
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


INT8_CPU_PURPOSE = RECIPES["cpu"].purpose
INT8_PORTABLE_PURPOSE = RECIPES["portable"].purpose
INT8_TENSORRT_PURPOSE = RECIPES["tensorrt"].purpose
MIN_ORT_CALIBRATION_CACHE = "1.27"  # first onnxruntime whose quantize_static takes calibration_cache_path
# accuracy-aware fallback: how many quantized nodes may be kept in float before INT8 is refused, and how many
# parity images rank the nodes (every step is then judged on all of them)
MAX_FLOAT_NODES = 12
SENSITIVITY_IMAGES = 64


class Int8Writer:
    """One calibration pass on real images, then any INT8 graph of the FP32 graph from the same ranges.

    ``prep`` is the FP32 graph after ONNX Runtime's pre-processing (shape inference, BN folding), with a name on
    every node so nodes can be kept in float by name; ``stats`` the ranges, histograms' thresholds and Conv/Gemm
    input means measured on ``calib`` one image at a time (memory: one image, whatever the method)."""

    def __init__(self, src: Path, calib, method: str, workdir: Path):
        import inspect

        import onnxruntime
        from onnxruntime.quantization import quantize_static

        if method not in CALIBRATION_METHODS:
            raise EdgeconvError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
        if calib is None or len(calib) == 0:
            raise EdgeconvError("no calibration images; pass --calib-data with a folder of real training images")
        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            raise EdgeconvError(f"INT8 export needs onnxruntime >= {MIN_ORT_CALIBRATION_CACHE} (found {onnxruntime.__version__}) "
                                f"to write every INT8 graph from one calibration; run `pip install -U 'onnxruntime>={MIN_ORT_CALIBRATION_CACHE}'`")
        if len(calib) < MIN_CALIBRATION_WARN:
            log.warning("calibrating INT8 on only %d images; 100 or more give steadier ranges (--calib-size / --calib-data)", len(calib))
        self.workdir = workdir
        self.prep = workdir / ".int8.prep.onnx"
        _preprocess_for_quantization(src, self.prep)
        self.method = method
        self.ranges = AUTO_RANGES if method == "auto" else (method,)  # the ranges a graph may be written from, in order
        self._calib = calib
        self._stats = {self.ranges[0]: collect_statistics(self.prep, calib, self.ranges[0], INPUT_NAME)}
        self._order: Optional[List[str]] = None
        self.order_from = None

    @property
    def stats(self):
        """The first ranges' statistics (what one calibration pass measured)."""
        return self._stats[self.ranges[0]]

    @stats.setter
    def stats(self, value) -> None:
        self._stats[self.ranges[0]] = value

    def stats_for(self, ranges: str):
        """Statistics for ``ranges`` (one of ``self.ranges``), measured on first use: a second pass over the same images."""
        if ranges not in self._stats:
            self._stats[ranges] = collect_statistics(self.prep, self._calib, ranges, INPUT_NAME)
        return self._stats[ranges]

    def write(self, dst: Path, recipe: Recipe, float_nodes: Sequence[str] = (), ranges: Optional[str] = None) -> dict:
        ranges = ranges or self.ranges[0]
        record = write_int8(self.prep, dst, self.stats_for(ranges), recipe, float_nodes, workdir=self.workdir)
        record["ranges"] = ranges
        return record

    def sensitivity_order(self, trial: Path, recipe: Recipe, rank, ranges: Optional[str] = None) -> List[str]:
        """Quantized nodes, most sensitive first: each kept in float alone, ranked by ``rank(graph)`` (lower: better).
        Measured once, on the first recipe that needs it; the other graphs share the order (same nodes, same ranges)."""
        if self._order is None:
            scores = []
            for node in self.candidates():
                self.write(trial, recipe, [node], ranges)
                scores.append((rank(trial), node))
            self._order = [n for _, n in sorted(scores)]
            self.order_from = recipe.name
        return self._order

    def candidates(self) -> List[str]:
        """Nodes the accuracy-aware fallback may keep in float: the quantized Conv/Gemm/MatMul (the int8 arithmetic)."""
        import onnx

        return list(dense_inputs(onnx.load(str(self.prep))))

    def record(self) -> dict:
        return {"method": self.method, "ranges_measured": list(self._stats), "images": self.stats.images, "distinct_images": self.stats.distinct_images, "format": "QDQ",
                "per_channel_weights": True,
                "calibrated_tensors": self.stats.tensors, "bias_correction": "empirical, per output channel (W - W_q) . E[x]"}

    def close(self) -> None:
        self.prep.unlink(missing_ok=True)


def _preprocess_for_quantization(src: Path, dst: Path) -> None:
    """ONNX Runtime's pre-processing (an optimisation: the raw graph when it fails), and a unique name on every node."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantise the raw graph if it fails
        log.info("quant_pre_process skipped: %s", str(exc).splitlines()[0][:120])
        shutil.copyfile(src, dst)
    model = onnx.load(str(dst))
    seen = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    onnx.save(model, str(dst))


def fit_to_budget(writer: Int8Writer, dst: Path, recipe: Recipe, judge, limit: int = MAX_FLOAT_NODES, rank=None) -> dict:
    """Write ``recipe`` to ``dst`` from each of the writer's ranges in turn until ``judge(path)`` finds no problem; when
    none passes, start from the better one and keep the most sensitive quantized nodes in float, one at a time, until it
    passes or ``limit`` nodes are float. ``judge`` returns (problem or None, score) with a lower
    score better; ``rank(path)`` (default ``judge``'s score) measures one node's sensitivity. Returns the graph's record with
    ``passed``, the float nodes, the nodes tried and the best problem seen."""
    chain = [recipe]  # the recipe, then its fallbacks (e.g. portable -> portable-u8), each from every ranges in turn
    while chain[-1].fallback:
        chain.append(RECIPES[chain[-1].fallback])
    starts = []  # (score, order, record) per (recipe, ranges) tried: the cheap fixes before any float node
    for rec in chain:
        for ranges in writer.ranges:
            record = writer.write(dst, rec, ranges=ranges)
            problem, score = judge(dst)
            record.update({"passed": problem is None, "problem": problem, "method": "calibrated"})
            starts.append((score, len(starts), record))
            if problem is None:
                break
        if problem is None:
            break
    tried = list(dict.fromkeys(r["ranges"] for _, _, r in starts))
    recipes_tried = list(dict.fromkeys(r["recipe"] for _, _, r in starts))
    if problem is None:
        record.update({"ranges_tried": tried, "recipes_tried": recipes_tried})
        return record
    score, _, record = min(starts, key=lambda t: t[:2])  # the fallback starts from the better recipe and ranges
    problem, ranges, recipe = record["problem"], record["ranges"], {r.name: r for r in chain}[record["recipe"]]
    record.update({"ranges_tried": tried, "recipes_tried": recipes_tried})
    if limit <= 0:
        return record
    trial = dst.with_name(dst.name + ".trial")
    order = writer.sensitivity_order(trial, recipe, rank or (lambda p: judge(p)[1]), ranges)
    floats, best = [], (problem, score, [])
    for node in order[:limit]:
        floats.append(node)
        rec = writer.write(trial, recipe, floats, ranges)
        problem, score = judge(trial)
        if score < best[1]:
            best = (problem, score, list(floats))
        if problem is None:
            trial.replace(dst)
            rec.update({"passed": True, "problem": None, "method": "accuracy-aware", "nodes_tried": len(floats), "ranges_tried": tried,
                        "recipes_tried": recipes_tried})
            return rec
    trial.unlink(missing_ok=True)
    record.update({"passed": False, "method": "accuracy-aware", "nodes_tried": len(floats), "tried": floats,
                   "best_problem": best[0], "best_float_nodes": best[2]})
    return record
