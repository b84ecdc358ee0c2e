"""From a run directory to a bundle: rebuild the model, gather real images, call edgeconv_export."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import sha256_file
from edgeconv_runtime.preprocess import normalize

from . import checkpoint as ckpt
from .data import load_dataset, load_images_recursive

log = logging.getLogger("edgeconv.export")

DEFAULT_CALIB_SIZE = 500


@dataclass
class ExportRequest:
    checkpoint: str
    out: str
    precisions: tuple = ("fp32",)
    formats: tuple = ("onnx",)
    calib_data: Optional[str] = None
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_method: str = "minmax"
    val_data: Optional[str] = None
    opset: int = 17
    max_accuracy_drop: float = 1.0
    batch_min: int = 1
    batch_opt: int = 8
    batch_max: int = 32
    timing_cache: Optional[str] = None
    force: bool = False


def parse_targets(spec: str) -> tuple:
    """'onnx,int8' / 'fp16' / 'tensorrt' -> (formats, precisions); unknown names are errors."""
    from edgeconv_export.bundle import FORMATS
    from edgeconv_export.precision import PRECISIONS

    formats, precisions = [], []
    for tok in [t.strip().lower() for t in spec.split(",") if t.strip()]:
        if tok in FORMATS:
            formats.append(tok)
        elif tok in PRECISIONS:
            precisions.append(tok)
        else:
            raise EdgeconvError(f"unknown export target {tok!r}; use formats {', '.join(FORMATS)} and precisions {', '.join(PRECISIONS)}")
    return tuple(formats or ["onnx"]), tuple(precisions or ["fp32"])


def export_run(req: ExportRequest):
    """Export the checkpoint in ``req`` to a bundle; returns the manifest."""
    from edgeconv_export.bundle import ExportInputs, ExportOptions, export_bundle

    opts = ExportOptions(precisions=req.precisions, formats=req.formats, opset=req.opset, calibration_method=req.calib_method,
                         max_accuracy_drop=req.max_accuracy_drop, batch_min=req.batch_min, batch_opt=req.batch_opt,
                         batch_max=req.batch_max, timing_cache=req.timing_cache, force=req.force)
    opts.validate()
    if Path(req.out).exists() and not req.force:
        raise EdgeconvError(f"{req.out} already exists; pass --force to replace it or choose another --out")
    path = ckpt.resolve_checkpoint(req.checkpoint)
    ck = ckpt.load_checkpoint(path)
    model, pre = ckpt.model_from_checkpoint(ck)
    data = ck.get("data", {})
    want_int8 = "int8" in req.precisions

    # parity images: the validation split recorded in the checkpoint, unless --val-data says otherwise
    source = req.val_data or data.get("source")
    if not source or (source not in ("mnist-5k", "fashion-mnist") and not Path(source).exists()):
        raise EdgeconvError(f"the checkpoint's training data ({source}) is not on this machine; pass --val-data (and --calib-data for INT8)")
    ds = load_dataset(source, pre, val_fraction=data.get("val_fraction", 0.1), seed=data.get("seed", 0))
    val = ds.val
    if list(ds.classes) != list(ck["classes"]):
        raise EdgeconvError(f"{source} has classes {ds.classes} but the model was trained on {ck['classes']}; pass matching --val-data")
    val_x = normalize(val.pixels, pre)
    calib_x, calib_source = None, None
    if want_int8:
        if req.calib_data:
            pixels, _ = load_images_recursive(req.calib_data, pre, limit=req.calib_size, seed=0)
            calib_source = str(Path(req.calib_data).resolve())
        else:
            n = len(ds.train)
            idx = np.sort(np.random.default_rng(0).choice(n, min(req.calib_size, n), replace=False))
            pixels = ds.train.pixels[idx]
            calib_source = f"{ds.source} (train split, {len(idx)} of {n})"
        calib_x = normalize(pixels, pre)
    inputs = ExportInputs(
        model=model,
        name=ck["model"]["name"],
        classes=list(ck["classes"]),
        preprocess=pre,
        val_x=val_x,
        val_y=val.labels,
        calib_x=calib_x,
        reference_files=val.files or [],
        reference_pixels=None if val.files else val.pixels[:16],
        source={
            "checkpoint": str(path.resolve()),
            "checkpoint_sha256": sha256_file(path),
            "model": ck["model"],
            "epoch": ck.get("epoch"),
            "data_fingerprint": data.get("fingerprint"),
            "parity_split": f"val of {source}",
            "training_metrics": ck.get("metrics"),
        },
        calibration_source=calib_source,
    )
    if "triton" not in req.formats:
        manifest = export_bundle(inputs, req.out, opts)
        from .model_card import extend_card

        extend_card(path.parent, Path(req.out), export=[a.to_dict() for a in manifest.artifacts])
        return manifest
    # Triton: build the bundle aside, then lay its artifact out as a model repository at --out
    import tempfile

    from edgeconv_export.triton import write_triton_repo
    from edgeconv_runtime.fileio import atomic_directory

    opts.formats = tuple(f for f in req.formats if f != "triton") or ("onnx",)
    with tempfile.TemporaryDirectory(prefix="edgeconv-triton-") as tmp:
        manifest = export_bundle(inputs, Path(tmp) / "bundle", opts)
        with atomic_directory(req.out, force=req.force) as repo:
            prec = req.precisions[-1] if req.precisions else "fp32"
            manifest.triton = write_triton_repo(Path(tmp) / "bundle", repo, precision=prec, engine="tensorrt" in opts.formats,
                                                max_batch=req.batch_max)
    return manifest
