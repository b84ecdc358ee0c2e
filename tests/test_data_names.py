"""Image folders whose file and folder names are hostile (non-UTF-8 bytes, spaces, unicode,
leading dashes) and classes left with no readable image: real cats/dogs photos, the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeconv.data import fingerprint, inspect_source, load_dataset
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("non-UTF-8 names need a byte-name file system (Linux)", allow_module_level=True)

LATIN1 = os.fsdecode(b"caf\xe9")  # "café" in Latin-1: not UTF-8, so a str with a lone surrogate
DOGS = "-dogs über ☃"  # leading dash, space, unicode
PRE64 = Preprocess(size=(64, 64), channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
FILE_NAMES = [os.fsdecode(b"\xff\xfe photo %d.jpg"), "-rf %d.jpg", "snow ☃ %d.JPG", "plain.%d.jpg"]


def _copy(src_dir: Path, dst: Path, n: int, offset: int = 0) -> None:
    dst.mkdir(parents=True)
    for i, f in enumerate(sorted(src_dir.iterdir())[offset : offset + n]):
        shutil.copy(f, dst / (FILE_NAMES[i % len(FILE_NAMES)] % i))


@pytest.fixture
def hostile_tree(tmp_path, catsdogs_dir) -> Path:
    """Real cats and dogs in train/validation, under a non-UTF-8 class folder and file names."""
    root = tmp_path / os.fsdecode(b"data \xe9 -x")
    for split, n in (("train", 12), ("validation", 4)):
        _copy(catsdogs_dir / split / "cats", root / split / LATIN1, n)
        _copy(catsdogs_dir / split / "dogs", root / split / DOGS, n)
    return root


def test_fingerprint_and_loading_take_any_name(hostile_tree, tmp_path):
    info = inspect_source(str(hostile_tree))
    assert info.classes == [DOGS, "caf\\xe9"]  # printable labels: they go into JSON, ONNX metadata, labels.txt
    assert info.folders == [DOGS, LATIN1]
    fp = fingerprint(info)
    assert len(fp) == 64 and fingerprint(inspect_source(str(hostile_tree))) == fp  # stable
    # it hashes names relative to the root: the same tree elsewhere has the same fingerprint ...
    moved = tmp_path / "moved"
    shutil.copytree(hostile_tree, moved)
    assert fingerprint(inspect_source(str(moved))) == fp
    # ... and a renamed file is different data
    victim = next((moved / "train" / LATIN1).iterdir())
    victim.rename(victim.with_name(os.fsdecode(b"\xfe" + os.fsencode(victim.name))))
    assert fingerprint(inspect_source(str(moved))) != fp

    ds = load_dataset(str(hostile_tree), PRE64)
    assert ds.skipped == 0 and ds.fingerprint == fp
    assert ds.train.class_counts(ds.classes) == {"caf\\xe9": 12, DOGS: 12}
    assert ds.val.class_counts(ds.classes) == {"caf\\xe9": 4, DOGS: 4}
    described = ds.describe()  # the source stays the real path (export reloads the data from it) and survives JSON
    assert json.loads(json.dumps(described))["source"] == str(hostile_tree)
    json.dumps(described["classes"], ensure_ascii=False).encode("utf-8")  # labels are valid text


def _edgeconv(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeconv", *args], capture_output=True, text=True, timeout=timeout)


def test_train_cli_on_a_non_utf8_class_folder(hostile_tree, tmp_path):
    out = tmp_path / "run"
    r = _edgeconv("train", "--data", str(hostile_tree), "--model", "chollet_catsdogs", "--size", "64", "--epochs", "1",
                  "--batch-size", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["epochs_run"] == 1
    from edgeconv import checkpoint as ckpt

    ck = ckpt.load_checkpoint(out)
    assert ck["classes"] == [DOGS, "caf\\xe9"]
    assert ck["data"]["fingerprint"] == fingerprint(inspect_source(str(hostile_tree)))
    # exported (the checkpoint's data source is the real non-UTF-8 path, reloaded for parity) and evaluated
    # on the folder whose class sub-folders carry those names
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv_runtime import Model

    export_run(ExportRequest(checkpoint=str(out), out=str(tmp_path / "bundle")))
    r = Model.load(tmp_path / "bundle").evaluate(hostile_tree / "validation")
    assert r["n"] == 8 and r["per_class"]["caf\\xe9"]["n"] == 4 and r["per_class"][DOGS]["n"] == 4


def _corrupt(folder: Path, real: Path) -> None:
    """Files named like images that no decoder can read: garbage, empty, a JPEG cut after its header."""
    folder.mkdir(parents=True)
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (folder / "empty.png").write_bytes(b"")
    (folder / os.fsdecode(b"cut \xe9.jpg")).write_bytes(real.read_bytes()[:200])


def test_a_class_of_corrupt_images_is_a_one_line_error_naming_it(tmp_path, catsdogs_dir):
    root = tmp_path / "data"
    _copy(catsdogs_dir / "train" / "dogs", root / "dogs", 6)
    _corrupt(root / LATIN1, next((catsdogs_dir / "train" / "cats").iterdir()))
    with pytest.raises(EdgeconvError, match=r"class 'caf\\xe9' has no readable images in .*/data/caf\\xe9 \(3 file"):
        load_dataset(str(root), PRE64)
    r = _edgeconv("train", "--data", str(root), "--model", "chollet_catsdogs", "--size", "64", "--epochs", "1",
                  "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: class 'caf\\xe9' has no readable images in "), r.stderr
    assert str(root / "caf\\xe9") in lines[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_class_with_no_image_files_is_an_error_naming_it(tmp_path, catsdogs_dir):
    root = tmp_path / "data"
    _copy(catsdogs_dir / "train" / "dogs", root / "train" / "dogs", 4)
    _copy(catsdogs_dir / "train" / "cats", root / "train" / "cats", 4)
    (root / "train" / "cats" / "sub").mkdir()
    (root / "train" / "birds").mkdir()
    (root / "train" / "birds" / "notes.txt").write_text("no images here")
    with pytest.raises(EdgeconvError, match=r"class 'birds': class folder .*train/birds has no images"):
        inspect_source(str(root))
