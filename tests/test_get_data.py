"""`make data` (scripts/get_data.sh, issue 24 §6): the datasets come from their sources only if their bytes are the
pinned ones. Never against the network here: every source is a file:// copy made from the real data."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, require

SCRIPT = ROOT / "scripts" / "get_data.sh"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _run(dest: Path, *args, mnist_urls: str = "file:///nonexistent/", hymenoptera_url: str = "file:///nonexistent.zip"):
    env = {**os.environ, "EDGECONV_DATA": str(dest), "EDGECONV_MNIST_URLS": mnist_urls, "EDGECONV_HYMENOPTERA_URL": hymenoptera_url}
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_make_data_runs_the_script():
    r = subprocess.run(["make", "-n", "data"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "scripts/get_data.sh" in r.stdout, r.stdout + r.stderr


def test_the_real_data_verifies():
    require(SHARED / "hymenoptera_data")
    require(SHARED / "cats_and_dogs_small")
    rc, out = _run(SHARED, "--verify")
    assert rc == 0 and out.count(" ok ") == 6, out


def test_an_empty_folder_is_reported_missing_and_nothing_is_fetched(tmp_path):
    rc, out = _run(tmp_path, "--verify")
    assert rc == 1 and out.count("MISSING") == 6, out
    assert "no official download of this split exists" in out, out
    assert list(tmp_path.iterdir()) == []


def test_mnist_only_from_a_source_with_the_pinned_bytes(tmp_path):
    real = require(SHARED / "mnist")
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir(), good.mkdir()
    for name in MNIST_FILES:
        shutil.copy(real / name, good / name)
        data = bytearray((real / name).read_bytes())
        data[len(data) // 2] ^= 1  # one flipped bit
        (bad / name).write_bytes(bytes(data))
    dest = tmp_path / "data"
    rc, out = _run(dest, "mnist", mnist_urls=f"file://{tmp_path}/nowhere/ file://{bad}/ file://{good}/")
    assert rc == 0, out
    assert out.count("(refused file://") == 4 and out.count("fetched") == 4, out
    for name in MNIST_FILES:
        assert hashlib.sha256((dest / "mnist" / name).read_bytes()).digest() == hashlib.sha256((real / name).read_bytes()).digest()
    rc, out = _run(dest, "mnist")  # again: nothing to do
    assert rc == 0 and out.count(" ok ") == 4 and "fetched" not in out, out
    rc, out = _run(tmp_path / "other", "mnist", mnist_urls=f"file://{bad}/")  # no source with the right bytes
    assert rc == 1 and out.count("FAILED") == 4 and not (tmp_path / "other" / "mnist").exists(), out


def _zip(folder: Path, out: Path, flip: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                data = bytearray(f.read_bytes())
                if f.name == flip:
                    data[-1] ^= 1
                z.writestr("hymenoptera_data/" + str(f.relative_to(folder)), bytes(data))
    return out


def test_hymenoptera_from_the_zip_only_with_the_pinned_files(tmp_path):
    real = require(SHARED / "hymenoptera_data")
    some = sorted((real / "val" / "bees").iterdir())[0].name
    rc, out = _run(tmp_path / "a", "hymenoptera", hymenoptera_url=f"file://{_zip(real, tmp_path / 'bad.zip', flip=some)}")
    assert rc == 1 and "not the pinned files: nothing installed" in out and not (tmp_path / "a" / "hymenoptera_data").exists(), out
    rc, out = _run(tmp_path / "b", "hymenoptera", hymenoptera_url=f"file://{_zip(real, tmp_path / 'good.zip')}")
    assert rc == 0 and "fetched" in out and "zip sha256" in out, out
    rc, out = _run(tmp_path / "b", "--verify", "hymenoptera")
    assert rc == 0 and " ok " in out, out


def test_catsdogs_is_built_from_kaggles_training_folder(tmp_path):
    real = require(SHARED / "cats_and_dogs_small")
    kaggle = tmp_path / "train"  # Kaggle's train/: cat.N.jpg, dog.N.jpg in one folder
    kaggle.mkdir()
    for f in real.rglob("*.jpg"):
        os.symlink(f, kaggle / f.name)
    rc, out = _run(tmp_path / "data", "--catsdogs-from", str(kaggle), "catsdogs")
    assert rc == 0 and "built" in out and "byte-identical to the project's copy" in out, out
    assert len(list((tmp_path / "data" / "cats_and_dogs_small" / "validation" / "dogs").iterdir())) == 500


@pytest.mark.parametrize("arg", ["--bogus", "imagenet"])
def test_unknown_arguments_are_one_line_errors(tmp_path, arg):
    rc, out = _run(tmp_path, arg)
    assert rc == 2 and out.count("\n") == 1 and "unknown argument" in out, out
