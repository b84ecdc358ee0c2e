"""Every path a manifest names stays inside its bundle, a manifest is read or refused in one line, check_hash=False reads
unchecked (torch-free and quick: `make mutants` runs these once per mutant of manifest.py and bundle.py)."""
import json
import os

import numpy as np
import pytest

from bundle_helpers import copy_bundle
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime import bundle as bundle_mod
from edgeconv_runtime.manifest import MAX_MANIFEST_BYTES, check_relative_path, is_sha256, read_manifest, resolve_inside


@pytest.mark.parametrize("rel", [None, 7, "", "a\x00b", "reference\\outputs.npy"])
def test_invalid_paths_are_refused(rel):
    with pytest.raises(EdgeconvError, match="names an invalid path"):
        check_relative_path(rel, "artifact")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../model.onnx", "reference/../../model.onnx", "~/model.onnx"])
def test_paths_out_of_the_bundle_are_refused(rel):
    with pytest.raises(EdgeconvError, match="points outside the bundle"):
        check_relative_path(rel, "artifact")


def test_paths_inside_resolve_and_a_symlink_out_is_refused(tmp_path):
    root = tmp_path / "bundle"
    (root / "reference").mkdir(parents=True)
    assert check_relative_path("reference/outputs.npy", "x") == "reference/outputs.npy"
    assert check_relative_path("a..b/c", "x") == "a..b/c"  # dots inside a name are not a parent reference
    assert resolve_inside(root, "reference/outputs.npy") == (root / "reference" / "outputs.npy").resolve()
    assert resolve_inside(root, ".") == root.resolve()
    with pytest.raises(EdgeconvError, match="names an invalid path"):
        resolve_inside(root, "reference\\outputs.npy")  # checked as a manifest path first, though it would resolve inside
    with pytest.raises(EdgeconvError, match="points outside the bundle"):
        resolve_inside(root, "~/outputs.npy")
    os.symlink(tmp_path, root / "reference" / "up")
    with pytest.raises(EdgeconvError, match="resolves outside the bundle"):
        resolve_inside(root, "reference/up/secret.npy")


def test_sha256_strings():
    assert is_sha256("0123456789abcdef" * 4)
    for bad in ("0123456789abcdef" * 4 + "0", "0123456789abcdef" * 3, "0123456789ABCDEF" * 4, "g" * 64, None, 64):
        assert not is_sha256(bad), bad


def test_unreadable_manifests_are_one_line(tmp_path):
    with pytest.raises(EdgeconvError, match="is not an edgeconv bundle"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(EdgeconvError, match="is not an edgeconv bundle"):
        read_manifest(tmp_path)  # a folder named manifest.json is not a manifest
    (tmp_path / "manifest.json").rmdir()
    (tmp_path / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(EdgeconvError, match="is 4 MB; a manifest is a few KB"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b" " * MAX_MANIFEST_BYTES)  # at the limit: read, and refused as JSON
    with pytest.raises(EdgeconvError, match="is not readable JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "edgeconv.bundle"}))
    with pytest.raises(EdgeconvError) as exc:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(exc.value) and "\n" not in str(exc.value)


def test_check_hash_false_reads_an_altered_file_unchecked(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    np.save(b / "reference" / "outputs.npy", np.load(b / "reference" / "outputs.npy") + 1e-6)  # altered, still within tolerance
    with pytest.raises(EdgeconvError, match="does not match its sha256"):
        Model.load(b).verify()
    with Model.load(b, check_hash=False) as model:
        assert model.verify()["ok"]


def test_a_verified_file_is_hashed_again_only_when_it_changes(mnist_bundle, tmp_path, monkeypatch):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    bundle = bundle_mod.read_bundle(b)
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        bundle.path("reference/outputs.npy")
    assert len(hashed) == 0  # hashed once already, when the bundle was opened
    st = (b / "reference" / "outputs.npy").stat()
    os.utime(b / "reference" / "outputs.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new file version
    bundle.path("reference/outputs.npy")
    bundle.path("reference/outputs.npy")
    assert len(hashed) == 1


def test_a_listed_file_that_is_gone_is_a_one_line_error(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    (b / "reference" / "outputs.npy").unlink()
    with pytest.raises(EdgeconvError, match="is missing reference/outputs.npy listed in its manifest"):
        bundle_mod.read_bundle(b).path("reference/outputs.npy")
