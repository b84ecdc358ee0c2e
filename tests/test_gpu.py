"""GPU path on a real NVIDIA GPU: ONNX Runtime's CUDA and TensorRT providers, engines built on the device.

Every test here carries the ``gpu`` mark: conftest skips them, with a reason, where no GPU is found.
On a GPU machine they run for real (nothing is faked) against the session's ``mnist_bundle``
(chollet_mnist exported FP32/FP16/INT8); anything that writes (engines, provider caches) works on a
copy so the shared bundle stays as exported. ``make gpu-check`` runs them with ``pytest -m gpu``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeconv_runtime import EdgeconvError, Model, available_backends
from edgeconv_runtime.bundle import read_bundle
from edgeconv_runtime.gpu import gpu_info
from edgeconv_runtime.manifest import ENGINE_FILES, INT8_TENSORRT_ONNX, MANIFEST_NAME, PRECISIONS, seal
from edgeconv_runtime.parity import TOLERANCES

pytestmark = pytest.mark.gpu

BUILD_TIMEOUT_S = 1200  # three small engines take seconds; a first build on a Jetson can take minutes


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _need_backend(name: str) -> None:
    ok, why = available_backends()[name]
    if not ok:
        pytest.skip(f"backend {name} is unavailable here: {why}")


def _need_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # a broken CUDA install raises OSError/RuntimeError, not only ImportError
        pytest.skip(f"tensorrt is not importable here ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    _need_backend("tensorrt")


def _build_engine(bundle: Path, precision: str) -> None:
    """The torch-free builder, exactly as a device user runs it."""
    cmd = [sys.executable, "-m", "edgeconv_runtime.cli", "build-engine", str(bundle), "--precision", precision]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert r.returncode == 0, f"build-engine {precision} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}"
    assert "Traceback" not in r.stderr


def _verify(bundle: Path, backend: str, precision: str, provider: str | None = None) -> dict:
    """verify() through ``backend``, asserting it (and ``provider``, for ONNX Runtime) really ran the graph."""
    with Model.load(bundle, backend=backend, precision=precision) as model:
        assert model.backend_name == backend
        if provider is not None:  # the provider really runs the graph: no silent fallback to the CPU
            assert model.backend.session.get_providers()[0] == provider, model.backend.session.get_providers()
        report = model.verify()
    assert report["ok"], f"{backend} {precision}: {report['problems']}"
    return report


# ---------------------------------------------------------------------------------- ONNX Runtime CUDA
@pytest.mark.parametrize("precision", PRECISIONS)
def test_onnxruntime_cuda_verifies_each_precision(mnist_bundle, precision):
    _verify(mnist_bundle, "onnxruntime-cuda", precision, provider="CUDAExecutionProvider")


def test_fp32_on_cuda_stays_within_the_fp32_tolerance_with_tf32_off(mnist_bundle):
    with Model.load(mnist_bundle, backend="onnxruntime-cuda", precision="fp32") as model:
        options = model.backend.session.get_provider_options().get("CUDAExecutionProvider", {})
        if "use_tf32" in options:  # onnxruntime >= 1.18 names the option; TF32 rounds FP32 convs to 10 mantissa bits
            assert options["use_tf32"] == "0", options
        report = model.verify()
    assert report["max_abs_diff"] <= TOLERANCES["fp32"]["max_abs_diff"], report
    assert report["top1_agreement"] == 1.0 and report["ok"], report


# ---------------------------------------------------------------------------------- ONNX Runtime TensorRT
@pytest.mark.parametrize("precision", PRECISIONS)
def test_onnxruntime_tensorrt_verifies_each_precision(mnist_bundle, tmp_path, precision):
    _need_backend("onnxruntime-tensorrt")
    bundle = _copy(mnist_bundle, tmp_path)  # the provider writes engine and timing caches
    with Model.load(bundle, backend="onnxruntime-tensorrt", precision=precision) as model:
        assert model.backend.session.get_providers()[0] == "TensorrtExecutionProvider", model.backend.session.get_providers()
        if precision == "int8":  # TensorRT refuses the CPU graph's uint8 activations: it gets the symmetric one
            assert Path(model.artifact).name == INT8_TENSORRT_ONNX, model.artifact
        report = model.verify()
    assert report["ok"], f"onnxruntime-tensorrt {precision}: {report['problems']}"


# ---------------------------------------------------------------------------------- native TensorRT engines
@pytest.mark.parametrize("precision", PRECISIONS)
def test_build_engine_on_the_device_then_tensorrt_verifies(mnist_bundle, tmp_path, precision):
    _need_tensorrt()
    import tensorrt as trt

    bundle = _copy(mnist_bundle, tmp_path)
    _build_engine(bundle, precision)
    b = read_bundle(bundle)
    assert b.has("tensorrt", precision), [a.file for a in b.manifest.artifacts]
    engine, _ = b.artifact("tensorrt", precision)
    assert engine.name == ENGINE_FILES[precision]
    side = json.loads(engine.with_suffix(".json").read_text())
    gpu = gpu_info()
    assert side["precision"] == precision and side["tensorrt_version"] == trt.__version__
    assert side["gpu_name"] == gpu["name"] and side["compute_capability"] == gpu["compute_capability"]
    report = _verify(bundle, "tensorrt", precision)
    assert report["n"] > 0


def _other_compute_capability(cc):
    if isinstance(cc, (list, tuple)):
        return type(cc)([1, 0])
    if isinstance(cc, int):
        return 10
    return "2.0" if str(cc) == "1.0" else "1.0"


def test_engine_for_another_gpu_is_refused_with_both_named(mnist_bundle, tmp_path):
    _need_tensorrt()
    bundle = _copy(mnist_bundle, tmp_path)
    _build_engine(bundle, "fp32")
    engine = bundle / ENGINE_FILES["fp32"]
    forged = {"gpu_name": "Forged GPU 1000", "compute_capability": None}
    sidecar = engine.with_suffix(".json")
    side = json.loads(sidecar.read_text())
    forged["compute_capability"] = _other_compute_capability(side["compute_capability"])
    side.update(forged)
    sidecar.write_text(json.dumps(side))
    # the manifest keeps the sidecar's record too: forge it there as well, so whichever the runtime reads says "another GPU"
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    for a in manifest["artifacts"]:
        if a["format"] == "tensorrt" and a["precision"] == "fp32" and "gpu_name" in (a.get("details") or {}):
            a["details"].update(forged)
    manifest["files"][sidecar.name] = hashlib.sha256(sidecar.read_bytes()).hexdigest()  # else its sha256 refuses it first
    (bundle / MANIFEST_NAME).write_text(json.dumps(seal(manifest), indent=2))  # re-sealed: a consistent manifest

    with pytest.raises(EdgeconvError) as exc:  # BackendUnavailable is one
        Model.load(bundle, backend="tensorrt", precision="fp32", check_hash=False)
    msg = str(exc.value)
    assert "\n" not in msg
    here = gpu_info()
    assert "Forged GPU 1000" in msg and here["name"] in msg, msg
    assert str(forged["compute_capability"]) in msg and str(here["compute_capability"]) in msg, msg
    # auto skips the refused engine (its reason recorded) and runs the next usable backend
    with Model.load(bundle, backend="auto", precision="fp32", check_hash=False) as model:
        assert model.backend_name not in ("tensorrt", "onnxruntime-cpu"), model.backend_name
        assert model.verify()["ok"]


# ---------------------------------------------------------------------------------- auto
def test_auto_on_a_gpu_machine_does_not_pick_the_cpu(mnist_bundle, tmp_path):
    bundle = _copy(mnist_bundle, tmp_path)  # auto may pick onnxruntime-tensorrt, which writes caches
    status = available_backends()
    with Model.load(bundle, backend="auto", precision="fp32") as model:
        assert model.backend_name != "onnxruntime-cpu", f"auto picked the CPU on a GPU machine; backends: {status}"
        assert model.verify()["ok"]


def test_an_engine_that_fails_its_gate_leaves_the_bundle_as_it_was(mnist_bundle, tmp_path):
    """Reference outputs shifted far beyond FP32's tolerance: the built engine cannot pass, nothing may change."""
    import hashlib

    import numpy as np

    _need_tensorrt()
    bundle = _copy(mnist_bundle, tmp_path)
    ref = bundle / "reference" / "outputs.npy"
    np.save(ref, np.load(ref) + 1.0)  # the same change for every class: top-1 holds, max|diff| = 1.0
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"]["reference/outputs.npy"] = hashlib.sha256(ref.read_bytes()).hexdigest()  # consistent, so the gate decides
    (bundle / MANIFEST_NAME).write_text(json.dumps(seal(manifest), indent=2))  # re-sealed: a consistent manifest
    digest = lambda: {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in sorted(bundle.rglob("*")) if p.is_file() and ".trt_cache" not in p.parts}
    before = digest()
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime.cli", "build-engine", str(bundle), "--precision", "fp32"],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert r.returncode == 2 and "disagrees with the bundle's reference outputs" in r.stderr, r.stderr
    assert digest() == before and not list(bundle.glob(".engines.*"))
