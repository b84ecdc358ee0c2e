"""Helpers for tests that alter a copy of a real bundle."""
import json
import shutil
from pathlib import Path

from edgeconv_runtime.manifest import seal


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, fn, reseal: bool = True) -> None:
    """Apply ``fn`` to the manifest's JSON and write it back.

    ``reseal`` (the default) records the edited body's manifest_sha256, as a careful editor (or an attacker who
    knows the format) would: the edit then meets the runtime's other checks. ``reseal=False`` leaves the old
    digest, as a hand edit does.
    """
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(seal(m) if reseal else m))
