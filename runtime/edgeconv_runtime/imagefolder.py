"""Reading image folders, the one way training, export and `Model.evaluate` all do it: class sub-folders (hidden ones
skipped, sorted), every image file under a folder (by extension, regular files only, sorted), and a folder name as the
printable label training gave it."""
from __future__ import annotations

import os
from pathlib import Path

from .preprocess import IMAGE_EXTENSIONS


def shown(name) -> str:
    """A file or folder name as printable text: bytes that are not UTF-8 (os.fsdecode's surrogate escapes) become
    ``\\xNN``, so a label, a JSON file or an error line never fails to encode."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def class_folders(root: Path) -> list:
    """The class sub-folders of ``root``, sorted by name; hidden ones (.git, .ipynb_checkpoints) skipped."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(root: Path) -> list:
    """Every image file under ``root`` at any depth, sorted: known extensions, regular files only."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
