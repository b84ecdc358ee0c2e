"""The bundle manifest: a versioned dataclass serialised to manifest.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class Artifact:
    """One file of the bundle and what is known of it."""

    file: str
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8"
    sha256: str
    bytes: int
    parity: Optional[dict] = None
    details: dict = field(default_factory=dict)


@dataclass
class Manifest:
    name: str
    classes: list
    input: dict
    output: dict
    preprocess: dict
    artifacts: list
    source: dict
    versions: dict
    parity: dict
    reference: dict
    created: str
    calibration: Optional[dict] = None
    export_seconds: Optional[float] = None
    triton: Optional[dict] = None
    format: str = "edgeconv.bundle"
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict:
        return asdict(self)
