"""``Model``: load a bundle (or a bare .onnx / engine) and predict, evaluate, verify."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .backends import AUTO_ORDER, available_backends, create_backend
from .bundle import ENGINE_SUFFIXES, Bundle, bundle_from_onnx_metadata, read_bundle
from .errors import BackendUnavailable, EdgeconvError
from .preprocess import IMAGE_SOURCE_TYPES, load_pixels, normalize, preprocess_images

PRECISIONS = ("fp32", "fp16", "int8")
# verify tolerances against the PyTorch FP32 reference outputs, per precision
VERIFY_TOLERANCE = {
    "fp32": {"max_abs_diff": 1e-3, "top1_agreement": 1.0, "cosine_min": 0.99999},
    "fp16": {"max_abs_diff": None, "top1_agreement": 1.0, "cosine_min": 0.999},
    "int8": {"max_abs_diff": None, "top1_agreement": 0.75, "cosine_min": 0.98},
}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Prediction:
    """Top-k labels and probabilities for one image."""

    labels: list
    probabilities: list
    indices: list
    source: Optional[str] = None

    @property
    def label(self) -> str:
        return self.labels[0]

    def to_dict(self) -> dict:
        d = {"top": [{"label": l, "index": int(i), "probability": float(p)} for l, i, p in zip(self.labels, self.indices, self.probabilities)]}
        if self.source is not None:
            d["source"] = self.source
        return d


def _precision_of(path: Path) -> str:
    parts = path.name.lower().split(".")
    return next((p for p in parts if p in PRECISIONS), "fp32")


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
             spin: bool = True) -> "Model":
        """Load a bundle directory, a bare edgeconv .onnx, or a TensorRT engine inside a bundle.

        ``backend="auto"`` picks the fastest usable backend for which the bundle has an artifact.
        ``spin=False`` lets idle CPU inference threads sleep (for servers sharing their cores).
        """
        t0 = time.perf_counter()
        path = Path(src)
        if not path.exists():
            raise EdgeconvError(f"model not found: {src}; pass a bundle directory written by `edgeconv export`")
        if precision is not None and precision not in PRECISIONS:
            raise EdgeconvError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if path.is_dir():
            bundle = read_bundle(path)
            precision = precision or "fp32"
            names = AUTO_ORDER if backend == "auto" else (backend,)
            status = available_backends()
            errors = []
            for name in names:
                fmt = "tensorrt" if name == "tensorrt" else "onnx"
                if name not in status:
                    raise EdgeconvError(f"unknown backend {name!r}; use one of {', '.join(status)} or auto")
                if not status[name][0]:
                    errors.append(f"{name}: {status[name][1]}")
                    continue
                if not bundle.has(fmt, precision):
                    errors.append(f"{name}: bundle has no {fmt} {precision} artifact")
                    continue
                artifact, _ = bundle.artifact(fmt, precision, check_hash)
                be = create_backend(name, str(artifact), threads, spin)
                return cls(bundle, be, precision, artifact, time.perf_counter() - t0)
            if backend != "auto" and errors and "no " in errors[-1] and "artifact" in errors[-1]:
                bundle.artifact("tensorrt" if backend == "tensorrt" else "onnx", precision)  # raises the precise message
            raise BackendUnavailable(f"no backend can run this bundle: {'; '.join(errors)}")
        # a single file
        if path.suffix in ENGINE_SUFFIXES:
            bundle = read_bundle(path.parent)
            be = create_backend("tensorrt" if backend == "auto" else backend, str(path), threads)
            return cls(bundle, be, precision or _precision_of(path), path, time.perf_counter() - t0)
        if path.suffix != ".onnx":
            raise EdgeconvError(f"{src} is neither a bundle directory, a .onnx file nor a TensorRT engine (.plan)")
        name = "onnxruntime-cpu" if backend == "auto" else backend
        be = create_backend(name, str(path), threads, spin)
        meta = be.session.get_modelmeta().custom_metadata_map if hasattr(be, "session") else {}
        if (path.parent / "manifest.json").is_file():
            bundle = read_bundle(path.parent)
        else:
            bundle = bundle_from_onnx_metadata(path, meta)
        return cls(bundle, be, precision or _precision_of(path), path, time.perf_counter() - t0)

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

    def preprocess_images(self, images: Sequence) -> np.ndarray:
        """Decode + resize + normalise, exactly as training's evaluation transform."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        return preprocess_images(images, self.preprocess)

    def predict(self, images, top_k: int = 5, batch_size: int = 32):
        """Class names and probabilities for one image or many (paths, bytes, PIL images, HWC uint8 arrays)."""
        single = _is_single(images)
        items = [images] if single else list(images)
        if not items:
            raise EdgeconvError("predict() got no images")
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for b in range(0, len(items), batch_size):
            chunk = items[b : b + batch_size]
            probs = softmax(self.backend.infer(self.preprocess_images(chunk)).astype(np.float64))
            for src, p in zip(chunk, probs):
                idx = np.argsort(-p)[:k]
                results.append(Prediction([self.classes[i] for i in idx], [float(p[i]) for i in idx], [int(i) for i in idx],
                                          str(src) if isinstance(src, (str, Path)) else None))
        return results[0] if single else results

    # ------------------------------------------------------------------ checks
    def evaluate(self, image_dir, batch_size: int = 32) -> dict:
        """Accuracy on a folder of class sub-folders named like the bundle's classes."""
        root = Path(image_dir)
        if not root.is_dir():
            raise EdgeconvError(f"image folder not found: {image_dir}; pass a folder with one sub-folder per class")
        from .preprocess import IMAGE_EXTENSIONS

        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in folders if p.name not in self.classes]
        if unknown or not folders:
            raise EdgeconvError(f"{image_dir} needs sub-folders named after the model's classes {self.classes}; found {[p.name for p in folders]}")
        per_class, correct_total, n_total, skipped = {}, 0, 0, 0
        for folder in folders:
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            target = self.classes.index(folder.name)
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
            per_class[folder.name] = {"accuracy": correct / n if n else None, "n": n}
            correct_total += correct
            n_total += n
        if n_total == 0:
            raise EdgeconvError(f"no readable images under {image_dir}")
        return {"accuracy": correct_total / n_total, "n": n_total, "per_class": per_class, "skipped": skipped,
                "backend": self.backend_name, "precision": self.precision}

    def verify(self) -> dict:
        """Re-run the bundle's reference inputs here; ``ok`` is False outside the precision's tolerance."""
        root = self.bundle.root
        ref = self.bundle.manifest.get("reference")
        if not ref:
            raise EdgeconvError("this model has no reference tensors to verify against; load the bundle directory")
        try:
            x = np.load(root / ref["inputs"])
            expected = np.load(root / ref["outputs"])
        except (OSError, ValueError) as exc:
            raise EdgeconvError(f"bundle reference tensors are missing or unreadable ({exc}); copy the whole bundle") from exc
        got = self.run(x.astype(np.float32)).astype(np.float64)
        exp = expected.astype(np.float64)
        finite = bool(np.isfinite(got).all())
        cos = (got * exp).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(exp, axis=1) + 1e-12)
        report = {
            "backend": self.backend_name,
            "precision": self.precision,
            "n": int(len(x)),
            "finite": finite,
            "max_abs_diff": float(np.abs(got - exp).max()) if finite else float("inf"),
            "cosine_min": float(cos.min()) if finite else 0.0,
            "top1_agreement": float((got.argmax(1) == exp.argmax(1)).mean()),
        }
        # preprocessing drift: the reference images through this machine's decode/resize
        images = ref.get("images") or []
        if images:
            px = preprocess_images([root / f for f in images], self.preprocess, strict=False)
            report["preprocess_max_abs_diff"] = float(np.abs(px - x[: len(px)]).max())
        tol = VERIFY_TOLERANCE[self.precision]
        problems = []
        if not finite:
            problems.append("outputs contain NaN/Inf")
        if tol["max_abs_diff"] is not None and report["max_abs_diff"] > tol["max_abs_diff"]:
            problems.append(f"max abs diff {report['max_abs_diff']:.3g} > {tol['max_abs_diff']}")
        if report["top1_agreement"] < tol["top1_agreement"]:
            problems.append(f"top-1 agreement {report['top1_agreement']:.3f} < {tol['top1_agreement']}")
        if report["cosine_min"] < tol["cosine_min"]:
            problems.append(f"min cosine {report['cosine_min']:.5f} < {tol['cosine_min']}")
        if report.get("preprocess_max_abs_diff", 0.0) > 1e-5:
            problems.append(f"preprocessing differs from training by {report['preprocess_max_abs_diff']:.3g} (> 1e-5)")
        report["tolerance"] = tol
        report["problems"] = problems
        report["ok"] = not problems
        return report

    def describe(self) -> dict:
        return {"name": self.bundle.name, "artifact": str(self.artifact), "precision": self.precision, "classes": self.classes,
                "load_seconds": self.load_seconds, **self.backend.describe()}

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"Model({self.bundle.name!r}, backend={self.backend_name!r}, precision={self.precision!r})"
