"""Write a self-describing bundle: ONNX artifacts per precision, TensorRT engines, manifest, reference.

The caller hands over the PyTorch model, its preprocessing and real images (validation
split for parity, training images for INT8 calibration); nothing here knows how the model
was trained. Everything is written into a temp directory that replaces ``out`` only when
every artifact passed its parity gate.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edgeconv_runtime.versions import library_versions
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_directory, sha256_file
from edgeconv_runtime.cpuclass import CPU_CLASSES, cpu_class
from edgeconv_runtime.manifest import INT8_PORTABLE_ONNX, INT8_TENSORRT_ONNX, ONNX_FILES, PRECISIONS, Artifact, Manifest, read_manifest, write_manifest
from edgeconv_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgeconv_runtime.signing import sign_bundle
from edgeconv_runtime.parity import TOLERANCES, parity_report, tolerance_problems
from edgeconv_runtime.preprocess import Preprocess, normalize

from . import onnx as onnx_io
from .int8 import RECIPES
from .precision import CALIBRATION_METHODS, MAX_FLOAT_NODES, SENSITIVITY_IMAGES, Int8Writer, convert_fp16, fit_to_budget

log = logging.getLogger("edgeconv.export")

FORMATS = ("onnx", "tensorrt", "triton")
FP32_MAX_ABS = TOLERANCES["fp32"]["export_max_abs_diff"]  # why it differs from the device's limit: parity.py
REFERENCE_IMAGES = 8
# images per forward pass of the reference model and of the parity sessions: at 64, a 300 px
# EfficientNet-Lite0 export peaked 1.9 GB (PyTorch) and 3.6 GB (ONNX Runtime) above its images, at 16
# 0.6 GB (ORT: +382 MB on 32 images, +224 MB at 8); the speed per image on a CPU hardly changes
PARITY_BATCH = 8
EXPORT_LIBRARIES = ("torch", "onnx", "onnxslim")  # recorded in the manifest beside the runtime's own


@dataclass
class ExportOptions:
    precisions: tuple = ("fp32",)
    formats: tuple = ("onnx",)
    opset: int = onnx_io.DEFAULT_OPSET
    calibration_method: str = "auto"
    max_accuracy_drop: float = 1.0  # points of accuracy an FP16/INT8 artifact may lose vs FP32
    # without labels (an import's images in no class folders) "accuracy" is top-1 agreement with the source, a far stricter
    # measure (near-ties among 1,000 classes flip): the points of agreement an FP16/INT8 artifact may lose there
    max_agreement_drop: float = 3.0
    max_float_nodes: int = MAX_FLOAT_NODES  # accuracy-aware INT8: quantized nodes that may stay float (0: off)
    simplify: bool = True
    batch_min: int = 1
    batch_opt: int = 8
    batch_max: int = 32
    timing_cache: Optional[str] = None
    force: bool = False

    def validate(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise EdgeconvError(f"unknown precision {bad[0]!r}; use a comma list of {', '.join(PRECISIONS)}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise EdgeconvError(f"unknown format {bad[0]!r}; use a comma list of {', '.join(FORMATS)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise EdgeconvError(f"unknown calibration method {self.calibration_method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise EdgeconvError("TensorRT profile needs 1 <= --batch-min <= --batch-opt <= --batch-max")
        if "int8" in self.precisions and int(self.opset) < onnx_io.MIN_QUANT_OPSET:
            # the INT8 graphs quantize weights per channel: DequantizeLinear's `axis`, unknown to the checker before 13
            raise EdgeconvError(f"--opset {self.opset} cannot carry INT8 (per-channel QuantizeLinear/DequantizeLinear need opset "
                                f"{onnx_io.MIN_QUANT_OPSET}); export with --opset {onnx_io.MIN_QUANT_OPSET} or newer (default "
                                f"{onnx_io.DEFAULT_OPSET}), or without int8")


class NormalizedImages:
    """uint8 NHWC pixels that slice into preprocessed NCHW float32 batches, so parity and
    calibration sets never exist as one float32 array (four times their pixels' bytes).
    Stands wherever ExportInputs takes an image array: ``len(x)`` and ``x[i:j]`` are all it needs."""

    def __init__(self, pixels: np.ndarray, pre: Preprocess):
        self.pixels, self.pre = pixels, pre

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return normalize(self.pixels[rows], self.pre)


@dataclass
class ExportInputs:
    """What the caller knows about the model: everything the bundle must carry."""

    model: object  # torch.nn.Module in eval mode; None when ``onnx_source`` is given
    name: str
    classes: list
    preprocess: Preprocess
    val_x: np.ndarray  # real validation images, preprocessed NCHW float32 (or NormalizedImages)
    val_y: np.ndarray
    calib_x: Optional[np.ndarray] = None  # real training images for INT8, preprocessed (or NormalizedImages)
    reference_files: list = field(default_factory=list)  # source image file per val_x row, when from files
    reference_pixels: Optional[np.ndarray] = None  # uint8 NHWC pixels per val_x row, when from arrays
    source: dict = field(default_factory=dict)
    calibration_source: Optional[str] = None
    # an imported model: an FP32 graph taking `input` (NCHW float32) and giving `logits`, shipped instead of tracing
    # ``model``, and the outputs the artifacts are gated against (the source file run by ONNX Runtime FP32)
    onnx_source: Optional[Path] = None
    reference_logits: Optional[np.ndarray] = None
    reference_name: str = "PyTorch"
    labels_from_reference: bool = False  # val_y is the reference's own top-1 (no class folders): drops are in agreement
    qat_onnx: Optional[Path] = None  # a QDQ graph from quantization-aware training: shipped as the INT8 graph, not calibrated


def _in_batches(run, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``run`` (a contiguous batch -> its logits) over ``x`` in batches of ``batch_size``, as one float32 array."""
    return np.concatenate([run(np.ascontiguousarray(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]).astype(np.float32)


def torch_logits(model, x: np.ndarray, batch_size: int = PARITY_BATCH) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return _in_batches(lambda b: model(torch.from_numpy(b)).numpy(), x, batch_size)


def _fp32_agrees(report: dict) -> bool:
    """FP32 must match PyTorch: every top-1 the same and every logit within the export limit."""
    return report["top1_agreement"] == 1.0 and not tolerance_problems(report, "fp32", at_export=True)


def runtime_logits(path: Path, x: np.ndarray, batch_size: int = PARITY_BATCH) -> np.ndarray:
    """Run an exported file through the runtime's own CPU backend, the code a device will run."""
    from edgeconv_runtime.backends import create_backend

    backend = create_backend("onnxruntime-cpu", str(path))
    try:
        return _in_batches(backend.infer, x, batch_size)
    finally:
        backend.close()


def simulated_logits(path: Path, x: np.ndarray, batch_size: int = PARITY_BATCH) -> np.ndarray:
    """A QDQ graph's outputs with ONNX Runtime's graph optimizations off: every QuantizeLinear/DequantizeLinear runs as
    written and the layers between them in float, so the integer arithmetic is simulated without saturation, the same on
    every CPU. How the TensorRT graph is judged: TensorRT sums in 32 bits, where ONNX Runtime's fused kernels saturate on x86
    CPUs without VNNI (on an AVX2 Zen 3 the flagship's TensorRT graph scored 95.4 % through them against FP32's 98.7 %,
    so the export dropped it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return _in_batches(lambda b: sess.run(None, {name: b})[0], x, batch_size)


def _budget(inp: ExportInputs, opts: ExportOptions) -> tuple:
    """(points an FP16/INT8 artifact may lose, what they are points of, the flag that sets them)."""
    if inp.labels_from_reference:
        return opts.max_agreement_drop, "top-1 agreement", "--max-agreement-drop"
    return opts.max_accuracy_drop, "accuracy", "--max-accuracy-drop"


def _drop_problem(precision: str, report: dict, fp32_accuracy: float, budget: tuple) -> Optional[str]:
    """Why ``report`` misses the budget against FP32 (sets report["accuracy_drop_points"]), or None."""
    max_drop, what, flag = budget
    drop = round(100.0 * (fp32_accuracy - report["accuracy"]), 9)  # 1 image in 100 is 1.0 points, not 1.0000000000000009
    report["accuracy_drop_points"] = round(drop, 3)
    if drop > max_drop:
        return (f"{precision} {what} {100 * report['accuracy']:.2f} % is {drop:.2f} points below FP32 {100 * fp32_accuracy:.2f} % "
                f"(allowed {max_drop} by {flag})")
    return None


def _gate(precision: str, report: dict, fp32_accuracy: float, max_drop, reference: str = "PyTorch") -> None:
    """Refuse an artifact whose outputs disagree with the reference (PyTorch) beyond its precision's tolerance."""
    if not report["finite"]:
        raise EdgeconvError(f"{precision} model produced NaN/Inf logits on the validation images; it cannot be shipped")
    if precision == "fp32":
        if not _fp32_agrees(report):
            raise EdgeconvError(
                f"FP32 ONNX disagrees with {reference}: top-1 agreement {report['top1_agreement']:.4f}, "
                f"max abs diff {report['max_abs_diff']:.2e} (limits 1.0 and {FP32_MAX_ABS:.0e}); the export is broken, not shipped"
            )
        return
    budget = max_drop if isinstance(max_drop, tuple) else (max_drop, "accuracy", "--max-accuracy-drop")
    problem = _drop_problem(precision, report, fp32_accuracy, budget)
    if problem:
        hint = "; calibrate on more images (--calib-size) or try --calib-method entropy/percentile" if precision == "int8" else ""
        raise EdgeconvError(problem + hint)


def _gate_reference(precision: str, report: dict) -> None:
    """Refuse an artifact that would fail `verify` on this very CPU: the reference images the bundle ships, judged with
    the device's tolerance (FP32 passes it whenever it passed its stricter export limit). Without this, a low-margin model
    could pass the accuracy-drop gate and still ship a bundle whose server never gets ready."""
    problems = tolerance_problems(report, precision)
    if problems:
        hint = "calibrate on more images (--calib-size) or try --calib-method entropy/percentile" if precision == "int8" else \
            "export without it (--precision)"
        raise EdgeconvError(f"{precision} would fail `verify` on the bundle's own {report['n']} reference images ({'; '.join(problems)}); {hint}")


def _write_reference_images(folder: Path, inp: ExportInputs, k: int) -> list:
    """The encoded images behind the reference tensors, so `verify` re-checks preprocessing too."""
    folder.mkdir()
    names = []
    if inp.reference_files:
        for i, f in enumerate(inp.reference_files[:k]):
            name = f"{i:03d}{Path(f).suffix.lower()}"
            shutil.copyfile(f, folder / name)
            names.append(f"reference/images/{name}")
    elif inp.reference_pixels is not None:
        from PIL import Image

        for i, px in enumerate(inp.reference_pixels[:k]):
            name = f"{i:03d}.png"
            Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(folder / name)
            names.append(f"reference/images/{name}")
    return names


def _external_data(path: Path) -> list:
    """Files an ONNX graph keeps its tensors in (ONNX Runtime reads them beside it), relative to its folder."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in names:
                names.append(loc)
    return names


def covered_files(root: Path, manifest: Manifest) -> dict:
    """sha256 of every file in the bundle the runtime may read that is not an artifact (those carry their own).

    A bundle holds regular files only: the runtime refuses a symlink, FIFO or unlisted file, so one here is an error now.
    """
    import stat as _stat

    skip = {a.file for a in manifest.artifacts} | {MANIFEST_NAME, SIGNATURE_NAME}
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        mode = p.lstat().st_mode
        if _stat.S_ISDIR(mode) or rel in skip:
            continue
        if not _stat.S_ISREG(mode):
            raise EdgeconvError(f"the bundle being written holds {rel}, which is not a regular file (a symlink, FIFO...); it cannot be shipped")
        files[rel] = sha256_file(p)
    return files


def export_bundle(inp: ExportInputs, out: str | Path, opts: ExportOptions) -> Manifest:
    """Export, check parity of every artifact on real images, and write the bundle atomically."""
    precisions = _check_request(inp, opts)
    t0 = time.perf_counter()
    ref_logits = inp.reference_logits if inp.reference_logits is not None else torch_logits(inp.model, inp.val_x)
    with atomic_directory(out, force=opts.force) as tmp:
        fp32 = _write_fp32(tmp, inp, opts, ref_logits)
        calibration = _write_lower_precisions(tmp, inp, opts, precisions, fp32.metadata)  # FP16, and INT8 from QAT
        artifacts = _gated_artifacts(tmp, inp, opts, precisions, fp32, ref_logits)
        if "int8" in precisions and inp.qat_onnx is None:
            int8_artifacts, calibration = _calibrated_int8(tmp, inp, opts, fp32, ref_logits, artifacts[0].parity["accuracy"])
            artifacts.extend(int8_artifacts)
        manifest = Manifest(
            name=inp.name,
            classes=list(inp.classes),
            input={"name": onnx_io.INPUT_NAME, "shape": ["batch", *inp.preprocess.input_shape], "layout": "NCHW", "dtype": "float32"},
            output={"name": onnx_io.OUTPUT_NAME, "shape": ["batch", len(inp.classes)], "dtype": "float32"},
            preprocess=inp.preprocess.to_dict(),
            artifacts=artifacts,
            source=inp.source,
            versions=library_versions(EXPORT_LIBRARIES),
            parity={"images": int(len(inp.val_x)), "split": inp.source.get("parity_split", "val"),
                    "pytorch_accuracy": float((ref_logits.argmax(1) == inp.val_y).mean()), "fp32_max_abs_limit": FP32_MAX_ABS,
                    "max_accuracy_drop_points": opts.max_accuracy_drop, "reference": inp.reference_name},
            reference=_write_reference(tmp / "reference", inp, ref_logits),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            calibration=calibration,
            export_seconds=round(time.perf_counter() - t0, 3),
        )
        manifest.files = covered_files(tmp, manifest)
        write_manifest(tmp, manifest)
        if "tensorrt" in opts.formats:
            # the runtime's own builder (the one `edgeconv-runtime build-engine` runs on a device), on the finished
            # bundle before it replaces --out: an engine that fails its gate fails the export
            from edgeconv_runtime.engine import EngineOptions, build_engines

            build_engines(tmp, EngineOptions(precisions, (opts.batch_min, opts.batch_opt, opts.batch_max), timing_cache=opts.timing_cache),
                          quiet=True)
            manifest = read_manifest(tmp)
        if getattr(opts, "sign_key", None):  # `edgeconv export --sign-key`: the signature goes in with the bundle, in the same swap
            sign_bundle(tmp, opts.sign_key)
    return manifest


def _check_request(inp: ExportInputs, opts: ExportOptions) -> tuple:
    """The precisions to write (FP32 first: the reference for the others); refusals before anything is written."""
    opts.validate()
    precisions = tuple(dict.fromkeys(("fp32",) + tuple(opts.precisions)))
    if "tensorrt" in opts.formats:
        from edgeconv_runtime.engine import require_tensorrt

        require_tensorrt()
    if "int8" in precisions and (inp.calib_x is None or len(inp.calib_x) == 0):
        raise EdgeconvError("INT8 needs calibration images and none were found; pass --calib-data with a folder of real training images")
    if len(inp.val_x) == 0:
        raise EdgeconvError("no validation images to check parity on; pass --val-data with real images")
    return precisions


@dataclass
class _Fp32Graph:
    path: Path
    metadata: dict  # the edgeconv.* metadata_props every artifact carries
    details: dict  # opset, node counts, whether onnxslim was kept
    report: Optional[dict]  # parity already measured on the shipped graph (when simplified), so not run twice


def _write_fp32(tmp: Path, inp: ExportInputs, opts: ExportOptions, ref_logits: np.ndarray) -> _Fp32Graph:
    """The FP32 ONNX: exported (or the source graph copied), checked, simplified if that keeps parity, labelled."""
    fp32, raw = tmp / ONNX_FILES["fp32"], tmp / ".raw.onnx"
    if inp.onnx_source is not None:
        shutil.copyfile(inp.onnx_source, raw)
    else:
        onnx_io.export_onnx(inp.model, inp.preprocess.input_shape, raw, opts.opset)
    onnx_io.check_onnx(raw)
    onnx_io.check_finite_weights(raw)  # NaN/inf weights: refused before simplifying, parity and calibration
    nodes_before = onnx_io.node_count(raw)
    report = _simplified(raw, fp32, inp, ref_logits) if opts.simplify else None
    if report is None:
        raw.replace(fp32)
    raw.unlink(missing_ok=True)
    metadata = {
        "edgeconv.name": inp.name,
        "edgeconv.classes": inp.classes,
        "edgeconv.preprocess": inp.preprocess.to_dict(),
        "edgeconv.input_layout": "NCHW",
    }
    onnx_io.set_metadata(fp32, metadata)  # only metadata_props: a parity report of the simplified graph still holds
    onnx_io.check_onnx(fp32)
    details = {"opset": onnx_io.opset_of(fp32), "nodes_before_simplify": nodes_before, "nodes": onnx_io.node_count(fp32),
               "simplified": report is not None}
    return _Fp32Graph(fp32, metadata, details, report)


def _simplified(raw: Path, fp32: Path, inp: ExportInputs, ref_logits: np.ndarray) -> Optional[dict]:
    """onnxslim's graph as ``fp32`` and its parity report, or None (``raw`` stays) when it fails or changes the outputs."""
    slim = raw.with_name(".slim.onnx")
    if not onnx_io.simplify(raw, slim):
        return None
    onnx_io.check_onnx(slim)
    r = parity_report(ref_logits, runtime_logits(slim, inp.val_x), inp.val_y)
    if not _fp32_agrees(r):
        log.warning("onnxslim changed the outputs (max abs diff %.2e); keeping the unsimplified graph", r["max_abs_diff"])
        slim.unlink()
        return None
    slim.replace(fp32)
    return r


def _write_lower_precisions(tmp: Path, inp: ExportInputs, opts: ExportOptions, precisions: tuple, metadata: dict) -> Optional[dict]:
    """FP16 and INT8 graphs beside the FP32 one; the INT8 calibration record (None without INT8)."""
    fp32 = tmp / ONNX_FILES["fp32"]
    if "fp16" in precisions:
        convert_fp16(fp32, tmp / ONNX_FILES["fp16"])
        onnx_io.set_metadata(tmp / ONNX_FILES["fp16"], metadata)
    if "int8" not in precisions:
        return None
    if inp.qat_onnx is None:
        return None  # calibrated INT8 is written and judged graph by graph (_calibrated_int8), after FP32's accuracy is known
    from .qat import write_qat_int8  # ranges learned in training (edgeconv train --qat): nothing to calibrate

    calibration = write_qat_int8(inp.qat_onnx, tmp / ONNX_FILES["int8"], tmp / INT8_TENSORRT_ONNX)
    calibration["source"] = inp.calibration_source
    onnx_io.set_metadata(tmp / ONNX_FILES["int8"], metadata)
    onnx_io.set_metadata(tmp / INT8_TENSORRT_ONNX, metadata)
    return calibration


def _gated_artifacts(tmp: Path, inp: ExportInputs, opts: ExportOptions, precisions: tuple, fp32: _Fp32Graph,
                     ref_logits: np.ndarray) -> list:
    """Every ONNX artifact measured on the parity images and gated (FP32 first: the others' accuracy drop is against it)."""
    qat = "int8" in precisions and inp.qat_onnx is not None  # calibrated INT8 graphs are judged in _calibrated_int8
    onnx_files = [(prec, "default", ONNX_FILES[prec]) for prec in precisions if prec != "int8" or qat]
    if qat:
        onnx_files.append(("int8", "tensorrt", INT8_TENSORRT_ONNX))
    purposes = {("int8", "default"): "ONNX Runtime CPU, every x86 and ARM64 CPU: ranges from quantization-aware training, 7-bit weights",
                ("int8", "tensorrt"): RECIPES["tensorrt"].purpose}
    artifacts, fp32_accuracy = [], None
    for prec, variant, name in onnx_files:
        path = tmp / name
        if prec != "fp32":
            onnx_io.check_onnx(path)
        if prec == "fp32" and fp32.report:
            report = fp32.report
        else:
            logits = runtime_logits(path, inp.val_x)
            report = parity_report(ref_logits, logits, inp.val_y)
            if variant == "default" and prec != "fp32":
                _gate_reference(prec, parity_report(ref_logits[:REFERENCE_IMAGES], logits[:REFERENCE_IMAGES]))
        report["backend"] = "onnxruntime-cpu"
        if prec == "fp32":
            fp32_accuracy = report["accuracy"]
        _gate(prec, report, fp32_accuracy, _budget(inp, opts), inp.reference_name)
        details = dict(fp32.details) if prec == "fp32" else {"opset": fp32.details["opset"], "nodes": onnx_io.node_count(path)}
        if qat and (prec, variant) == ("int8", "default"):
            details["validated_cpu_classes"] = list(CPU_CLASSES)  # 7-bit weights: no pair sum can saturate anywhere
        external = _external_data(path)
        if external:  # covered by the manifest's files map, checked by the runtime with the graph
            details["external_data"] = external
        artifacts.append(Artifact(path.name, "onnx", prec, sha256_file(path), path.stat().st_size, report, details,
                                  variant=variant, purpose=purposes.get((prec, variant), "")))
    return artifacts


def _write_reference(ref_dir: Path, inp: ExportInputs, ref_logits: np.ndarray) -> dict:
    """Reference inputs and the reference's outputs, so a device can re-check the model later (`verify`)."""
    ref_dir.mkdir()
    k = min(REFERENCE_IMAGES, len(inp.val_x))
    np.save(ref_dir / "inputs.npy", inp.val_x[:k])
    np.save(ref_dir / "outputs.npy", ref_logits[:k])
    np.save(ref_dir / "labels.npy", inp.val_y[:k].astype(np.int64))
    images = _write_reference_images(ref_dir / "images", inp, k)
    return {"inputs": "reference/inputs.npy", "outputs": "reference/outputs.npy", "labels": "reference/labels.npy",
            "n": k, "images": images, "source_files": [str(f) for f in inp.reference_files[:k]]}


# the calibrated INT8 graphs: (variant, file, recipe). "default" must pass; the others are dropped with a warning when they miss
INT8_GRAPHS = (("default", ONNX_FILES["int8"], "cpu"), ("portable", INT8_PORTABLE_ONNX, "portable"), ("tensorrt", INT8_TENSORRT_ONNX, "tensorrt"))


def _kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL divergence of the candidate's softmax from the reference's: how far INT8 moved the answers (lower is better)."""
    r = ref.astype(np.float64) - ref.max(1, keepdims=True)
    c = cand.astype(np.float64) - cand.max(1, keepdims=True)
    lp = r - np.log(np.exp(r).sum(1, keepdims=True))
    lq = c - np.log(np.exp(c).sum(1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def _calibrated_int8(tmp: Path, inp: ExportInputs, opts: ExportOptions, fp32: _Fp32Graph, ref_logits: np.ndarray,
                     fp32_accuracy: float) -> tuple:
    """Calibrate once, write each INT8 graph, judge each on its own (accuracy budget and the reference images' `verify`);
    a graph that misses keeps its most sensitive nodes in float until it passes (``fit_to_budget``). The CPU graphs run
    through the runtime's ONNX Runtime backend, the TensorRT graph through ``simulated_logits`` (TensorRT's sums, on any
    CPU), and so does the cpu graph on x86 without VNNI, whose 16-bit pair sums would saturate it: it is judged for the CPU
    classes it is exact on, and such a CPU runs the portable graph. The CPU graph must pass; the portable and TensorRT
    graphs are dropped with a warning (the TensorRT one is required with --format tensorrt)."""
    budget = _budget(inp, opts)
    here = cpu_class()
    writer = Int8Writer(tmp / ONNX_FILES["fp32"], inp.calib_x, opts.calibration_method, tmp)
    sub = inp.val_x[:SENSITIVITY_IMAGES]
    reports = {}

    def judges(run) -> tuple:
        """judge (budget and `verify`) and rank (sensitivity) of a graph whose outputs ``run`` computes."""
        def judge(path: Path) -> tuple:
            logits = run(path, inp.val_x)
            report = parity_report(ref_logits, logits, inp.val_y)
            problems = [] if report["finite"] else ["outputs contain NaN/Inf"]
            problems += [p for p in [_drop_problem("int8", report, fp32_accuracy, budget)] if p]
            k = min(REFERENCE_IMAGES, len(logits))
            problems += [f"`verify` on the {k} reference images: {p}" for p in tolerance_problems(parity_report(ref_logits[:k], logits[:k]), "int8")]
            reports[path.name] = report
            return ("; ".join(problems) or None), _kl(ref_logits, logits)

        def rank(path: Path) -> float:
            return _kl(ref_logits[: len(sub)], run(path, sub))

        return judge, rank

    artifacts, graphs = [], []
    try:
        for variant, name, recipe_name in INT8_GRAPHS:
            recipe, path = RECIPES[recipe_name], tmp / name
            # a CPU graph runs as a device's ONNX Runtime runs it, on this CPU; the TensorRT graph as TensorRT sums, and so
            # does a CPU graph on a known CPU class whose sums saturate for it (the cpu graph on x86 without VNNI): it is
            # judged for the classes it is exact on, where it will run (Model.load gives this CPU the portable graph)
            simulated = variant == "tensorrt" or (here in CPU_CLASSES and here not in recipe.exact_on)
            judge, rank = judges(simulated_logits if simulated else runtime_logits)
            record = fit_to_budget(writer, path, recipe, judge, opts.max_float_nodes, rank)
            recipe_name = record.get("recipe", recipe_name)  # a fallback recipe may have written it (portable -> portable-u8)
            recipe = RECIPES.get(recipe_name, recipe)
            required = variant == "default" or (variant == "tensorrt" and "tensorrt" in opts.formats)
            if not record["passed"]:
                message = _int8_refusal(name, recipe_name, record, opts)
                path.unlink(missing_ok=True)
                if required:
                    raise EdgeconvError(message)
                log.warning("dropped %s", message)
                graphs.append({"file": name, "variant": variant, "recipe": recipe_name, "dropped": record.get("best_problem") or record["problem"]})
                continue
            onnx_io.set_metadata(path, fp32.metadata)
            onnx_io.check_onnx(path)
            if record["method"] == "accuracy-aware":
                judge(path)  # the report of the graph as shipped (the search judged it under another name)
            report = reports[path.name]
            report["backend"] = "onnxruntime-cpu, QDQ simulated (optimizations off)" if simulated else "onnxruntime-cpu"
            if variant != "tensorrt":  # the classes whose integer sums equal the ones just judged (on this CPU or simulated)
                record["validated_cpu_classes"] = list(recipe.exact_on) if simulated or here in recipe.exact_on else [here]
                record["measured_on"] = here
                record["judged"] = "simulated exact sums" if simulated else "this CPU"
                record["speedup_vs_fp32_batch1"] = _speedup(tmp / ONNX_FILES["fp32"], path, inp.val_x[:1])
                if record["speedup_vs_fp32_batch1"] < 1.0:
                    log.warning(_slow_int8_warning(name, record, here))
            details = {"opset": fp32.details["opset"], "nodes": onnx_io.node_count(path), "int8": record}
            if record.get("validated_cpu_classes"):
                details["validated_cpu_classes"] = record["validated_cpu_classes"]
            artifacts.append(Artifact(name, "onnx", "int8", sha256_file(path), path.stat().st_size, report, details,
                                      variant=variant, purpose=recipe.purpose))
            graphs.append({"file": name, "variant": variant, "recipe": recipe_name, **recipe.layout(), "method": record["method"],
                           "float_nodes": len(record["float_nodes"]), "accuracy_drop_points": report.get("accuracy_drop_points")})
    finally:
        writer.close()
    calibration = {**writer.record(), "graphs": graphs, "source": inp.calibration_source,
                   "budget": {"points": budget[0], "of": budget[1]}}
    return artifacts, calibration


def _int8_refusal(name: str, recipe: str, record: dict, opts: ExportOptions) -> str:
    """One line: which INT8 graph missed, what it tried and how close it got."""
    ranges, recipes = record.get("ranges_tried") or [], record.get("recipes_tried") or []
    tried = ([f"{' and '.join(ranges)} ranges"] if len(ranges) > 1 else []) + ([f"recipes {' and '.join(recipes)}"] if len(recipes) > 1 else [])
    across = f" (best of {', '.join(tried)})" if tried else ""
    if not record.get("nodes_tried"):
        fix = "allow accuracy-aware INT8 (--max-float-nodes N)" if opts.max_float_nodes <= 0 else "calibrate on more images (--calib-size)"
        return f"INT8 graph {name} ({recipe}): {record['problem']}{across}; {fix}, or export without int8"
    tried = record["tried"]
    return (f"INT8 graph {name} ({recipe}): {record['problem']}{across}; kept {len(tried)} nodes in float ({', '.join(tried[:3])}"
            f"{', ...' if len(tried) > 3 else ''}) and the best was still: {record.get('best_problem') or 'unknown'}; "
            f"allow more (--max-float-nodes) or a larger drop, calibrate on more images (--calib-size), or export without int8")


def _slow_int8_warning(name: str, record: dict, here: str) -> str:
    """One line for an INT8 graph that is slower than FP32 on the CPU that exported it (e.g. MobileNetV3-Small on ONNX Runtime:
    its 28 hard-swish activations each become DequantizeLinear -> HardSigmoid -> QuantizeLinear -> QLinearMul, where the FP32
    graph fuses them into the convolutions; measured 0.64x FP32 at batch 1 on a VNNI CPU)."""
    floats = f" (it keeps {len(record['float_nodes'])} nodes in float)" if record["float_nodes"] else ""
    return (f"{name} runs at {record['speedup_vs_fp32_batch1']:.2f}x FP32's speed at batch 1 on this CPU ({here}){floats}: INT8 does not "
            f"pay off for this model here; serve FP32 (the runtime's default), or measure on the device with `edgeconv-runtime tune`")


def _speedup(fp32_path: Path, int8_path: Path, x: np.ndarray, rounds: int = 15, calls: int = 5) -> float:
    """FP32 time / INT8 time at batch 1 on this CPU: medians of alternating turns, after a warm-up. Each turn is one untimed
    call, then ``calls`` timed ones: one call per turn timed the graph coming back into the caches after the other one's
    turn (benchmarks/int8_quality.py: the same Lite0 graph read 1.61x FP32 so, 2.06x in turns of 10 calls)."""
    from edgeconv_runtime.backends import create_backend

    backends = [create_backend("onnxruntime-cpu", str(p)) for p in (fp32_path, int8_path)]
    try:
        times = ([], [])
        for r in range(rounds + 3):
            for i, be in enumerate(backends):
                be.infer(x)
                t0 = time.perf_counter()
                for _ in range(calls):
                    be.infer(x)
                if r >= 3:
                    times[i].append((time.perf_counter() - t0) / calls)
        return round(float(np.median(times[0]) / np.median(times[1])), 3)
    finally:
        for be in backends:
            be.close()
