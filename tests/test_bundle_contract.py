"""The runtime owns the bundle contract: typed manifest, safe paths, one parity table, the one engine builder."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.manifest import (INT8_TENSORRT_ONNX, MANIFEST_VERSION, Artifact, Manifest, read_manifest,
                                       resolve_inside)
from edgeconv_runtime.parity import TOLERANCES, parity_report, tolerance_problems
from bundle_helpers import copy_bundle, edit_manifest


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trips_and_is_typed(mnist_bundle):
    raw = json.loads((mnist_bundle / "manifest.json").read_text())
    m = read_manifest(mnist_bundle)
    assert isinstance(m, Manifest) and all(isinstance(a, Artifact) for a in m.artifacts)
    digest = raw.pop("manifest_sha256")
    assert m.to_dict() == raw  # nothing lost or invented on the way through the types
    assert m.digest == digest  # the seal is checked on the way in and written anew by write_manifest
    assert m.find("onnx", "int8").file == "model.int8.onnx"
    assert m.find("onnx", "int8", "tensorrt").file == INT8_TENSORRT_ONNX
    assert m.find("onnx", "fp16", "tensorrt") is None
    assert m.input_shape == (1, 28, 28)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("classes"), "no 'classes' field"),
    (lambda m: m.update(classes="0123"), "'classes' must be list"),
    (lambda m: m.update(classes=[]), "non-empty list of strings"),
    (lambda m: m["artifacts"][0].pop("sha256"), r"artifacts\[0\] has no 'sha256'"),
    (lambda m: m["artifacts"][0].update(bytes="12"), r"'bytes' must be int"),
    (lambda m: m["artifacts"][0].update(precision="fp64"), "precision 'fp64'"),
    (lambda m: m["artifacts"][0].update(file="../../etc/passwd"), "outside the bundle"),
    (lambda m: m["artifacts"][0].update(file="/etc/passwd"), "outside the bundle"),
    (lambda m: m["reference"].update(inputs="../inputs.npy"), "outside the bundle"),
    (lambda m: m.update(version=MANIFEST_VERSION + 1), "upgrade edgeconv-runtime"),
    (lambda m: m.update(format="something.else"), "not an edgeconv bundle manifest"),
    (lambda m: m["artifacts"].append(dict(m["artifacts"][0])), "lists two onnx"),
])
def test_malformed_manifests_are_one_line_errors(mnist_bundle, tmp_path, mutate, message):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, mutate)
    with pytest.raises(EdgeconvError, match=message) as info:
        Model.load(b)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_manifest_in_one_line(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    (b / "manifest.json").write_text("[" * 100000)  # nesting that would blow the recursion limit of a naive reader
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "verify", str(b)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_symlink_out_of_the_bundle_is_refused(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    outside = tmp_path / "outside.npy"
    shutil.copyfile(b / "reference" / "inputs.npy", outside)
    (b / "reference" / "inputs.npy").unlink()
    os.symlink(outside, b / "reference" / "inputs.npy")
    with pytest.raises(EdgeconvError, match="resolves outside the bundle"):
        Model.load(b).verify()
    assert resolve_inside(b, "reference/outputs.npy") == (b / "reference" / "outputs.npy").resolve()


# ---------------------------------------------------------------------------------------------- parity
def test_one_tolerance_table_serves_export_and_device(mnist_bundle):
    ref = np.array([[2.0, 1.0, 0.0]])
    for diff, export_ok, device_ok in ((5e-5, True, True), (5e-4, False, True), (5e-3, False, False)):
        r = parity_report(ref, ref + np.array([[diff, 0.0, 0.0]]))
        assert (not tolerance_problems(r, "fp32", at_export=True)) is export_ok, diff
        assert (not tolerance_problems(r, "fp32")) is device_ok, diff
    assert TOLERANCES["fp32"]["export_max_abs_diff"] < TOLERANCES["fp32"]["max_abs_diff"]
    report = Model.load(mnist_bundle).verify()
    assert report["tolerance"]["max_abs_diff"] == TOLERANCES["fp32"]["max_abs_diff"]
    manifest = json.loads((mnist_bundle / "manifest.json").read_text())
    assert manifest["parity"]["fp32_max_abs_limit"] == TOLERANCES["fp32"]["export_max_abs_diff"]


def test_verify_fails_on_a_drift_only_the_fp32_tolerance_catches(mnist_bundle, tmp_path):
    """Top-1 and cosine stay perfect; only the max-abs-diff limit can fail this bundle."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    out = np.load(b / "reference" / "outputs.npy")
    assert Model.load(b).verify()["ok"]
    np.save(b / "reference" / "outputs.npy", out + 3e-3)  # a constant shift: same argmax, cosine ~1
    digest = hashlib.sha256((b / "reference" / "outputs.npy").read_bytes()).hexdigest()
    edit_manifest(b, lambda m: m["files"].update({"reference/outputs.npy": digest}))  # a consistent bundle that drifts
    r = Model.load(b).verify()
    assert not r["ok"] and r["top1_agreement"] == 1.0 and r["cosine_min"] > TOLERANCES["fp32"]["cosine_min"]
    assert any(p.startswith("max abs diff") for p in r["problems"])


# ---------------------------------------------------------------------------------------------- build-engine
def run_build_engine(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", "build-engine", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.skipif(__import__("edgeconv_runtime.gpu", fromlist=["gpu_info"]).gpu_info() is not None, reason="checks the no-GPU path")
def test_build_engine_without_a_gpu_is_one_line_and_writes_nothing(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    before = tree_digest(b)
    r = run_build_engine(b, "--precision", "fp32,fp16,int8")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: no NVIDIA GPU found") and r.stderr.strip().count("\n") == 0
    assert tree_digest(b) == before and not list(b.glob(".engines.*"))


def test_build_engine_without_tensorrt_names_the_package(mnist_bundle, tmp_path):
    """A GPU that is present but no tensorrt module: checked with gpu_info answering for a GPU in a child process."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    before = tree_digest(b)
    fake = tmp_path / "site"
    (fake / "tensorrt").mkdir(parents=True)
    (fake / "tensorrt" / "__init__.py").write_text('raise OSError("libnvinfer.so.10: cannot open shared object file")\n')
    code = textwrap.dedent(f"""
        import sys
        import edgeconv_runtime.gpu as g
        g.gpu_info = lambda: {{"name": "H100", "compute_capability": "9.0"}}
        from edgeconv_runtime.cli import main
        main(["build-engine", {str(b)!r}, "--precision", "fp32"])
    """)
    for path, expected in ((None, "the tensorrt package is not installed"), (str(fake), "tensorrt is installed but cannot load (libnvinfer.so.10")):
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = path
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and expected in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert tree_digest(b) == before


@pytest.mark.parametrize("args, message", [
    (("--batch", "8,4,32"), "MIN,OPT,MAX"),
    (("--batch", "1,8"), "MIN,OPT,MAX"),
    (("--precision", "fp64"), "unknown precision 'fp64'"),
    (("--gpu-fallback",), "--gpu-fallback only applies with --dla-core"),
    (("--workspace-mb", "1"), "too small"),
])
def test_build_engine_option_errors(mnist_bundle, args, message):
    r = run_build_engine(mnist_bundle, *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_build_engine_needs_the_source_onnx_before_touching_tensorrt(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["precision"] != "fp16"]))
    (b / "model.fp16.onnx").unlink()  # an unlisted file would be refused as such
    r = run_build_engine(b, "--precision", "fp16")
    assert r.returncode == 2 and "has no fp16 ONNX model" in r.stderr, r.stderr


def test_fp32_on_ort_tensorrt_has_its_own_documented_limit():
    """TensorRT's provider cannot turn TF32 off: its FP32 gets 1e-2, every other device keeps 1e-3."""
    ref = np.array([[2.0, 1.0, 0.0]])
    r = parity_report(ref, ref + np.array([[5e-3, 0.0, 0.0]]))
    assert tolerance_problems(r, "fp32") and tolerance_problems(r, "fp32", backend="onnxruntime-cuda")
    assert not tolerance_problems(r, "fp32", backend="onnxruntime-tensorrt")
    flipped = parity_report(ref, np.array([[1.0, 2.0, 0.0]]))  # top-1 stays strict there
    assert tolerance_problems(flipped, "fp32", backend="onnxruntime-tensorrt")
