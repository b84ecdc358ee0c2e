"""The bundle contract: file names, format version and the typed, validated manifest.

The runtime owns it because the device is where a bundle is read: export writes through these
classes, and every reader (Model, bench, serve, Triton export) gets typed fields instead of raw
dicts. ``Manifest.from_dict`` refuses a malformed manifest with one line naming the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, List, Optional, Union

from .errors import EdgeconvError
from .fileio import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "edgeconv.bundle"
MANIFEST_VERSION = 1  # bump on an incompatible change; readers refuse versions newer than theirs
MAX_MANIFEST_BYTES = 4 << 20  # a real manifest is a few KB; refuse a huge one before parsing it
# sha256 of the manifest's canonical body (every field but this one, json.dumps(sort_keys=True, separators=(",", ":"))):
# classes, preprocessing, tolerances, precisions and every file's sha256 are sealed by it, and `manifest.sig` signs it
DIGEST_FIELD = "manifest_sha256"
SIGNATURE_NAME = "manifest.sig"
REEXPORT = "re-export it with `edgeconv export` (or `edgeconv import`)"
# the closed sets and bounds of the preprocessing record: anything else is refused, not guessed at
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_INPUT_SIDE = 8192  # pixels per side of the model's input; an ImageNet model takes 224-600

PRECISIONS = ("fp32", "fp16", "int8")
# what a runtime can be asked to run: the artifact precisions plus bf16, the FP32 graph in OpenVINO's bf16 mode
RUNTIME_PRECISIONS = PRECISIONS + ("bf16",)
FORMATS = ("onnx", "tensorrt")
# "default": the artifact every backend uses; "tensorrt": the INT8 graph made for TensorRT
# (symmetric int8 activations, zero points 0, float bias), which ONNX Runtime's CPU kernels run slowly;
# "portable": the INT8 graph whose integer sums are the same on every CPU (7-bit int8 or 8-bit uint8 weights on the dense layers),
# which ONNX Runtime runs on CPUs the default INT8 graph was not validated for (cpuclass.py)
VARIANTS = ("default", "tensorrt", "portable")

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
INT8_TENSORRT_ONNX = "model.int8.trt.onnx"
INT8_PORTABLE_ONNX = "model.int8.portable.onnx"
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


def canonical_body(d: dict) -> bytes:
    """The bytes the manifest digest is taken over: every field but the digest, keys sorted, no spaces."""
    body = {k: v for k, v in d.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_digest(d: dict) -> str:
    """sha256 (hex) of ``d``'s canonical body, as written in its ``manifest_sha256`` field."""
    return hashlib.sha256(canonical_body(d)).hexdigest()


def seal(d: dict) -> dict:
    """``d`` as a manifest is written: JSON values only, with its ``manifest_sha256``."""
    body = json.loads(json.dumps({k: v for k, v in d.items() if k != DIGEST_FIELD}))  # tuples -> lists, as a reader sees them
    body[DIGEST_FIELD] = manifest_digest(body)
    return body


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_preprocess_values(p: dict, where: str) -> None:
    """Refuse a preprocessing record whose values no training wrote: unknown names, non-finite or out-of-range numbers."""
    from .preprocess import RESIZE_POLICIES

    def bad(msg: str) -> None:
        raise EdgeconvError(f"{where} has an invalid 'preprocess' record: {msg}; {REEXPORT}")

    size = p.get("size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_INPUT_SIDE for s in size)):
        bad(f"size {str(size)[:40]} is not [height, width] of 1 to {MAX_INPUT_SIDE} pixels")
    channels = p.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        bad(f"channels {channels!r} is not 1 or 3")
    for key in ("mean", "std"):
        v = p.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and len(v) == channels and all(_finite(x) for x in v)):
            bad(f"{key} {str(v)[:60]} is not {channels} finite numbers")
    if p.get("std") is not None and not all(x > 0 for x in p["std"]):
        bad(f"std {p['std']} has a value <= 0 (the inputs would be NaN or infinite)")
    if "scale" in p and not (_finite(p["scale"]) and p["scale"] > 0):
        bad(f"scale {p['scale']!r} is not a finite number > 0")
    if "crop_pct" in p and not (_finite(p["crop_pct"]) and 0 < p["crop_pct"] <= 1):
        bad(f"crop_pct {p['crop_pct']!r} is not a number in (0, 1]")
    if "interpolation" in p and p["interpolation"] not in INTERPOLATIONS:
        bad(f"interpolation {str(p['interpolation'])[:40]!r} is not one of {', '.join(INTERPOLATIONS)}")
    if "resize" in p and p["resize"] not in RESIZE_POLICIES:
        bad(f"resize {str(p['resize'])[:40]!r} is not one of {', '.join(RESIZE_POLICIES)}")
    if "layout" in p and p["layout"] != "NCHW":
        bad(f"layout {str(p['layout'])[:20]!r} is not NCHW")
    if "jpeg_draft" in p and not isinstance(p["jpeg_draft"], bool):
        bad(f"jpeg_draft {str(p['jpeg_draft'])[:20]!r} is not true or false")
    order = {1: "L", 3: "RGB"}.get(channels)
    if "channel_order" in p and p["channel_order"] != order:
        bad(f"channel_order {str(p['channel_order'])[:20]!r} does not fit {channels} channels ({order})")
    vr = p.get("value_range")
    if vr is not None and not (isinstance(vr, list) and len(vr) == 2 and all(_finite(x) for x in vr) and vr[0] < vr[1]):
        bad(f"value_range {str(vr)[:40]} is not [low, high]")


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
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise EdgeconvError(f"{where} field 'classes' must be a non-empty list of strings; re-export the bundle")
        if len(set(classes)) != len(classes):
            dup = next(c for c in classes if classes.count(c) > 1)
            raise EdgeconvError(f"{where} names class {dup[:40]!r} twice; class names must be unique ({REEXPORT})")
        check_preprocess_values(_need(d, "preprocess", dict, where), where)
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
        known = {f.name for f in fields(cls)} | {DIGEST_FIELD}
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
        d.pop(DIGEST_FIELD, None)
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


def check_regular(path: Path, rel: str, root: Any) -> os.stat_result:
    """lstat of a file a bundle holds: refused in one line unless it is a regular file (not a symlink, FIFO, device, folder)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise EdgeconvError(f"bundle {root} is missing {rel} listed in its manifest; copy the whole bundle directory") from exc
    if stat.S_ISLNK(st.st_mode):
        raise EdgeconvError(f"{rel} in {root} is a symlink; a bundle holds its own files: copy the bundle with its files (cp -rL), not links")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise EdgeconvError(f"{rel} in {root} is {kind}, not a regular file; refusing the bundle (copy it again)")
    return st


def read_regular_bytes(path: Path, rel: str, root: Any, limit: int) -> bytes:
    """The bytes of a small regular file of a bundle (never blocking on a FIFO), refused beyond ``limit`` bytes."""
    from .fileio import open_regular

    st = check_regular(path, rel, root)
    if st.st_size > limit:
        size = f"{st.st_size >> 20} MB" if st.st_size >= 1 << 20 else f"{st.st_size >> 10} KB"
        raise EdgeconvError(f"{rel} in {root} is {size}; a manifest is a few KB, so this is not a bundle written by edgeconv")
    try:
        with os.fdopen(open_regular(path, follow_symlinks=False), "rb") as f:
            return f.read(limit + 1)[:limit]
    except OSError as exc:
        raise EdgeconvError(f"{rel} in {root} is not readable ({exc.strerror or exc}); copy the bundle again") from exc


def read_manifest(root: PathLike) -> Manifest:
    """Read and validate ``root/manifest.json``; every problem is one line.

    The file must be a regular file (not a symlink, FIFO or folder) whose ``manifest_sha256`` matches its
    canonical body: a manifest edited by hand, or written before manifests were sealed, is refused.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not os.path.lexists(path) or os.path.isdir(path):
        raise EdgeconvError(f"{root} is not an edgeconv bundle (no {MANIFEST_NAME}); pass a directory written by `edgeconv export`")
    raw = read_regular_bytes(path, MANIFEST_NAME, root, MAX_MANIFEST_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise EdgeconvError(f"{path} is not readable JSON ({str(exc).splitlines()[0][:120]}); copy the bundle again") from exc
    if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("version"), int) \
            and data["version"] <= MANIFEST_VERSION:
        check_digest(data, root)
    m = Manifest.from_dict(data, str(path))
    m.digest = data[DIGEST_FIELD]
    return m


def check_digest(data: dict, root: Any) -> None:
    """Refuse a manifest without its ``manifest_sha256`` or whose body no longer matches it."""
    digest = data.get(DIGEST_FIELD)
    if digest is None:
        raise EdgeconvError(f"{MANIFEST_NAME} in {root} has no {DIGEST_FIELD}: the bundle was written by an older edgeconv, "
                            f"before bundles were sealed; {REEXPORT}")
    if not is_sha256(digest):
        raise EdgeconvError(f"{MANIFEST_NAME} in {root} has a {DIGEST_FIELD} that is not a hex sha256 digest; {REEXPORT}")
    if manifest_digest(data) != digest:
        raise EdgeconvError(f"{MANIFEST_NAME} in {root} was changed after export (its contents do not match its {DIGEST_FIELD}); "
                            f"copy the bundle again or {REEXPORT}")


def write_manifest(root: PathLike, manifest: Manifest) -> str:
    """Write ``root/manifest.json`` atomically (a crash leaves the old one or the new one), sealed with its
    ``manifest_sha256``; returns that digest (what ``manifest.sig`` signs)."""
    data = seal(manifest.to_dict())
    atomic_write_json(Path(root) / MANIFEST_NAME, data)
    manifest.digest = data[DIGEST_FIELD]
    return manifest.digest


__all__ = [
    "DIGEST_FIELD", "INTERPOLATIONS", "SIGNATURE_NAME", "check_digest", "check_preprocess_values", "check_regular", "manifest_digest", "seal",
    "Artifact", "ENGINE_FILES", "ENGINE_SUFFIXES", "FORMATS", "INT8_TENSORRT_ONNX", "MANIFEST_FORMAT", "MANIFEST_NAME",
    "MANIFEST_VERSION", "Manifest", "hash_mismatch", "is_sha256", "ONNX_FILES", "PRECISIONS", "RUNTIME_PRECISIONS", "REFERENCE_DIR", "VARIANTS", "check_relative_path",
    "read_manifest", "resolve_inside", "write_manifest",
]
