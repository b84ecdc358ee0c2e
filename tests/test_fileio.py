"""Atomic writes create what they need and leave nothing half-written (torch-free: `make mutants` runs these once per
mutant of runtime/edgeconv_runtime/fileio.py)."""
import os

from edgeconv_runtime.fileio import atomic_write_bytes, atomic_write_json


def test_an_atomic_write_creates_missing_folders_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "state.json"
    atomic_write_json(target, {"epoch": 3})
    assert target.read_text() == '{\n  "epoch": 3\n}\n'
    atomic_write_bytes(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert os.listdir(target.parent) == ["state.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_atomic_directory_lands_in_a_folder_that_did_not_exist_with_the_umasks_mode(tmp_path):
    from edgeconv_runtime.fileio import atomic_directory

    final = tmp_path / "not" / "yet" / "bundle"
    with atomic_directory(final) as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
    assert (final / "model.onnx").read_bytes() == b"onnx"
    assert os.listdir(final.parent) == ["bundle"]  # no temp folder left beside it
    assert oct(final.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # a normal folder, not mkdtemp's 0700


def _bundle(path, text):
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)


def test_a_failed_atomic_directory_write_leaves_no_temp_folder_and_the_old_bundle_whole(tmp_path):
    import pytest

    from edgeconv_runtime.errors import EdgeconvError
    from edgeconv_runtime.fileio import atomic_directory

    final = tmp_path / "bundle"
    _bundle(final, "old")
    with pytest.raises(EdgeconvError, match="could not write .*No space left on device; free some disk space"):
        with atomic_directory(final, force=True) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == ["bundle"] and (final / "model.onnx").read_text() == "old"


def test_without_rename_exchange_a_failed_second_rename_puts_the_old_bundle_back(tmp_path, monkeypatch):
    import pytest

    from edgeconv_runtime import fileio
    from edgeconv_runtime.errors import EdgeconvError

    final = tmp_path / "bundle"
    _bundle(final, "old")
    monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the first rename (old bundle aside) works, the second (new one in place) fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(EdgeconvError, match="could not write .*Input/output error"):
        with fileio.atomic_directory(final, force=True) as tmp:
            (tmp / "model.onnx").write_text("new")
    assert (final / "model.onnx").read_text() == "old"
    assert os.listdir(tmp_path) == ["bundle"]
