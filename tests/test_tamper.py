"""Issue 24 §3: a bundle that cannot be changed without `verify` and `Model.load` noticing.

Each case is an attack that passed `verify` (and predicted) before: it is made on a copy of a real exported bundle,
and every command that opens bundles (verify, predict, predict --source, serve, bench) and Model.load must refuse it
in one line, exit non-zero, no traceback. A careful attacker who knows the format re-computes the manifest's
digest (``edit_manifest(..., reseal=True)``): the value checks catch what they can, and only a signature by the
owner's key (``--public-key``) catches the rest.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.fileio import sha256_file
from bundle_helpers import copy_bundle, edit_manifest

RUNTIME = [sys.executable, "-m", "edgeconv_runtime"]
EDGECONV = [sys.executable, "-m", "edgeconv"]


def flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def refused(r, *words) -> str:
    """Exit non-zero with one `error: ...` line naming ``words``, no traceback."""
    err = r.stderr.strip()
    assert r.returncode not in (0, None), (r.returncode, r.stdout[-500:], err[-500:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err.startswith("error: ") and "\n" not in err, err[-1000:]
    for w in words:
        assert w in err, err
    return err


def load_refused(b: Path, *words, **kw) -> str:
    with pytest.raises(EdgeconvError) as info:
        Model.load(b, **kw)
    text = str(info.value)
    assert "\n" not in text
    for w in words:
        assert w in text, text
    return text


@pytest.fixture
def bundle(mnist_bundle, tmp_path) -> Path:
    """A fresh copy of the session's real chollet_mnist bundle (FP32, FP16, INT8 and INT8 for TensorRT)."""
    return copy_bundle(mnist_bundle, tmp_path / "b")


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Two key pairs written by `edgeconv-runtime keygen`: the owner's and someone else's."""
    pytest.importorskip("cryptography", reason="signing needs the [sign] extra (pip install 'edgeconv-runtime[sign]')")
    d = tmp_path_factory.mktemp("keys")
    for name in ("owner", "other"):
        r = run([*RUNTIME, "keygen", str(d / name)])
        assert r.returncode == 0, r.stderr
    return d


# ---------------------------------------------------------------------------------------------- the manifest
def test_renamed_classes_are_refused(bundle):
    """The class names are sealed by the manifest digest: a rename (same count, so the graph still fits) is refused."""
    assert Model.load(bundle).verify()["ok"]
    edit_manifest(bundle, lambda m: m.update(classes=[f"x{c}" for c in m["classes"]]), reseal=False)
    load_refused(bundle, "manifest.json in", "was changed after export")
    refused(run([*RUNTIME, "verify", str(bundle)]), "was changed after export", "manifest_sha256")
    refused(run([*RUNTIME, "predict", str(bundle), str(bundle / "reference/images/000.png")]), "was changed after export")


def test_a_manifest_without_its_files_map_is_refused(bundle):
    """Deleting `files` used to switch hashing off; now it is refused, even with the digest re-computed."""
    edit_manifest(bundle, lambda m: m.pop("files"))
    load_refused(bundle, "has no 'files' map")
    refused(run([*RUNTIME, "verify", str(bundle)]), "no 'files' map", "re-export")


@pytest.mark.parametrize("change", [
    pytest.param(lambda p: p.update(size=[32, 32]), id="resize-size"),
    pytest.param(lambda p: p.update(interpolation="bicubic"), id="interpolation"),
    pytest.param(lambda p: p.update(jpeg_draft=not p["jpeg_draft"]), id="jpeg_draft"),
])
def test_changed_preprocessing_is_refused(bundle, change):
    """Legal values, changed by hand: only the digest can tell, and it does."""
    edit_manifest(bundle, lambda m: change(m["preprocess"]), reseal=False)
    load_refused(bundle, "was changed after export")
    refused(run([*RUNTIME, "verify", str(bundle)]), "was changed after export")


@pytest.mark.parametrize("change, words", [
    (lambda p: p.update(interpolation="lanczos9"), ["interpolation 'lanczos9' is not one of bilinear, bicubic"]),
    (lambda p: p.update(std=[0]), ["std [0] has a value <= 0"]),
    (lambda p: p.update(std=[-1.0]), ["std"]),
    (lambda p: p.update(mean=[float("nan")]), ["mean"]),
    (lambda p: p.update(scale=float("inf")), ["scale"]),
    (lambda p: p.update(size=[28, 1_000_000]), ["size [28, 1000000] is not [height, width] of 1 to 8192 pixels"]),
    (lambda p: p.update(size=[0, 28]), ["size"]),
    (lambda p: p.update(crop_pct=0), ["crop_pct"]),
    (lambda p: p.update(resize="stretchy"), ["resize"]),
    (lambda p: p.update(jpeg_draft="yes"), ["jpeg_draft"]),
    (lambda p: p.update(channel_order="BGR"), ["channel_order"]),
])
def test_out_of_range_preprocessing_is_refused_even_resealed(bundle, change, words):
    """Values no training writes (std 0 made every input NaN and `predict` print nan) are refused by value, digest or not."""
    edit_manifest(bundle, lambda m: change(m["preprocess"]))
    load_refused(bundle, "invalid 'preprocess' record", *words)
    r = run([*RUNTIME, "predict", str(bundle), str(bundle / "reference/images/000.png")])
    refused(r, "invalid 'preprocess' record", *words)
    assert r.stdout == ""  # no prediction, so no `nan`


def test_duplicate_class_names_are_refused(bundle):
    edit_manifest(bundle, lambda m: m["classes"].__setitem__(1, m["classes"][0]))
    load_refused(bundle, "twice")


def test_a_bundle_written_before_the_digest_is_refused_with_reexport(bundle):
    edit_manifest(bundle, lambda m: m.pop("manifest_sha256"), reseal=False)
    load_refused(bundle, "has no manifest_sha256", "re-export")
    refused(run([*RUNTIME, "verify", str(bundle)]), "older edgeconv", "re-export it with `edgeconv export`")


def test_the_manifest_as_a_symlink_outside_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(bundle / "manifest.json", outside)
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(outside)
    load_refused(bundle, "manifest.json in", "is a symlink")
    refused(run([*RUNTIME, "verify", str(bundle)]), "manifest.json in", "symlink")


# ---------------------------------------------------------------------------------------------- the files
def test_a_flipped_byte_in_the_reference_labels_is_refused(bundle):
    """verify never read labels.npy, so its hash was never checked; every listed file is checked at open now."""
    flip_byte(bundle / "reference" / "labels.npy")
    load_refused(bundle, "reference/labels.npy in", "does not match its sha256")
    refused(run([*RUNTIME, "verify", str(bundle)]), "reference/labels.npy", "does not match its sha256")


def test_a_flipped_byte_in_the_int8_graph_fails_plain_verify(bundle):
    """Plain verify runs FP32, so the INT8 file was never hashed; every artifact is checked at open now."""
    flip_byte(bundle / "model.int8.onnx")
    load_refused(bundle, "model.int8.onnx in", "does not match its sha256")
    refused(run([*RUNTIME, "verify", str(bundle)]), "model.int8.onnx", "does not match its sha256")


def test_a_flipped_byte_in_the_tensorrt_int8_graph_fails_int8_verify(bundle):
    """model.int8.trt.onnx is for TensorRT only; `verify --precision int8` on a CPU never hashed it."""
    assert (bundle / "model.int8.trt.onnx").is_file()
    flip_byte(bundle / "model.int8.trt.onnx", at=len((bundle / "model.int8.trt.onnx").read_bytes()) // 2)
    load_refused(bundle, "model.int8.trt.onnx in", "does not match its sha256", precision="int8")
    refused(run([*RUNTIME, "verify", str(bundle), "--precision", "int8"]), "model.int8.trt.onnx", "does not match its sha256")


def _to_external_data(bundle: Path, rel: str, data_name: str) -> None:
    """Re-save ``rel`` with its weights in ``data_name`` (ONNX external data) and record the graph's new sha256
    in the manifest, leaving ``data_name`` out of it: the attack of a careful editor."""
    import onnx

    model = onnx.load(str(bundle / rel))
    onnx.save_model(model, str(bundle / rel), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=0)

    def record(m):
        a = next(a for a in m["artifacts"] if a["file"] == rel)
        a["sha256"], a["bytes"] = sha256_file(bundle / rel), (bundle / rel).stat().st_size

    edit_manifest(bundle, record)


def test_an_unlisted_external_data_file_is_refused(bundle):
    """The FP16 graph's weights moved to weights.bin, which no sha256 covers, then multiplied by -3: refused at open,
    whatever precision is asked."""
    _to_external_data(bundle, "model.fp16.onnx", "weights.bin")
    w = np.fromfile(bundle / "weights.bin", dtype=np.float16)
    (w * np.float16(-3)).tofile(bundle / "weights.bin")
    load_refused(bundle, "weights.bin in", "not listed in its manifest.json")
    load_refused(bundle, "weights.bin", precision="fp16")
    refused(run([*RUNTIME, "verify", str(bundle)]), "weights.bin", "not listed")
    refused(run([*RUNTIME, "predict", str(bundle), "--precision", "fp16", str(bundle / "reference/images/000.png")]), "weights.bin")


def test_an_unlisted_file_anywhere_in_the_bundle_is_refused(bundle):
    (bundle / "reference" / "extra.npy").write_bytes(b"\0" * 16)
    load_refused(bundle, "reference/extra.npy", "not listed")
    (bundle / "reference" / "extra.npy").unlink()
    (bundle / ".hidden.bin").write_bytes(b"\0")
    load_refused(bundle, ".hidden.bin", "not listed")
    (bundle / ".hidden.bin").unlink()
    (bundle / "MODEL_CARD.md").write_text("edited for people")  # documents beside the bundle are never read by the runtime
    (bundle / ".trt_cache").mkdir(exist_ok=True)  # ONNX Runtime's TensorRT cache: written by the runtime itself
    (bundle / ".trt_cache" / "x.engine").write_bytes(b"x")
    assert Model.load(bundle).verify()["ok"]


def test_a_fifo_in_place_of_a_reference_image_is_refused_at_once(bundle):
    """A FIFO made verify hang in open(); now it is seen with lstat and refused before anything opens it."""
    img = bundle / "reference" / "images" / "000.png"
    img.unlink()
    os.mkfifo(img)
    t0 = time.perf_counter()
    load_refused(bundle, "reference/images/000.png in", "is a FIFO, not a regular file")
    r = run([*RUNTIME, "verify", str(bundle)], timeout=60)  # hung forever before
    refused(r, "reference/images/000.png", "FIFO")
    assert time.perf_counter() - t0 < 60


def test_a_symlinked_reference_file_is_refused(bundle):
    target = bundle / "reference" / "outputs.npy"
    link = bundle / "reference" / "inputs.npy"
    link.unlink()
    link.symlink_to(target)
    load_refused(bundle, "reference/inputs.npy in", "symlink")


def test_check_hash_off_still_refuses_symlinks_fifos_and_edits(bundle):
    """check_hash=False skips reading the bytes, nothing else: the manifest digest, the kinds of files and the list."""
    flip_byte(bundle / "model.int8.onnx")
    assert Model.load(bundle, check_hash=False).verify()["ok"]  # the bytes are not read: that is what the option is for
    os.mkfifo(bundle / "reference" / "fifo")
    load_refused(bundle, "reference/fifo", check_hash=False)


# ---------------------------------------------------------------------------------------------- every reader
@pytest.mark.parametrize("command", ["predict", "stream", "bench", "serve", "evaluate"])
def test_every_command_refuses_a_tampered_bundle(bundle, command):
    flip_byte(bundle / "model.int8.onnx")
    img = str(bundle / "reference" / "images" / "000.png")
    cmd = {"predict": ["predict", str(bundle), img],
           "stream": ["predict", str(bundle), "--source", str(bundle / "clip.avi")],
           "bench": ["bench", str(bundle), "--batch-sizes", "1", "--iterations", "2", "--warmup", "1"],
           "serve": ["serve", str(bundle), "--port", "0"],
           "evaluate": ["evaluate", str(bundle), str(bundle / "reference")]}[command]
    r = run([*RUNTIME, *cmd], timeout=60)  # serve started and served the altered bundle before (it is killed here)
    refused(r, "model.int8.onnx", "does not match its sha256")


# ---------------------------------------------------------------------------------------------- signatures
def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    assert stat.S_IMODE((keys / "owner.pem").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (keys / "owner.pem").read_bytes() and b"PUBLIC KEY" in (keys / "owner.pub.pem").read_bytes()
    r = run([*RUNTIME, "keygen", str(keys / "owner")])
    refused(r, "already exists", "--force")
    assert not [p for p in keys.iterdir() if p.name.endswith(".tmp")]


def test_a_signed_bundle_loads_only_with_its_owners_key(bundle, keys):
    from edgeconv_runtime.signing import sign_bundle

    owner, other = keys / "owner.pub.pem", keys / "other.pub.pem"
    load_refused(bundle, "is not signed (no manifest.sig)", public_key=owner)
    sign_bundle(bundle, keys / "owner.pem")
    assert Model.load(bundle, public_key=owner).verify()["ok"]
    r = run([*RUNTIME, "verify", str(bundle), "--public-key", str(owner)])
    assert r.returncode == 0, r.stderr
    load_refused(bundle, "not by the trusted key", public_key=other)
    refused(run([*RUNTIME, "verify", str(bundle), "--public-key", str(other)]), "not by the trusted key")
    refused(run([*RUNTIME, "predict", str(bundle), str(bundle / "reference/images/000.png"), "--public-key", str(other)]),
            "not by the trusted key")
    refused(run([*RUNTIME, "serve", str(bundle), "--port", "0", "--public-key", str(other)], timeout=60), "not by the trusted key")
    refused(run([*RUNTIME, "bench", str(bundle), "--batch-sizes", "1", "--iterations", "2", "--public-key", str(other)]),
            "not by the trusted key")
    refused(run([*RUNTIME, "predict", str(bundle), "--source", str(bundle / "clip.avi"), "--public-key", str(other)]),
            "not by the trusted key")


def test_a_resealed_edit_is_caught_by_the_signature(bundle, keys):
    """An attacker who re-computes every sha256 and the digest passes the other checks; the owner's signature does not follow."""
    from edgeconv_runtime.signing import sign_bundle

    sign_bundle(bundle, keys / "owner.pem")
    edit_manifest(bundle, lambda m: m.update(classes=list(reversed(m["classes"]))))  # a consistent, re-sealed manifest
    Model.load(bundle)  # without a key, a careful edit is a valid bundle
    load_refused(bundle, "signs another manifest", public_key=keys / "owner.pub.pem")
    refused(run([*RUNTIME, "verify", str(bundle), "--public-key", str(keys / "owner.pub.pem")]), "signs another manifest")
    # a forged signature file that claims the new digest
    sig = json.loads((bundle / "manifest.sig").read_text())
    sig["manifest_sha256"] = json.loads((bundle / "manifest.json").read_text())["manifest_sha256"]
    (bundle / "manifest.sig").write_text(json.dumps(sig))
    load_refused(bundle, "is not a valid signature by key", public_key=keys / "owner.pub.pem")


def test_key_errors_are_one_line(bundle, keys, tmp_path):
    load_refused(bundle, "public key", "not found", public_key=tmp_path / "nope.pem")
    load_refused(bundle, "not a PEM public key", "NAME.pub.pem", public_key=keys / "owner.pem")
    refused(run([*RUNTIME, "verify", str(bundle), "--public-key", str(tmp_path / "nope.pem")]), "public key", "not found")
    refused(run([*RUNTIME, "verify", str(bundle / "model.onnx"), "--public-key", str(keys / "owner.pub.pem")]), "not a bundle directory")
    os.mkfifo(bundle / "manifest.sig")
    load_refused(bundle, "manifest.sig in", "FIFO", public_key=keys / "owner.pub.pem")


# ---------------------------------------------------------------------------------------------- export
def _copy_run(mnist_run: Path, dst: Path) -> Path:
    shutil.copytree(mnist_run, dst, ignore=shutil.ignore_patterns("bundle", "qat.onnx"))
    return dst


def test_export_signs_with_sign_key(mnist_run, tmp_path, keys):
    out = tmp_path / "signed"
    r = run([*EDGECONV, "export", str(mnist_run), "--out", str(out), "--sign-key", str(keys / "owner.pem")], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "manifest.sig").is_file()
    r = run([*RUNTIME, "verify", str(out), "--public-key", str(keys / "owner.pub.pem")])
    assert r.returncode == 0 and "verify OK" in r.stdout, r.stderr
    refused(run([*RUNTIME, "verify", str(out), "--public-key", str(keys / "other.pub.pem")]), "not by the trusted key")
    # a bad key is refused before minutes of exporting
    refused(run([*EDGECONV, "export", str(mnist_run), "--out", str(tmp_path / "x"), "--sign-key", str(keys / "owner.pub.pem")]),
            "signing key", "not an unencrypted PEM private key")
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_checkpoint_without_weights_sha256(mnist_run, tmp_path):
    import torch

    run_dir = _copy_run(mnist_run, tmp_path / "run")
    ck = torch.load(run_dir / "model.pt", weights_only=True)
    del ck["weights_sha256"]
    last = [k for k, v in ck["state_dict"].items() if v.is_floating_point()][-1]
    ck["state_dict"][last] = ck["state_dict"][last] * -3  # tampered weights (the classifier's last tensor)
    torch.save(ck, run_dir / "model.pt")
    out = tmp_path / "b"
    refused(run([*EDGECONV, "export", str(run_dir), "--out", str(out)], timeout=300), "carries no weights_sha256", "--trust-unsigned")
    assert not out.exists()
    r = run([*EDGECONV, "export", str(run_dir), "--out", str(out), "--trust-unsigned"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "UNCHECKED WEIGHTS" in r.stderr and "--trust-unsigned" in r.stderr


# ---------------------------------------------------------------------------------------------- the verify cache
def _old(path: Path, seconds: float = 3.0) -> None:
    """Wait until ``path`` was last changed more than ``seconds`` ago (the cache keeps only such stamps)."""
    while time.time() - path.stat().st_ctime < seconds:
        time.sleep(0.2)


def test_a_restart_skips_hashing_only_for_files_unchanged_since(bundle, tmp_path, monkeypatch):
    """The cross-process cache of verified stamps: a restart does not hash 30 MB again, and a file changed since is
    hashed again (its ctime moved), even with its size and mtime put back."""
    from edgeconv_runtime import bundle as bundle_mod

    cache = tmp_path / "cache"
    monkeypatch.setenv(bundle_mod.VERIFY_CACHE_ENV, str(cache))
    _old(bundle / "model.int8.onnx")
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    bundle_mod._verified.clear()
    Model.load(bundle).close()
    assert "model.int8.onnx" in hashed and stat.S_IMODE(cache.stat().st_mode) == 0o700
    hashed.clear()
    bundle_mod._verified.clear()  # a new process
    Model.load(bundle).close()
    assert hashed == []
    st = (bundle / "model.int8.onnx").stat()
    flip_byte(bundle / "model.int8.onnx")
    os.utime(bundle / "model.int8.onnx", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime differs
    bundle_mod._verified.clear()
    load_refused(bundle, "model.int8.onnx in", "does not match its sha256")


def test_the_verify_cache_is_off_when_others_could_write_it(bundle, tmp_path, monkeypatch):
    from edgeconv_runtime import bundle as bundle_mod

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    monkeypatch.setenv(bundle_mod.VERIFY_CACHE_ENV, str(shared))
    assert bundle_mod.verify_cache_dir() is None  # anyone could vouch for a file there
    monkeypatch.setenv(bundle_mod.VERIFY_CACHE_ENV, "off")
    assert bundle_mod.verify_cache_dir() is None
    _old(bundle / "model.onnx")
    bundle_mod._verified.clear()
    Model.load(bundle).close()
    assert not list(shared.iterdir())


def test_import_signs_with_sign_key(rgb_bundle, catsdogs_tiny, tmp_path, keys):
    """`edgeconv import --sign-key`: an imported bundle is signed like an exported one."""
    out = tmp_path / "imported"
    labels = tmp_path / "labels.txt"
    labels.write_text("cats\ndogs\n")
    base = [*EDGECONV, "import", str(rgb_bundle / "model.onnx"), "--labels", str(labels), "--mean", "0,0,0", "--std", "1,1,1",
            "--val-data", str(catsdogs_tiny / "test"), "--val-size", "8", "--precision", "fp32"]
    refused(run([*base, "--out", str(tmp_path / "x"), "--sign-key", str(tmp_path / "missing.pem")]), "signing key", "not found")
    assert not (tmp_path / "x").exists()
    r = run([*base, "--out", str(out), "--sign-key", str(keys / "owner.pem")], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    Model.load(out, public_key=keys / "owner.pub.pem").close()
    load_refused(out, "not by the trusted key", public_key=keys / "other.pub.pem")


def test_without_cryptography_signing_is_one_line_and_the_rest_works(bundle, keys, tmp_path):
    """cryptography is optional (extra [sign]) and imported only when a key is used."""
    fake = tmp_path / "site"
    (fake / "cryptography").mkdir(parents=True)
    (fake / "cryptography" / "__init__.py").write_text("raise ImportError('cryptography is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))

    def run_env(*args):
        return subprocess.run([*RUNTIME, *args], capture_output=True, text=True, timeout=120, check=False, env=env)

    refused(run_env("keygen", str(tmp_path / "k")), "needs the cryptography package", "edgeconv-runtime[sign]")
    refused(run_env("verify", str(bundle), "--public-key", str(keys / "owner.pub.pem")), "needs the cryptography package")
    r = run_env("verify", str(bundle))
    assert r.returncode == 0 and "verify OK" in r.stdout, r.stderr
