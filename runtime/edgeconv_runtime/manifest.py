"""The bundle contract: file names, format version and the typed, validated manifest.

The runtime owns it because the device is where a bundle is read: export writes through these
classes, and every reader (Model, bench, serve, Triton export) gets typed fields instead of raw
dicts. ``Manifest.from_dict`` refuses a malformed manifest with one line naming the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, List, Optional, Union

from .errors import EdgeconvError
from .fileio import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "edgeconv.bundle"
MANIFEST_VERSION = 1  # bump on an incompatible change; readers refuse versions newer than theirs
MAX_MANIFEST_BYTES = 4 << 20  # a real manifest is a few KB; refuse a huge one before parsing it

PRECISIONS = ("fp32", "fp16", "int8")
# what a runtime can be asked to run: the artifact precisions plus bf16, the FP32 graph in OpenVINO's bf16 mode
RUNTIME_PRECISIONS = PRECISIONS + ("bf16",)
FORMATS = ("onnx", "tensorrt")
# "default": the artifact every backend uses; "tensorrt": the INT8 graph made for TensorRT
# (symmetric int8 activations, zero points 0, float bias), which ONNX Runtime's CPU kernels run slowly
VARIANTS = ("default", "tensorrt")

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
INT8_TENSORRT_ONNX = "model.int8.trt.onnx"
ENGINE_FILES = {"fp32": "model.plan", "fp16": "model.fp16.plan", "int8": "model.int8.plan"}
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
REFERENCE_DIR = "reference"

PathLike = Union[str, "os.PathLike[str]"]


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def hash_mismatch(rel: str, root: Any) -> EdgeconvError:
    """The one error for a file whose bytes differ from the sha256 the manifest records."""
    return EdgeconvError(f"{rel} in {root} does not match its sha256 in manifest.json (corrupted or altered); copy the bundle again")


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else " or ".join(x.__name__ for x in t)


def _need(d: dict, key: str, typ: Any, where: str, required: bool = True, default: Any = None) -> Any:
    if key not in d or d[key] is None:
        if required:
            raise EdgeconvError(f"{where} has no {key!r} field; re-export the bundle with `edgeconv export`")
        return default
    value = d[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise EdgeconvError(f"{where} field {key!r} must be {_type_name(typ)}, not {type(value).__name__}; re-export the bundle")
    return value


def check_relative_path(rel: str, where: str) -> str:
    """A path a manifest names must be relative, in POSIX form, and stay inside the bundle."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise EdgeconvError(f"{where} names an invalid path {rel!r}; re-export the bundle")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise EdgeconvError(f"{where} names {rel!r}, which points outside the bundle; refusing it (re-export the bundle)")
    return rel


def resolve_inside(root: Path, rel: str, where: str = "manifest.json") -> Path:
    """``root/rel``, refused when it (or a symlink on the way) leaves ``root``."""
    check_relative_path(rel, where)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise EdgeconvError(f"{where} names {rel!r}, which resolves outside the bundle (a symlink?); refusing it")
    return target


@dataclass
class Artifact:
    """One model file of the bundle and what is known of it."""

    file: str
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8"
    sha256: str
    bytes: int
    parity: Optional[dict] = None
    details: dict = field(default_factory=dict)
    variant: str = "default"
    purpose: str = ""

    @classmethod
    def from_dict(cls, d: Any, where: str = "artifact") -> "Artifact":
        if not isinstance(d, dict):
            raise EdgeconvError(f"{where} must be an object, not {type(d).__name__}; re-export the bundle")
        a = cls(
            file=check_relative_path(_need(d, "file", str, where), where),
            format=_need(d, "format", str, where),
            precision=_need(d, "precision", str, where),
            sha256=_need(d, "sha256", str, where),
            bytes=_need(d, "bytes", int, where),
            parity=_need(d, "parity", dict, where, required=False),
            details=_need(d, "details", dict, where, required=False, default={}),
            variant=_need(d, "variant", str, where, required=False, default="default"),
            purpose=_need(d, "purpose", str, where, required=False, default=""),
        )
        if a.format not in FORMATS:
            raise EdgeconvError(f"{where} has format {a.format!r}; this runtime knows {', '.join(FORMATS)} (upgrade edgeconv-runtime)")
        if a.precision not in PRECISIONS:
            raise EdgeconvError(f"{where} has precision {a.precision!r}; use one of {', '.join(PRECISIONS)}")
        if a.variant not in VARIANTS:
            raise EdgeconvError(f"{where} has variant {a.variant!r}; this runtime knows {', '.join(VARIANTS)} (upgrade edgeconv-runtime)")
        if not is_sha256(a.sha256):
            raise EdgeconvError(f"{where} sha256 {a.sha256[:20]!r} is not a hex sha256 digest; re-export the bundle")
        return a

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> tuple:
        return (self.format, self.precision, self.variant)


@dataclass
class Manifest:
    name: str
    classes: List[str]
    preprocess: dict
    artifacts: List[Artifact] = field(default_factory=list)
    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    reference: Optional[dict] = None
    created: str = ""
    calibration: Optional[dict] = None
    export_seconds: Optional[float] = None
    triton: Optional[dict] = None
    # {relative path: sha256} of every other file the runtime reads (reference tensors and images, engine sidecars,
    # ONNX external data). Absent in bundles written before it existed: their files are then read unchecked.
    files: Optional[dict] = None
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(d, dict):
            raise EdgeconvError(f"{where} must hold a JSON object, not {type(d).__name__}; pass a bundle written by `edgeconv export`")
        if d.get("format") != MANIFEST_FORMAT:
            raise EdgeconvError(f"{where} is not an edgeconv bundle manifest (format {d.get('format')!r}); pass a bundle written by `edgeconv export`")
        version = _need(d, "version", int, where)
        if version > MANIFEST_VERSION:
            raise EdgeconvError(f"{where} is bundle format version {version}, newer than this runtime's {MANIFEST_VERSION}; "
                                "upgrade edgeconv-runtime (pip install -U edgeconv-runtime)")
        if version < 1:
            raise EdgeconvError(f"{where} has an invalid format version {version}; re-export the bundle")
        classes = _need(d, "classes", list, where)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise EdgeconvError(f"{where} field 'classes' must be a non-empty list of strings; re-export the bundle")
        artifacts = _need(d, "artifacts", list, where, required=False, default=[])
        reference = _need(d, "reference", dict, where, required=False)
        if reference:
            for key in ("inputs", "outputs", "labels"):
                if key in reference:
                    check_relative_path(_need(reference, key, str, f"{where} reference"), f"{where} reference.{key}")
            for i, img in enumerate(_need(reference, "images", list, f"{where} reference", required=False, default=[])):
                check_relative_path(img, f"{where} reference.images[{i}]")
        files = _need(d, "files", dict, where, required=False)
        if files is not None:
            for rel, digest in files.items():
                check_relative_path(rel, f"{where} files")
                if not is_sha256(digest):
                    raise EdgeconvError(f"{where} files[{rel!r}] is not a hex sha256 digest; re-export the bundle")
        known = {f.name for f in fields(cls)}
        m = cls(
            name=_need(d, "name", str, where),
            classes=list(classes),
            preprocess=_need(d, "preprocess", dict, where),
            artifacts=[Artifact.from_dict(a, f"{where} artifacts[{i}]") for i, a in enumerate(artifacts)],
            input=_need(d, "input", dict, where, required=False, default={}),
            output=_need(d, "output", dict, where, required=False, default={}),
            source=_need(d, "source", dict, where, required=False, default={}),
            versions=_need(d, "versions", dict, where, required=False, default={}),
            parity=_need(d, "parity", dict, where, required=False, default={}),
            reference=reference,
            created=_need(d, "created", str, where, required=False, default=""),
            calibration=_need(d, "calibration", dict, where, required=False),
            export_seconds=_need(d, "export_seconds", float, where, required=False),
            triton=_need(d, "triton", dict, where, required=False),
            files=files,
            version=version,
        )
        m.extra = {k: v for k, v in d.items() if k not in known}  # fields a newer minor writer added: kept on rewrite
        seen = set()
        for a in m.artifacts:
            if a.key in seen:
                raise EdgeconvError(f"{where} lists two {a.format} {a.precision} ({a.variant}) artifacts; re-export the bundle")
            seen.add(a.key)
        return m

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["artifacts"] = [a.to_dict() for a in self.artifacts]
        d.update(getattr(self, "extra", {}))
        return d

    # ------------------------------------------------------------------ artifacts
    def find(self, fmt: str, precision: str, variant: Optional[str] = None) -> Optional[Artifact]:
        """The artifact of ``fmt``/``precision``; ``variant`` None means the default one."""
        want = variant or "default"
        return next((a for a in self.artifacts if a.format == fmt and a.precision == precision and a.variant == want), None)

    def with_artifact(self, artifact: Artifact) -> "Manifest":
        """A copy with ``artifact`` added, replacing one of the same format, precision and variant."""
        import copy

        m = copy.copy(self)
        m.artifacts = [a for a in self.artifacts if a.key != artifact.key] + [artifact]
        return m

    @property
    def input_shape(self) -> Optional[tuple]:
        """(C, H, W) from the input record, when it has one."""
        shape = self.input.get("shape")
        if isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape[1:]):
            return tuple(shape[1:])
        return None


def read_manifest(root: PathLike) -> Manifest:
    """Read and validate ``root/manifest.json``; every problem is one line."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EdgeconvError(f"{root} is not an edgeconv bundle (no {MANIFEST_NAME}); pass a directory written by `edgeconv export`")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise EdgeconvError(f"{path} is {size >> 20} MB; a manifest is a few KB, so this is not a bundle written by edgeconv")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EdgeconvError(f"{path} is not readable JSON ({str(exc).splitlines()[0][:120]}); copy the bundle again") from exc
    return Manifest.from_dict(data, str(path))


def write_manifest(root: PathLike, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically (a crash leaves the old one or the new one)."""
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest.to_dict())


__all__ = [
    "Artifact", "ENGINE_FILES", "ENGINE_SUFFIXES", "FORMATS", "INT8_TENSORRT_ONNX", "MANIFEST_FORMAT", "MANIFEST_NAME",
    "MANIFEST_VERSION", "Manifest", "hash_mismatch", "is_sha256", "ONNX_FILES", "PRECISIONS", "RUNTIME_PRECISIONS", "REFERENCE_DIR", "VARIANTS", "check_relative_path",
    "read_manifest", "resolve_inside", "write_manifest",
]
