"""From a run directory to a bundle: rebuild the model, gather real images, call edgeconv_export."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edgeconv_export.bundle import FORMATS, ExportInputs, ExportOptions
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import PRECISIONS

log = logging.getLogger("edgeconv.export")

DEFAULT_CALIB_SIZE = 500


@dataclass(kw_only=True)
class ExportRequest(ExportOptions):
    """The bundle's options (precisions, formats, opset, TensorRT profile...: one definition, ExportOptions')
    plus the run to export and where its images come from."""

    checkpoint: str
    out: str
    calib_data: Optional[str] = None  # folder of real images for INT8 calibration; default: the training split
    calib_size: int = DEFAULT_CALIB_SIZE
    val_data: Optional[str] = None  # parity images; default: the checkpoint's validation split
    sign_key: Optional[str] = None  # Ed25519 private key (PEM): the bundle gets manifest.sig, checked by `--public-key`
    trust_unsigned: bool = False  # export a checkpoint that carries no weights_sha256 (its weights cannot be checked)


def parse_targets(spec: str) -> tuple:
    """'onnx,int8' / 'fp16' / 'tensorrt' -> (formats, precisions); unknown names are errors."""
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
    """Export the checkpoint in ``req`` to a bundle (or, with format triton, a Triton model repository); returns the manifest."""
    from edgeconv_export.bundle import export_bundle
    from edgeconv_export.triton import export_triton

    from . import checkpoint as ckpt
    from .model_card import extend_card

    req.validate()
    if req.sign_key:
        from edgeconv_runtime.signing import load_private_key

        load_private_key(req.sign_key)  # a missing or wrong key (or no cryptography) is refused now, not after the export
    if Path(req.out).exists() and not req.force:
        raise EdgeconvError(f"{req.out} already exists; pass --force to replace it or choose another --out")
    path = ckpt.resolve_checkpoint(req.checkpoint)
    inputs = export_inputs(req, path)
    if "triton" in req.formats:
        return export_triton(inputs, req.out, req)
    manifest = export_bundle(inputs, req.out, req)
    extend_card(path.parent, Path(req.out), export=[a.to_dict() for a in manifest.artifacts])
    return manifest


def export_inputs(req: ExportRequest, path: Path) -> ExportInputs:
    """The checkpoint's model and preprocessing with real images: parity (validation split) and INT8 calibration."""
    from edgeconv_export.bundle import NormalizedImages
    from edgeconv_runtime.fileio import sha256_file

    from . import checkpoint as ckpt
    from .data import load_export_images

    ck = ckpt.load_checkpoint(path)
    check_signed_weights(ck, path, req.trust_unsigned)
    model, pre = ckpt.model_from_checkpoint(ck)
    data = ck.get("data", {})
    # parity images: the validation split recorded in the checkpoint, unless --val-data says otherwise
    source = req.val_data or data.get("source")
    if not source or (source not in ("mnist-5k", "fashion-mnist") and not Path(source).exists()):
        raise EdgeconvError(f"the checkpoint's training data ({source}) is not on this machine; pass --val-data (and --calib-data for INT8)")
    # only the images the export uses are decoded, and they stay uint8 until a batch needs them (NormalizedImages)
    int8 = "int8" in req.precisions
    imgs = load_export_images(source, pre, val_fraction=data.get("val_fraction", 0.1), seed=data.get("seed", 0),
                              calib_size=req.calib_size if int8 and not req.calib_data else None)
    val = imgs.val
    if list(imgs.classes) != list(ck["classes"]):
        raise EdgeconvError(f"{source} has classes {imgs.classes} but the model was trained on {ck['classes']}; pass matching --val-data")
    calib_x, calib_source = _calibration_images(req, imgs, pre) if int8 else (None, None)
    qat = _qat_graph(path, ck) if int8 else None
    return ExportInputs(
        model=model,
        name=ck["model"]["name"],
        classes=list(ck["classes"]),
        preprocess=pre,
        val_x=NormalizedImages(val.pixels, pre),
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
        calibration_source=str(qat.resolve()) if qat else calib_source,
        qat_onnx=qat,
    )


def check_signed_weights(ck: dict, path: Path, trust_unsigned: bool) -> None:
    """A checkpoint without its weights_sha256 cannot show its weights are the ones training wrote: refused, or
    exported with a loud warning under --trust-unsigned."""
    if ck.get("weights_sha256") is not None:
        return
    if not trust_unsigned:
        raise EdgeconvError(f"{path} carries no weights_sha256, so its weights cannot be checked (an old or edited checkpoint); "
                            "retrain it, or pass --trust-unsigned if you know where it came from")
    log.warning("UNCHECKED WEIGHTS: %s carries no weights_sha256 and is exported anyway (--trust-unsigned); "
                "the bundle is only as trustworthy as that file", path)


def _qat_graph(path: Path, ck: dict) -> Optional[Path]:
    """The run's quantization-aware training graph (`edgeconv train --qat`), when it was trained from these very weights."""
    from .training.qat import QAT_ONNX, read_qat_metadata

    qat = path.parent / QAT_ONNX
    if not qat.is_file():
        return None
    trained_from = read_qat_metadata(qat).get("checkpoint_weights_sha256")
    if trained_from != ck.get("weights_sha256"):
        log.warning("%s was trained from other weights than %s; calibrating INT8 instead (rerun `edgeconv train --qat --from %s`)",
                    qat, path.name, path.parent)
        return None
    return qat


def _calibration_images(req: ExportRequest, imgs, pre) -> tuple:
    """(INT8 calibration images, where they came from): --calib-data, else the seeded sample of the training split."""
    from edgeconv_export.bundle import NormalizedImages

    from .data import load_images_recursive

    if req.calib_data:
        pixels, _ = load_images_recursive(req.calib_data, pre, limit=req.calib_size, seed=0)
        return NormalizedImages(pixels, pre), str(Path(req.calib_data).resolve())
    return NormalizedImages(imgs.calibration, pre), imgs.calibration_source


def format_manifest(m: dict) -> str:
    """A manifest in a few lines: the bundle, then one line per artifact with its parity figures."""
    lines = [f"bundle {m['name']}: {len(m['classes'])} classes, input {m['input']['shape']}, parity on {m['parity']['images']} real images, {m['export_seconds']:.1f} s"]
    for a in m["artifacts"]:
        p = a.get("parity") or {}
        extra = ""
        if p:
            extra = f"  max|diff| {p['max_abs_diff']:.2e}  top1 agree {p['top1_agreement']:.4f}  acc {p['accuracy']:.4f}"
        lines.append(f"  {a['file']:<20} {a['precision']:<5} {a['bytes'] / 1e6:8.2f} MB{extra}")
    if m.get("triton"):
        t = m["triton"]
        lines.append(f"  Triton model repository: {t['file']} ({t['platform']}, {t['precision']}, max_batch_size {t['max_batch_size']})")
    return "\n".join(lines)
