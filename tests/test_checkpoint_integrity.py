"""Checkpoint integrity: the weights' sha256 is stored at save and checked on load; every malformed model.pt is one line."""
import io
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from edgeconv_runtime.errors import EdgeconvError

from edgeconv import checkpoint as ckpt


@pytest.fixture
def model_pt(mnist_run, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(mnist_run / "model.pt", run / "model.pt")
    return run / "model.pt"


def tensor_data_offset(path: Path, member: str) -> tuple:
    """(offset in the file, size) of one tensor's raw bytes inside torch's zip container."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def one_line_error(fn) -> str:
    with pytest.raises(EdgeconvError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and text
    return text


def test_the_weights_hash_is_stored_and_checked(model_pt):
    ck = ckpt.load_checkpoint(model_pt)
    assert ck["weights_sha256"] == ckpt.weights_sha256(ck["state_dict"])
    model, _ = ckpt.model_from_checkpoint(ck)
    assert ckpt.weights_sha256({k: v for k, v in model.state_dict().items()}) == ck["weights_sha256"]


def test_a_flipped_byte_in_the_weights_is_refused_before_export(model_pt, tmp_path):
    offset, size = tensor_data_offset(model_pt, "data/4")  # a convolution's weights
    data = bytearray(model_pt.read_bytes())
    data[offset + size // 2] ^= 0x10
    model_pt.write_bytes(bytes(data))
    msg = one_line_error(lambda: ckpt.load_checkpoint(model_pt))
    assert "is corrupted: its weights do not match the sha256 stored in it" in msg
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "edgeconv", "export", str(model_pt.parent), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "is corrupted" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("cut", [0, 64, "half"])
def test_an_empty_or_truncated_checkpoint_is_one_line(model_pt, cut):
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    msg = one_line_error(lambda: ckpt.load_checkpoint(model_pt))
    assert "is not a readable edgeconv checkpoint" in msg


def _rewrite(model_pt: Path, fn, rehash: bool = True) -> None:
    ck = torch.load(model_pt, weights_only=True)
    fn(ck)
    if rehash and isinstance(ck.get("state_dict"), dict):
        ck["weights_sha256"] = ckpt.weights_sha256(ck["state_dict"])
    buf = io.BytesIO()
    torch.save(ck, buf)
    model_pt.write_bytes(buf.getvalue())


def test_a_state_dict_of_the_wrong_shape_is_one_line(model_pt):
    def widen(ck):
        key = next(k for k, v in ck["state_dict"].items() if v.ndim == 4)
        w = ck["state_dict"][key]
        ck["state_dict"][key] = torch.zeros(w.shape[0] + 1, *w.shape[1:])

    _rewrite(model_pt, widen)  # a consistent hash: only the shape check can catch it
    ck = ckpt.load_checkpoint(model_pt)
    msg = one_line_error(lambda: ckpt.model_from_checkpoint(ck))
    assert "checkpoint weights do not fit model 'chollet_mnist' with 10 classes" in msg and "size mismatch" in msg


@pytest.mark.parametrize("fn, message", [
    (lambda ck: ck.pop("state_dict"), "holds no weights"),
    (lambda ck: ck.update(state_dict={"w": [1, 2]}), "holds no weights"),
    (lambda ck: ck.pop("classes"), "no valid 'classes' field"),
    (lambda ck: ck.update(format="other"), "not an edgeconv checkpoint"),
])
def test_malformed_checkpoints_are_one_line(model_pt, fn, message):
    _rewrite(model_pt, fn, rehash=False)
    assert message in one_line_error(lambda: ckpt.load_checkpoint(model_pt))


def test_a_checkpoint_from_before_the_hash_still_loads(model_pt):
    _rewrite(model_pt, lambda ck: ck.pop("weights_sha256"), rehash=False)
    ckpt.model_from_checkpoint(ckpt.load_checkpoint(model_pt))
