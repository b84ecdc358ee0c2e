"""``export_module``: a user's own PyTorch classifier to a bundle, with the same artifacts and gates as edgeconv's runs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import Manifest
from edgeconv_runtime.preprocess import Preprocess

from .bundle import ExportOptions, export_bundle, torch_logits
from .card import write_import_card
from .images import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, Images, gather_images


def export_module(module, classes: Sequence[str], preprocess: Union[Preprocess, dict], calib_images: Optional[Images], out,
                  val_images: Optional[Images] = None, precisions: Sequence[str] = ("fp32", "fp16", "int8"), name: Optional[str] = None,
                  calib_size: int = DEFAULT_CALIB_SIZE, val_size: int = DEFAULT_VAL_SIZE, max_accuracy_drop: float = 1.0,
                  int8_options: Optional[dict] = None,
                  opset: Optional[int] = None, calibration_method: str = "auto", force: bool = False,
                  source: Optional[dict] = None) -> Manifest:
    """Trace ``module`` (an ``nn.Module`` taking NCHW float32, giving one score per class) and write a bundle at ``out``.

    ``preprocess``: a ``Preprocess`` or its dict (``size``, ``mean``, ``std``, ``resize``...). ``calib_images``: a folder
    of real images or a list of image files, for INT8 calibration and, without ``val_images``, for parity. Parity labels
    come from class folders named like ``classes``, else from the module's own top-1. Returns the manifest.
    """
    t0 = time.perf_counter()
    pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(dict(preprocess))
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
        raise EdgeconvError("classes must be a list of unique, non-empty class names, one per output of the module")
    if Path(out).exists() and not force:
        raise EdgeconvError(f"{out} already exists; pass force=True to replace it or choose another out")
    if val_images is None and calib_images is None:
        raise EdgeconvError("parity is checked on real images; pass calib_images or val_images (a folder of images or a list of files)")
    opts = ExportOptions(precisions=tuple(precisions), max_accuracy_drop=max_accuracy_drop, calibration_method=calibration_method, force=force,
                         **(int8_options or {}))
    if opset is not None:
        opts.opset = opset
    opts.validate()
    want_int8 = "int8" in opts.precisions
    if want_int8 and calib_images is None:
        raise EdgeconvError("INT8 needs calibration images; pass calib_images (a folder of real images or a list of files)")
    images = gather_images(val_images if val_images is not None else calib_images, calib_images if want_int8 else None, pre, val_size, calib_size,
                           val_flag="val_images" if val_images is not None else "calib_images")
    module.eval()
    ref_logits = torch_logits(module, images.val_x)
    if ref_logits.ndim != 2 or ref_logits.shape[1] != len(classes):
        raise EdgeconvError(f"the module outputs shape {list(ref_logits.shape)} but {len(classes)} classes were given; "
                            "pass one class name per output")
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    inputs = images.export_inputs(name or type(module).__name__, classes, pre, ref_logits, model=module,
                                  source={"module": kind, **(source or {})})
    manifest = export_bundle(inputs, out, opts)
    write_import_card(Path(out), manifest, round(time.perf_counter() - t0, 3))
    return manifest
