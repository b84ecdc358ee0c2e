"""``Model``: load a bundle (or a bare .onnx / engine) and predict, evaluate, verify."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .backends import auto_order, available_backends, create_backend, precision_problem
from .bundle import ENGINE_SUFFIXES, Bundle, bundle_from_onnx_metadata, read_bundle
from .cpuclass import cpu_class
from .errors import BackendUnavailable, EdgeconvError, first_line
from .manifest import MANIFEST_NAME, PRECISIONS, RUNTIME_PRECISIONS, Manifest
from .parity import PREPROCESS_MAX_ABS_DIFF, device_tolerance, parity_report, tolerance_problems
from .prediction import predictions
from .preprocess import IMAGE_SOURCE_TYPES, Preprocess, load_pixels, normalize, preprocess_images

# runtime precisions that run another precision's artifact: bf16 = the FP32 ONNX under OpenVINO's bf16 hint
ARTIFACT_PRECISION = {"bf16": "fp32"}


def precision_of(path: Path) -> str:
    parts = path.name.lower().split(".")
    return next((p for p in parts if p in PRECISIONS), "fp32")



def _artifact_kind(backend: str) -> tuple:
    """(format, variant) of the artifact a backend runs: TensorRT takes the graph made for it where the bundle has one."""
    if backend == "tensorrt":
        return "tensorrt", "tensorrt"
    return "onnx", ("tensorrt" if backend == "onnxruntime-tensorrt" else None)


CPU_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")  # where INT8 sums depend on the CPU's instructions (cpuclass.py)
CPU_INT8_VARIANTS = ("default", "portable")  # the default graph first: it is the faster where it is valid


def cpu_int8_variant(bundle: Bundle) -> tuple:
    """(variant, None) of the INT8 graph validated for this CPU's class, or (None, why) when there is none.
    Graphs from before the manifest recorded classes count as validated (they were the only INT8 graph)."""
    here = cpu_class()
    for variant in CPU_INT8_VARIANTS:
        a = bundle.manifest.find("onnx", "int8", variant)
        if a is not None and a.variant == variant and here in a.details.get("validated_cpu_classes", [here]):
            return variant, None
    have = {a.file: a.details.get("validated_cpu_classes") for a in bundle.manifest.artifacts if a.precision == "int8" and a.variant in CPU_INT8_VARIANTS}
    return None, (f"no INT8 graph of this bundle was validated on this CPU's class ({here}; "
                  + ", ".join(f"{f}: {', '.join(c or ['?'])}" for f, c in have.items()) + ")")


def _int8_mismatch(model: "Model") -> Optional[str]:
    """Why a loaded INT8 model fails the bundle's reference outputs on this CPU (the `verify` tolerance), or None."""
    ref = model.bundle.manifest.reference or {}
    if "inputs" not in ref or "outputs" not in ref:
        return None
    x = np.load(model.bundle.path(ref["inputs"]), allow_pickle=False)
    expected = np.load(model.bundle.path(ref["outputs"]), allow_pickle=False)
    problems = tolerance_problems(parity_report(expected, model.run(x.astype(np.float32))), "int8", backend=model.backend_name)
    return f"INT8 fails `verify` on this CPU ({'; '.join(problems)})" if problems else None


def _missing_artifact(bundle: Bundle, backend: str, fmt: str, precision: str) -> Optional[str]:
    """Why the bundle has nothing ``backend`` can run at ``precision``, or None."""
    if not bundle.has(fmt, precision):
        return f"bundle has no {fmt} {precision} artifact"
    if backend == "onnxruntime-tensorrt" and precision == "int8" and not bundle.has("onnx", "int8", "tensorrt"):
        # the CPU INT8 graph has uint8 activations with non-zero zero points, which TensorRT refuses
        return ("backend onnxruntime-tensorrt needs the TensorRT-ready INT8 graph (symmetric int8), which this bundle lacks; "
                "re-export it with this edgeconv version")
    return None


def _graph_shapes(backend) -> Optional[tuple]:
    """(input shape, output shape) of the loaded graph, ints where static; None for a backend that does not tell."""
    session = getattr(backend, "session", None)
    if session is not None and hasattr(session, "get_inputs"):  # ONNX Runtime
        return list(session.get_inputs()[0].shape), list(session.get_outputs()[0].shape)
    compiled = getattr(backend, "compiled", None)
    if compiled is not None and hasattr(compiled, "input"):  # OpenVINO: Dimension objects, static or dynamic

        def dims(port) -> list:
            return [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]

        return dims(compiled.input(0)), dims(compiled.output(0))
    return None  # a TensorRT engine: built from the bundle's own graph and gated against its reference outputs


def graph_mismatch(bundle: Bundle, backend) -> Optional[str]:
    """One line when the graph's input [N,C,H,W] or class count disagrees with the manifest, else None.

    Read from the ONNX Runtime session or OpenVINO's compiled model (not from a TensorRT engine);
    dimensions the graph leaves symbolic are not compared.
    """
    shapes = _graph_shapes(backend)
    if shapes is None:
        return None
    got_in, got_out = shapes
    want_in = tuple(bundle.preprocess.input_shape)
    if len(got_in) != 4 or any(isinstance(g, int) and g != w for g, w in zip(got_in[1:], want_in)):
        return (f"the model graph takes input {got_in} but manifest.json preprocess gives [N, {', '.join(map(str, want_in))}]; "
                "the manifest does not belong to this model: re-export the bundle")
    n = len(bundle.classes)
    if len(got_out) != 2 or (isinstance(got_out[1], int) and got_out[1] != n):
        return (f"the model graph outputs {got_out} but manifest.json lists {n} classes; "
                "the manifest does not belong to this model: re-export the bundle")
    return None


def plain_bundle(path: Path, backend) -> tuple:
    """(bundle, info) for an ONNX file without labels or preprocessing: classes are the output indices, images are
    stretched to the graph's size and scaled to [0, 1]. Refused in one line where the graph is no NCHW image classifier."""
    shapes = _graph_shapes(backend)
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


def _onnx_file_bundle(path: Path, backend) -> tuple:
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


def _is_single(images) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return isinstance(images, IMAGE_SOURCE_TYPES)


@dataclass
class Model:
    bundle: Bundle
    backend: object
    precision: str
    artifact: Path
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._input_shape = self.bundle.preprocess.input_shape  # checked on every run(): computed once
        self._infer = self.backend.infer

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, src, backend: str = "auto", precision: Optional[str] = None, threads: Optional[int] = None, check_hash: bool = True,
             spin: bool = True, batch_profile: Optional[Sequence[int]] = None, cache_dir=None, public_key=None) -> "Model":
        """Load a bundle directory, a bare edgeconv .onnx, or a TensorRT engine inside a bundle.

        ``backend="auto"`` tries the backends fastest first and takes the first that starts with an artifact
        of the bundle; each one passed over, and why, is listed in ``model.info["skipped"]``. A named backend
        raises its own error instead. ``spin=False`` lets idle CPU inference threads sleep (for servers
        sharing their cores). ``batch_profile`` (MIN, OPT, MAX; default 1, 8, 32) and ``cache_dir`` (default
        ``<bundle>/.trt_cache``, or ``~/.cache/edgeconv/trt`` when the bundle is read-only) configure ONNX
        Runtime's TensorRT provider. ``with Model.load(...) as m:`` closes the model at the end. ``public_key``
        (an Ed25519 PEM file): refuse a bundle its owner did not sign (``manifest.sig``).
        """
        t0 = time.perf_counter()
        path = Path(src)
        if not path.exists():
            raise EdgeconvError(f"model not found: {src}; pass a bundle directory written by `edgeconv export`")
        if precision is not None and precision not in RUNTIME_PRECISIONS:
            raise EdgeconvError(f"unknown precision {precision!r}; use one of {', '.join(RUNTIME_PRECISIONS)}")
        if public_key is not None and not path.is_dir():
            raise EdgeconvError(f"{src} is one file; a signature covers a whole bundle: pass the bundle directory with public_key")
        if path.is_dir():
            # every file checked, whatever the precision: all but the sha256 now, those on background threads while the
            # backend starts; joined before a model is returned (or a fallback loaded), so a mismatch refuses the load
            bundle = read_bundle(path, check_hash=check_hash, public_key=public_key, defer_hashes=True)
            try:
                model = cls._load_bundle(src, bundle, backend, precision, threads, check_hash, spin, batch_profile, cache_dir, public_key, t0)
            except Exception:
                bundle.wait_checked()  # a file that fails its sha256 is the error, not what it made the backend say
                raise
            try:
                bundle.wait_checked()
            except EdgeconvError:
                model.close()
                raise
            model.load_seconds = time.perf_counter() - t0
            return model
        return cls._load_file(src, path, backend, precision, threads, spin, batch_profile, cache_dir, t0)

    @classmethod
    def _load_bundle(cls, src, bundle: Bundle, backend, precision, threads, check_hash, spin, batch_profile, cache_dir, public_key, t0) -> "Model":
        precision = precision or "fp32"
        names = auto_order(precision) if backend == "auto" else (backend,)
        stored = ARTIFACT_PRECISION.get(precision, precision)  # the artifact's precision
        status = available_backends()
        options = {"precision": precision, "input_name": bundle.manifest.input.get("name"), "input_shape": tuple(bundle.preprocess.input_shape),
                   "batch_profile": batch_profile, "cache_dir": cache_dir}
        skipped = []
        for name in names:
            if name not in status:
                raise EdgeconvError(f"unknown backend {name!r}; use one of {', '.join(status)} or auto")
            ok, why = status[name]
            if not ok:
                if backend != "auto":
                    raise BackendUnavailable(f"backend {name} is unavailable here: {why}")
                skipped.append(f"{name}: {why}")
                continue
            unable = precision_problem(name, precision)
            if unable:
                if backend != "auto":
                    raise BackendUnavailable(unable)
                skipped.append(f"{name}: {unable}")
                continue
            fmt, variant = _artifact_kind(name)
            if stored == "int8" and name in CPU_BACKENDS and bundle.has("onnx", "int8"):
                variant, why = cpu_int8_variant(bundle)
                if variant is None:
                    bundle.wait_checked()
                    return cls._fp32_instead(src, why, dict(backend=backend, threads=threads, check_hash=check_hash, spin=spin,
                                                                     batch_profile=batch_profile, cache_dir=cache_dir, public_key=public_key))
            missing = _missing_artifact(bundle, name, fmt, stored)
            if missing:
                if backend != "auto":
                    if bundle.has(fmt, stored):
                        raise BackendUnavailable(missing)
                    bundle.artifact(fmt, stored, check_hash)  # raises the precise message
                skipped.append(f"{name}: {missing}")
                continue
            artifact, _ = bundle.artifact(fmt, stored, check_hash, variant=variant)  # an altered file is an error, not a skip
            try:
                be = create_backend(name, str(artifact), threads, spin, **options)
            except EdgeconvError as exc:  # the provider did not start, an engine for another GPU, a CUDA error
                if backend != "auto":
                    raise
                skipped.append(f"{name}: {exc}")
                continue
            except (OSError, RuntimeError, ImportError) as exc:  # a broken GPU install
                if name == "onnxruntime-cpu":
                    raise
                reason = f"{type(exc).__name__}: {first_line(exc)}"
                if backend != "auto":
                    raise BackendUnavailable(f"backend {name} could not start: {reason}") from exc
                skipped.append(f"{name}: {reason}")
                continue
            problem = graph_mismatch(bundle, be)
            if problem:
                be.close()
                raise EdgeconvError(problem)
            model = cls(bundle, be, precision, artifact, time.perf_counter() - t0, info={"skipped": skipped})
            if stored == "int8" and name in CPU_BACKENDS:
                model.info["int8_variant"] = variant
                why = _int8_mismatch(model)
                if why:
                    model.close()
                    bundle.wait_checked()
                    return cls._fp32_instead(src, why, dict(backend=backend, threads=threads, check_hash=check_hash, spin=spin,
                                                                     batch_profile=batch_profile, cache_dir=cache_dir, public_key=public_key))
            return model
        raise BackendUnavailable(f"no backend can run this bundle: {'; '.join(skipped)}")

    @classmethod
    def _load_file(cls, src, path: Path, backend, precision, threads, spin, batch_profile, cache_dir, t0) -> "Model":
        """A bare .onnx, or a TensorRT engine inside a bundle."""
        if path.suffix in ENGINE_SUFFIXES:
            bundle = read_bundle(path.parent)
            be = create_backend("tensorrt" if backend == "auto" else backend, str(path), threads)
            return cls(bundle, be, precision or precision_of(path), path, time.perf_counter() - t0)
        if path.suffix != ".onnx":
            raise EdgeconvError(f"{src} is neither a bundle directory, a .onnx file nor a TensorRT engine (.plan)")
        name = "onnxruntime-cpu" if backend == "auto" else backend
        precision = precision or precision_of(path)
        be = create_backend(name, str(path), threads, spin, precision=precision, batch_profile=batch_profile, cache_dir=cache_dir)
        try:
            bundle, info = _onnx_file_bundle(path, be)
        except EdgeconvError:
            be.close()
            raise
        return cls(bundle, be, precision, path, time.perf_counter() - t0, info=info)

    @classmethod
    def _fp32_instead(cls, src, why: str, options: dict) -> "Model":
        """FP32 where no INT8 graph can be trusted on this CPU, with a one-line warning (also in ``info["note"]``)."""
        import logging

        note = f"running FP32 instead of INT8: {why}"
        logging.getLogger("edgeconv.runtime").warning(note)
        model = cls.load(src, precision="fp32", **options)
        model.info.update({"note": note, "int8_fallback": why})
        return model

    # ------------------------------------------------------------------ properties
    @property
    def classes(self) -> list:
        return self.bundle.classes

    @property
    def preprocess(self):
        return self.bundle.preprocess

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ------------------------------------------------------------------ inference
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a preprocessed NCHW float32 batch (no preprocessing here)."""
        if type(x) is not np.ndarray or x.dtype != np.float32 or x.shape[1:] != self._input_shape or x.ndim != 4:
            self._bad_input(x)
        return self._infer(x)

    def _bad_input(self, x) -> None:
        want = ("N", *self.preprocess.input_shape)
        if not isinstance(x, np.ndarray):
            raise EdgeconvError(f"run() takes a numpy array of shape {want} float32, got {type(x).__name__}; use predict() for images")
        if x.dtype != np.float32:
            raise EdgeconvError(f"run() takes float32 input, got {x.dtype}; preprocess images with predict() or cast with .astype(np.float32)")
        raise EdgeconvError(f"run() takes input of shape {want}, got {tuple(x.shape)}; use predict() for raw images")

    def preprocess_images(self, images: Sequence, channel_order: str = "rgb") -> np.ndarray:
        """Decode + resize + normalise, exactly as training's evaluation transform. Arrays are RGB unless ``channel_order="bgr"``."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        return preprocess_images(images, self.preprocess, channel_order=channel_order)

    def predict(self, images, top_k: int = 5, batch_size: int = 32, channel_order: str = "rgb"):
        """Class names and probabilities for one image or many (paths, bytes, PIL images, HWC uint8 arrays).

        Arrays are taken as RGB; pass ``channel_order="bgr"`` for OpenCV's frames (``cv2.imread``, ``VideoCapture``).
        """
        single = _is_single(images)
        items = [images] if single else list(images)
        if not items:
            raise EdgeconvError("predict() got no images")
        fixed = self.info.get("fixed_batch")
        batch_size = fixed or batch_size
        results = []
        for b in range(0, len(items), batch_size):
            chunk = items[b : b + batch_size]
            x = self.preprocess_images(chunk, channel_order)
            if fixed and len(x) < fixed:  # a graph exported for one batch size: pad the last batch
                x = np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])
            results += predictions(self.backend.infer(x)[: len(chunk)], self.classes, top_k,
                                   [str(src) if isinstance(src, (str, Path)) else None for src in chunk])
        return results[0] if single else results

    def stream(self, source, every: int = 1, max_frames: Optional[int] = None, batch: int = 1, top_k: int = 5):
        """Predictions for the frames of a video file, ``rtsp://...``, ``/dev/videoN`` or ``csi://N`` (Jetson), as they come.

        Returns an iterable of ``FramePrediction`` (frame index, timestamp, top-k, latency) with ``summary()`` (frames per
        second, latency percentiles) and ``close()``; see ``edgeconv_runtime.stream.PredictionStream``. Needs OpenCV:
        ``pip install 'edgeconv-runtime[video]'``. An unreadable source raises EdgeconvError here, before iterating.
        """
        from .stream import PredictionStream

        return PredictionStream(self, source, every=every, max_frames=max_frames, batch=batch, top_k=top_k)

    # ------------------------------------------------------------------ checks
    def evaluate(self, image_dir, batch_size: int = 32) -> dict:
        """Accuracy on a folder of class sub-folders named like the bundle's classes."""
        root = Path(image_dir)
        if not root.is_dir():
            raise EdgeconvError(f"image folder not found: {image_dir}; pass a folder with one sub-folder per class")
        from .imagefolder import class_folders, image_files, shown

        folders = class_folders(root)
        label = lambda p: shown(p.name)  # noqa: E731  a folder name that is not UTF-8 matches the label training gave it
        unknown = [label(p) for p in folders if label(p) not in self.classes]
        if unknown or not folders:
            raise EdgeconvError(f"{image_dir} needs sub-folders named after the model's classes {self.classes}; found {[label(p) for p in folders]}")
        per_class, correct_total, n_total, skipped = {}, 0, 0, 0
        for folder in folders:
            files = image_files(folder)
            target = self.classes.index(label(folder))
            correct = n = 0
            for b in range(0, len(files), batch_size):
                pixels = []
                for f in files[b : b + batch_size]:
                    try:
                        pixels.append(load_pixels(f, self.preprocess, strict=False))
                    except EdgeconvError:
                        skipped += 1
                if not pixels:
                    continue
                logits = self.backend.infer(normalize(np.stack(pixels), self.preprocess))
                correct += int((logits.argmax(1) == target).sum())
                n += len(pixels)
            per_class[label(folder)] = {"accuracy": correct / n if n else None, "n": n}
            correct_total += correct
            n_total += n
        if n_total == 0:
            raise EdgeconvError(f"no readable images under {image_dir}")
        return {"accuracy": correct_total / n_total, "n": n_total, "per_class": per_class, "skipped": skipped,
                "backend": self.backend_name, "precision": self.precision}

    def verify(self) -> dict:
        """Re-run the bundle's reference inputs here; ``ok`` is False outside the precision's tolerance."""
        ref = self.bundle.manifest.reference
        if not ref or "inputs" not in ref or "outputs" not in ref:
            if self.info.get("plain"):
                raise EdgeconvError(f"{self.artifact.name} is a plain ONNX file with no reference inputs and outputs to verify against; "
                                    f"`edgeconv import {self.artifact.name} ...` writes a bundle that has them")
            raise EdgeconvError("this model has no reference tensors to verify against; load the bundle directory written by `edgeconv export`")
        try:
            x = np.load(self.bundle.path(ref["inputs"]), allow_pickle=False)
            expected = np.load(self.bundle.path(ref["outputs"]), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EdgeconvError(f"bundle reference tensors are missing or unreadable ({str(exc).splitlines()[0][:120]}); copy the whole bundle") from exc
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self._input_shape) or expected.shape != (len(x), len(self.classes)):
            raise EdgeconvError(f"bundle reference tensors have shapes {x.shape} / {expected.shape}, which do not fit the model; re-export the bundle")
        got = self.run(x.astype(np.float32))
        r = parity_report(expected, got)
        report = {"backend": self.backend_name, "precision": self.precision, "n": r["n"], "finite": r["finite"],
                  "max_abs_diff": r["max_abs_diff"], "cosine_min": r["cosine_min"], "top1_agreement": r["top1_agreement"]}
        problems = tolerance_problems(r, self.precision, backend=self.backend_name)
        # preprocessing drift: the reference images through this machine's decode/resize
        images = ref.get("images") or []
        if images:
            px = preprocess_images([self.bundle.path(f) for f in images], self.preprocess, strict=False)
            report["preprocess_max_abs_diff"] = float(np.abs(px - x[: len(px)]).max())
            if report["preprocess_max_abs_diff"] > PREPROCESS_MAX_ABS_DIFF:
                problems.append(f"preprocessing differs from training by {report['preprocess_max_abs_diff']:.3g} (> {PREPROCESS_MAX_ABS_DIFF})")
        report["tolerance"] = device_tolerance(self.precision, self.backend_name)
        report["problems"] = problems
        report["ok"] = not problems
        return report

    def describe(self) -> dict:
        return {"name": self.bundle.name, "artifact": str(self.artifact), "precision": self.precision, "classes": self.classes,
                "load_seconds": self.load_seconds, **self.backend.describe()}

    def close(self) -> None:
        """Release the backend (session, GPU buffers, stream); running the model afterwards raises. Safe to call twice."""
        self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.bundle.name!r}, backend={self.backend_name!r}, precision={self.precision!r})"
