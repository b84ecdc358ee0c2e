"""Reading bundles: manifest, artifacts (hash-checked), reference tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import EdgeconvError
from .fileio import sha256_file
from .preprocess import Preprocess

MANIFEST_NAME = "manifest.json"
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass
class Bundle:
    root: Optional[Path]
    manifest: dict
    preprocess: Preprocess
    classes: list

    @property
    def name(self) -> str:
        return self.manifest.get("name", "model")

    def artifact(self, fmt: str, precision: str, check_hash: bool = True) -> tuple:
        """(path, record) of the artifact of ``fmt`` and ``precision``; refuses a missing or altered file."""
        for a in self.manifest.get("artifacts", []):
            if a["format"] == fmt and a["precision"] == precision:
                path = self.root / a["file"]
                if not path.is_file():
                    raise EdgeconvError(f"bundle {self.root} is missing {a['file']} listed in its manifest; copy the whole bundle directory")
                if check_hash and a.get("sha256") and sha256_file(path) != a["sha256"]:
                    raise EdgeconvError(f"{a['file']} in {self.root} does not match its sha256 in manifest.json (corrupted or altered); copy the bundle again")
                return path, a
        have = sorted({f"{a['format']}/{a['precision']}" for a in self.manifest.get("artifacts", [])})
        raise EdgeconvError(f"bundle {self.root} has no {fmt} {precision} artifact (it has {', '.join(have)}); export it with --precision {precision}")

    def has(self, fmt: str, precision: str) -> bool:
        return any(a["format"] == fmt and a["precision"] == precision for a in self.manifest.get("artifacts", []))


def read_bundle(root: str | Path) -> Bundle:
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise EdgeconvError(f"{root} is not an edgeconv bundle (no {MANIFEST_NAME}); pass a directory written by `edgeconv export`")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeconvError(f"{mpath} is not readable JSON ({exc}); copy the bundle again") from exc
    if manifest.get("format") != "edgeconv.bundle":
        raise EdgeconvError(f"{mpath} is not an edgeconv bundle manifest")
    return Bundle(root, manifest, Preprocess.from_dict(manifest["preprocess"]), list(manifest["classes"]))


def bundle_from_onnx_metadata(path: Path, metadata: dict) -> Bundle:
    """A bare .onnx written by edgeconv carries its classes and preprocessing in metadata_props."""
    try:
        classes = json.loads(metadata["edgeconv.classes"])
        pre = Preprocess.from_dict(json.loads(metadata["edgeconv.preprocess"]))
    except (KeyError, ValueError) as exc:
        raise EdgeconvError(f"{path.name} carries no edgeconv metadata (classes, preprocessing); load the bundle directory instead") from exc
    manifest = {"name": metadata.get("edgeconv.name", path.stem), "classes": classes, "preprocess": pre.to_dict(), "artifacts": []}
    return Bundle(path.parent, manifest, pre, classes)
