"""``Model``: load a bundle (or a bare .onnx / engine) and predict, evaluate, verify."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .backends import backend_for_file, create_backend
from .backends.select import cpu_int8_variant, select_backend  # noqa: F401  cpu_int8_variant: imported from here before
from .backends.select import artifact_kind as _artifact_kind, missing_artifact as _missing_artifact  # noqa: F401  the old names
from .bundle import ENGINE_SUFFIXES, Bundle, read_bundle
from .errors import BackendUnavailable, EdgeconvError
from .manifest import RUNTIME_PRECISIONS
from .parity import PREPROCESS_MAX_ABS_DIFF, device_tolerance, parity_report, tolerance_problems
from .plain import onnx_file_bundle, precision_of
from .prediction import predictions
from .preprocess import IMAGE_SOURCE_TYPES, load_pixels, normalize, preprocess_images


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
             spin: bool = True, batch_profile: Optional[Sequence[int]] = None, cache_dir=None, public_key=None, profile: bool = True,
             tuning: Optional[dict] = None, int8_variant: Optional[str] = None) -> "Model":
        """Load a bundle directory, a bare edgeconv .onnx, or a TensorRT engine inside a bundle.

        ``backend="auto"`` tries the backends fastest first and takes the first that starts with an artifact
        of the bundle; each one passed over, and why, is listed in ``model.info["skipped"]``. A named backend
        raises its own error instead (backends/select.py). ``spin=False`` lets idle CPU inference threads sleep (for
        servers sharing their cores). ``batch_profile`` (MIN, OPT, MAX; default 1, 8, 32) and ``cache_dir`` (default
        ``<bundle>/.trt_cache``, or ``~/.cache/edgeconv/trt`` when the bundle is read-only) configure ONNX
        Runtime's TensorRT provider. ``with Model.load(...) as m:`` closes the model at the end. ``public_key``
        (an Ed25519 PEM file): refuse a bundle its owner did not sign (``manifest.sig``).

        ``backend="auto"`` runs the bundle's tuned profile for this device (``edgeconv-runtime tune``: backend, precision,
        INT8 graph, threads, options) where one matches this machine and its library versions, and says so in
        ``model.info["profile"]``; ``profile=False`` ignores it; an explicit ``precision`` other than the profile's wins.
        ``tuning`` (a named backend's options, as `tune` measures them) and ``int8_variant`` pick a configuration by hand.
        """
        t0, path = time.perf_counter(), Path(src)
        if not path.exists():
            raise EdgeconvError(f"model not found: {src}; pass a bundle directory written by `edgeconv export`")
        if precision is not None and precision not in RUNTIME_PRECISIONS:
            raise EdgeconvError(f"unknown precision {precision!r}; use one of {', '.join(RUNTIME_PRECISIONS)}")
        if public_key is not None and not path.is_dir():
            raise EdgeconvError(f"{src} is one file; a signature covers a whole bundle: pass the bundle directory with public_key")
        if not path.is_dir():
            return cls._load_file(src, path, backend, precision, threads, spin, batch_profile, cache_dir, t0)
        # every file checked, whatever the precision: all but the sha256 now, those on background threads while the
        # backend starts; joined before a model is returned (or a fallback loaded), so a mismatch refuses the load
        bundle = read_bundle(path, check_hash=check_hash, public_key=public_key, defer_hashes=True)
        asked = dict(backend=backend, precision=precision, threads=threads, tuning=tuning, int8_variant=int8_variant)
        try:
            tuned, note = cls._profile(bundle, asked) if profile and backend == "auto" and not tuning and not int8_variant else (None, None)
            if tuned is not None:
                backend, precision, threads, tuning, int8_variant = (tuned[k] for k in ("backend", "precision", "threads", "tuning", "int8_variant"))
            try:  # create_backend read here at call time: tests wrap it
                got = select_backend(bundle, backend, precision or "fp32", check_hash, threads, spin, batch_profile, cache_dir, create_backend,
                                     tuning, int8_variant)
            except BackendUnavailable as exc:
                if tuned is None:
                    raise
                note = f"tuned profile {tuned['path']} cannot run here ({exc}); using the default order"
                tuned, backend, precision, threads = None, "auto", asked["precision"], asked["threads"]
                got = select_backend(bundle, "auto", precision or "fp32", check_hash, threads, spin, batch_profile, cache_dir, create_backend)
        except Exception:
            bundle.wait_checked()  # a file that fails its sha256 is the error, not what it made the backend say
            raise
        model = (cls._fp32_instead(src, got.fp32_instead, dict(backend=asked["backend"], threads=asked["threads"], check_hash=check_hash,
                                                               spin=spin, batch_profile=batch_profile, cache_dir=cache_dir,
                                                               public_key=public_key, profile=False))
                 if got.fp32_instead else cls(bundle, got.backend, precision or "fp32", got.artifact, info=got.info))
        if tuned is not None and not got.fp32_instead:
            model.info["profile"] = {"path": tuned["path"], "description": tuned["description"], "config": tuned["config"]}
        if note:
            model.info["profile_note"] = note
            model.info.setdefault("note", note)
        try:
            bundle.wait_checked()
        except EdgeconvError:
            model.close()
            raise
        model.load_seconds = time.perf_counter() - t0
        return model

    @classmethod
    def _load_file(cls, src, path: Path, backend, precision, threads, spin, batch_profile, cache_dir, t0) -> "Model":
        """A bare .onnx, or a TensorRT engine inside a bundle."""
        name = backend_for_file(path) if backend == "auto" else backend  # .plan: tensorrt, .onnx: onnxruntime-cpu
        if path.suffix in ENGINE_SUFFIXES:
            bundle = read_bundle(path.parent)
            be = create_backend(name, str(path), threads)
            return cls(bundle, be, precision or precision_of(path), path, time.perf_counter() - t0)
        if path.suffix != ".onnx":
            raise EdgeconvError(f"{src} is neither a bundle directory, a .onnx file nor a TensorRT engine (.plan)")
        precision = precision or precision_of(path)
        be = create_backend(name, str(path), threads, spin, precision=precision, batch_profile=batch_profile, cache_dir=cache_dir)
        try:
            bundle, info = onnx_file_bundle(path, be)
        except EdgeconvError:
            be.close()
            raise
        return cls(bundle, be, precision, path, time.perf_counter() - t0, info=info)

    @staticmethod
    def _profile(bundle, asked: dict) -> tuple:
        """(settings, note) from the bundle's profile for this device: settings None where there is none that fits
        (note: why, when the bundle has profiles); an edited profile raises (the bundle's hash check)."""
        from .profiles import describe_profile, profile_for, profile_path

        doc, note = profile_for(bundle)
        if doc is None:
            return None, note
        cfg, rel = doc["config"], profile_path()
        if asked["precision"] is not None and asked["precision"] != cfg["precision"]:
            return None, f"tuned profile {rel} is for {cfg['precision']}; running {asked['precision']} as asked, in the default order"
        return {"path": rel, "config": cfg, "description": describe_profile(doc, rel), "backend": cfg["backend"],
                "precision": cfg["precision"], "threads": asked["threads"] or cfg.get("threads"), "tuning": cfg.get("options") or None,
                "int8_variant": cfg.get("int8_variant")}, None

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
        tensors = self.bundle.reference_tensors()
        if tensors is None:
            if self.info.get("plain"):
                raise EdgeconvError(f"{self.artifact.name} is a plain ONNX file with no reference inputs and outputs to verify against; "
                                    f"`edgeconv import {self.artifact.name} ...` writes a bundle that has them")
            raise EdgeconvError("this model has no reference tensors to verify against; load the bundle directory written by `edgeconv export`")
        x, expected = tensors
        got = self.run(x)
        r = parity_report(expected, got)
        report = {"backend": self.backend_name, "precision": self.precision, "n": r["n"], "finite": r["finite"],
                  "max_abs_diff": r["max_abs_diff"], "cosine_min": r["cosine_min"], "top1_agreement": r["top1_agreement"]}
        problems = tolerance_problems(r, self.precision, backend=self.backend_name)
        # preprocessing drift: the reference images through this machine's decode/resize
        images = self.bundle.manifest.reference.get("images") or []
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
