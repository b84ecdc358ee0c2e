"""Reading bundles: the validated manifest, artifacts (hash-checked, inside the bundle), reference files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import EdgeconvError
from .fileio import sha256_file
from .manifest import ENGINE_SUFFIXES, MANIFEST_NAME, Artifact, Manifest, hash_mismatch, read_manifest, resolve_inside
from .preprocess import Preprocess

__all__ = ["ENGINE_SUFFIXES", "MANIFEST_NAME", "Bundle", "bundle_from_onnx_metadata", "read_bundle"]


@dataclass
class Bundle:
    root: Optional[Path]
    manifest: Manifest
    preprocess: Preprocess
    classes: List[str]
    check_hash: bool = True  # False (Model.load(check_hash=False)): files are read without comparing their sha256

    @property
    def name(self) -> str:
        return self.manifest.name

    def path(self, rel: str, check_hash: bool = True) -> Path:
        """A file the manifest names, refused when it points outside the bundle or differs from its sha256.

        Every file the manifest's ``files`` map lists is hashed before it is handed out (once per file
        version: a changed size or mtime hashes it again); a bundle without the map is read unchecked.
        """
        path = resolve_inside(self.root, rel, f"{MANIFEST_NAME} in {self.root}")
        expected = (self.manifest.files or {}).get(rel) if check_hash and self.check_hash else None
        if expected is not None:
            self.check_file(rel, path, expected)
        return path

    def check_file(self, rel: str, path: Path, expected: str) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            raise EdgeconvError(f"bundle {self.root} is missing {rel} listed in its manifest; copy the whole bundle directory") from exc
        stamp = (rel, st.st_size, st.st_mtime_ns, st.st_ino)
        verified = self.__dict__.setdefault("_verified", set())
        if stamp in verified:
            return
        if sha256_file(path) != expected:
            raise hash_mismatch(rel, self.root)
        verified.add(stamp)

    def artifact(self, fmt: str, precision: str, check_hash: bool = True, variant: Optional[str] = None) -> Tuple[Path, Artifact]:
        """(path, record) of the artifact of ``fmt``/``precision``/``variant``; refuses a missing or altered file.

        ``variant`` None is the default artifact; "tensorrt" falls back to the default one when the
        bundle has no TensorRT-specific graph of that precision (only INT8 has one).
        """
        a = self.manifest.find(fmt, precision, variant)
        if a is None and variant not in (None, "default"):
            a = self.manifest.find(fmt, precision)
        if a is None:
            have = sorted({f"{x.format}/{x.precision}" + ("" if x.variant == "default" else f"/{x.variant}") for x in self.manifest.artifacts})
            raise EdgeconvError(f"bundle {self.root} has no {fmt} {precision} artifact (it has {', '.join(have) or 'none'}); "
                                f"export it with --precision {precision}")
        path = self.path(a.file)
        if not path.is_file():
            raise EdgeconvError(f"bundle {self.root} is missing {a.file} listed in its manifest; copy the whole bundle directory")
        if check_hash:
            self.check_file(a.file, path, a.sha256)
            for rel in a.details.get("external_data") or []:  # ONNX Runtime reads these beside the graph
                if not isinstance(rel, str) or rel not in (self.manifest.files or {}):
                    raise EdgeconvError(f"{a.file} in {self.root} has external data {rel!r} that manifest.json gives no sha256 for; re-export the bundle")
                self.path(rel)
        return path, a

    def has(self, fmt: str, precision: str, variant: Optional[str] = None) -> bool:
        return self.manifest.find(fmt, precision, variant) is not None


def read_bundle(root) -> Bundle:
    root = Path(root)
    manifest = read_manifest(root)
    try:
        pre = Preprocess.from_dict(manifest.preprocess)
    except (TypeError, ValueError, KeyError) as exc:  # a mistyped number or list in the preprocess record
        detail = " ".join(str(exc).split())[:160]
        raise EdgeconvError(f"{root / MANIFEST_NAME} has an invalid 'preprocess' record ({type(exc).__name__}: {detail}); re-export the bundle") from exc
    return Bundle(root, manifest, pre, list(manifest.classes))


def bundle_from_onnx_metadata(path: Path, metadata: dict) -> Bundle:
    """A bare .onnx written by edgeconv carries its classes and preprocessing in metadata_props."""
    try:
        classes = json.loads(metadata["edgeconv.classes"])
        pre = Preprocess.from_dict(json.loads(metadata["edgeconv.preprocess"]))
    except (KeyError, ValueError) as exc:
        raise EdgeconvError(f"{path.name} carries no edgeconv metadata (classes, preprocessing); load the bundle directory instead") from exc
    manifest = Manifest(name=metadata.get("edgeconv.name", path.stem), classes=list(classes), preprocess=pre.to_dict())
    return Bundle(path.parent, manifest, pre, list(classes))
