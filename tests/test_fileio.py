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
