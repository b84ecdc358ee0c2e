"""Helpers for tests that alter a copy of a real bundle."""
import json
import shutil
from pathlib import Path


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, fn) -> None:
    """Apply ``fn`` to the manifest's JSON and write it back."""
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
