"""Real images for an imported model's bundle: parity images (with their labels when their folders name the classes)
and calibration images, decoded with the bundle's own preprocessing."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.imagefolder import image_files as list_image_files
from edgeconv_runtime.preprocess import Preprocess, load_pixels, normalize

from .bundle import ExportInputs

log = logging.getLogger("edgeconv.export")

DEFAULT_CALIB_SIZE = 500
DEFAULT_VAL_SIZE = 500
Images = Union[str, Path, Sequence]  # a folder, or a list of image files


def image_files(src: Images, limit: int, flag: str) -> tuple:
    """(files, root folder or None): every image under a folder, or the files given; a seeded sample of ``limit``."""
    if isinstance(src, (str, Path)):
        root = Path(src)
        if not root.is_dir():
            raise EdgeconvError(f"{flag} folder not found: {src}; pass a directory of real images")
        files = list_image_files(root)
    else:
        root, files = None, [Path(f) for f in src]
    if not files:
        raise EdgeconvError(f"{flag} ({src if root else 'the list given'}) holds no images; pass a folder of real images")
    if len(files) > limit:
        files = [files[i] for i in sorted(np.random.default_rng(0).choice(len(files), limit, replace=False))]
    return files, root


def load_images(files: list, pre: Preprocess, flag: str) -> tuple:
    """(NCHW float32 batch, the files that decoded); unreadable files are skipped, as in training."""
    pixels, kept = [], []
    for f in files:
        try:
            pixels.append(load_pixels(f, pre, strict=False))
            kept.append(f)
        except EdgeconvError:
            continue
    if not kept:
        raise EdgeconvError(f"no readable images among the {len(files)} files given by {flag}")
    if len(kept) < len(files):
        log.warning("skipped %d unreadable image(s) of %s", len(files) - len(kept), flag)
    return normalize(np.stack(pixels), pre), kept


def folder_labels(files: list, root: Optional[Path], classes: list) -> Optional[np.ndarray]:
    """Class indices from the sub-folder each file is in, when every one is named like a class; else None."""
    if root is None:
        return None
    names = [Path(f).relative_to(root).parts[0] if len(Path(f).relative_to(root).parts) > 1 else None for f in files]
    if not all(n in classes for n in names):
        return None
    return np.array([classes.index(n) for n in names], dtype=np.int64)


@dataclass
class RealImages:
    val_x: np.ndarray
    val_files: list
    val_root: Optional[Path]
    val_source: str
    calib_x: Optional[np.ndarray]
    calib_source: Optional[str]

    def export_inputs(self, name: str, classes: list, pre: Preprocess, ref_logits: np.ndarray, source: dict, **kw) -> ExportInputs:
        """The bundle writer's inputs; parity labels from class folders, else the reference's own top-1."""
        val_y = folder_labels(self.val_files, self.val_root, classes)
        source = {**source, "parity_split": f"{len(self.val_x)} images of {self.val_source}",
                  "parity_labels": "class folders" if val_y is not None else "the reference's top-1 (no class folders named like the labels)"}
        return ExportInputs(model=kw.pop("model", None), name=name, classes=list(classes), preprocess=pre, val_x=self.val_x,
                            val_y=ref_logits.argmax(1) if val_y is None else val_y, calib_x=self.calib_x,
                            reference_files=[str(f) for f in self.val_files], reference_logits=ref_logits, source=source,
                            calibration_source=self.calib_source, labels_from_reference=val_y is None, **kw)


def gather_images(val: Images, calib: Optional[Images], pre: Preprocess, val_size: int = DEFAULT_VAL_SIZE,
                  calib_size: int = DEFAULT_CALIB_SIZE, val_flag: str = "--val-data") -> RealImages:
    """Parity images from ``val`` (``val_flag`` names where they came from); calibration images from ``calib`` (None: no INT8)."""
    files, root = image_files(val, val_size, val_flag)
    val_x, kept = load_images(files, pre, val_flag)
    calib_x = calib_source = None
    if calib is not None:
        calib_files, calib_root = image_files(calib, calib_size, "--calib-data")
        calib_x = load_images(calib_files, pre, "--calib-data")[0]
        calib_source = str(calib_root.resolve()) if calib_root else f"{len(calib_files)} image files"
    return RealImages(val_x, kept, root, str(root) if root else f"{len(kept)} image files", calib_x, calib_source)
