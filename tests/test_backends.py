"""Runtime backends: provider options, silent CPU fallback, `auto` falling through, broken GPU installs, engine checks.

Everything here runs on a CPU. Where a GPU path is exercised it is through the real libraries that exist
without a GPU: ONNX Runtime (a CPU build silently drops a GPU provider, exactly as a GPU build does when
CUDA fails to load), cuda-python's error enums, and a `tensorrt` package on the path that raises at import
the way a broken install does. The GPU-marked test at the end runs only on a real GPU.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeconv_runtime import BackendUnavailable, EdgeconvError, Model, available_backends
from edgeconv_runtime import backends as backends_mod
from edgeconv_runtime.backends import ort as ort_mod
from edgeconv_runtime.backends import AUTO_ORDER, create_backend
from edgeconv_runtime.backends.ort import (
    DEFAULT_BATCH_PROFILE, OrtBackend, check_batch_profile, cuda_provider_options, default_trt_cache_dir, provider_list,
    trt_provider_options)
from edgeconv_runtime.backends.trt import _check, _host_array, _import_cudart, _import_tensorrt, check_engine_compatible, engine_mismatch
from edgeconv_runtime.bundle import read_bundle

GPU_BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---------------------------------------------------------------------------------- provider options
def test_cuda_provider_options_turn_tf32_off():
    opts = cuda_provider_options()
    assert opts["use_tf32"] == 0  # TF32 moves FP32 outputs ~1e-3 on Ampere/Hopper: outside the FP32 gate
    assert opts["device_id"] == 0 and opts["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda_provider_options(1, "EXHAUSTIVE")["device_id"] == 1
    with pytest.raises(EdgeconvError) as exc:
        cuda_provider_options(conv_algo_search="FASTEST")
    assert "HEURISTIC" in _one_line(exc)


@pytest.mark.parametrize("precision,fp16,int8", [("fp32", False, False), ("fp16", True, False), ("int8", True, True)])
def test_trt_provider_options_follow_precision_profile_and_cache(tmp_path, precision, fp16, int8):
    opts = trt_provider_options(precision, "input", (3, 224, 224), tmp_path, batch=(2, 8, 64), cache_key="model.onnx-abc")
    # onnxruntime reads TensorRT's booleans as "True"/"False": 1/0 would be refused at session creation
    assert opts["trt_fp16_enable"] is fp16 and opts["trt_int8_enable"] is int8
    assert opts["trt_engine_cache_enable"] is True and opts["trt_timing_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == str(tmp_path / "engines" / "model.onnx-abc")
    assert opts["trt_timing_cache_path"] == str(tmp_path / "timing")
    assert opts["trt_profile_min_shapes"] == "input:2x3x224x224"
    assert opts["trt_profile_opt_shapes"] == "input:8x3x224x224"
    assert opts["trt_profile_max_shapes"] == "input:64x3x224x224"
    assert opts["device_id"] == 0
    default = trt_provider_options(precision, "x", (1, 28, 28), tmp_path)
    assert [default[f"trt_profile_{k}_shapes"] for k in ("min", "opt", "max")] == [f"x:{b}x1x28x28" for b in DEFAULT_BATCH_PROFILE]
    assert DEFAULT_BATCH_PROFILE == (1, 8, 32)


def test_trt_provider_options_refuse_what_the_profile_format_cannot_say(tmp_path):
    for bad in [dict(input_name="in:put"), dict(input_name="a,b"), dict(input_name=""), dict(input_shape=(3, -1, 224)),
                dict(batch=(8, 4, 32)), dict(batch=(0, 1, 2)), dict(batch=(1, 2)), dict(precision="int4")]:
        kw = dict(precision="fp32", input_name="input", input_shape=(3, 224, 224), cache_dir=tmp_path)
        kw.update(bad)
        with pytest.raises(EdgeconvError) as exc:
            trt_provider_options(**kw)
        _one_line(exc)
    assert check_batch_profile(["1", "4", "4"]) == (1, 4, 4)


def test_provider_list_registers_cuda_between_tensorrt_and_cpu(tmp_path):
    assert provider_list("CPUExecutionProvider") == ["CPUExecutionProvider"]
    cuda = provider_list("CUDAExecutionProvider")
    assert [p[0] if isinstance(p, tuple) else p for p in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda[0][1]["use_tf32"] == 0
    trt = provider_list("TensorrtExecutionProvider", "fp16", "input", (3, 32, 32), tmp_path)
    assert [p[0] if isinstance(p, tuple) else p for p in trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1]["trt_fp16_enable"] is True and trt[1][1]["use_tf32"] == 0


def test_trt_cache_goes_into_the_bundle_or_the_user_cache(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert default_trt_cache_dir(bundle) == bundle / ".trt_cache" and (bundle / ".trt_cache").is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    unwritable = tmp_path / "a-file"  # a bundle root no folder can be made in (chmod does not stop root)
    unwritable.write_text("")
    assert default_trt_cache_dir(unwritable) == tmp_path / "xdg" / "edgeconv" / "trt"


# ---------------------------------------------------------------------------------- silent CPU fallback (real onnxruntime)
def _tiny_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_a_gpu_provider_that_does_not_start_is_reported_not_run_on_the_cpu(tmp_path, provider):
    import onnxruntime as ort

    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime build has {provider}: it would really start here")
    # onnxruntime drops a provider it cannot start and runs on without it: the backend must refuse that
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.warns(UserWarning):  # onnxruntime's own warning; the error below is what a user sees
        with pytest.raises(BackendUnavailable) as exc:
            OrtBackend(str(model), provider=provider, cache_dir=tmp_path / "cache")
    msg = _one_line(exc)
    assert provider in msg and "silently fell back" in msg and "install" in msg, msg
    if provider == "TensorrtExecutionProvider":  # the cache folders were made for the provider (per artifact content)
        engines = list((tmp_path / "cache" / "engines").iterdir())
        assert len(engines) == 1 and engines[0].name.startswith("tiny.onnx-")


def test_cpu_backend_closes_and_is_a_context_manager(tmp_path):
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    x = np.array([[[[-1, 2, -3, 4]] * 4]], dtype=np.float32)
    with create_backend("onnxruntime-cpu", str(model)) as be:
        assert np.array_equal(be.infer(x), np.maximum(x, 0))
    with pytest.raises(EdgeconvError, match="closed"):
        be.infer(x)
    be.close()  # twice is fine


# ---------------------------------------------------------------------------------- auto falls through
def test_auto_chooses_the_fastest_usable_backend_and_records_the_others(mnist_bundle):
    status = available_backends()
    if any(status[n][0] for n in GPU_BACKENDS):
        pytest.skip("a GPU backend is usable here; this checks the CPU-only order")
    assert AUTO_ORDER == ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    order = backends_mod.auto_order("fp32")
    expected = next(n for n in order if status[n][0])  # the fastest usable CPU backend (OpenVINO where it measured faster)
    model = Model.load(mnist_bundle)
    assert model.backend_name == expected
    skipped = model.info["skipped"]
    passed_over = list(order[: order.index(expected)])
    assert [s.split(":")[0] for s in skipped] == passed_over, skipped
    for name, line in zip(passed_over, skipped):
        assert line == f"{name}: {status[name][1]}"
    assert Model.load(mnist_bundle, backend="onnxruntime-cpu").info["skipped"] == []


def test_auto_skips_a_provider_that_fails_to_start_and_a_named_one_raises(mnist_bundle, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider: it would really start here")
    # The status probe is told the CUDA provider is there; the session then really fails to start it
    # (this onnxruntime build has none) and silently falls back to the CPU, as a GPU build does without CUDA.
    real = ort_mod.ort_provider_status  # each ONNX Runtime backend's status() asks it for its provider
    monkeypatch.setattr(ort_mod, "ort_provider_status",
                        lambda p: (True, "ok") if p == "CUDAExecutionProvider" else real(p))
    with pytest.warns(UserWarning):
        model = Model.load(mnist_bundle, precision="fp32")
    status = available_backends()
    assert model.backend_name == next(n for n in backends_mod.auto_order("fp32") if status[n][0] and n not in GPU_BACKENDS)
    cuda = [s for s in model.info["skipped"] if s.startswith("onnxruntime-cuda:")]
    assert len(cuda) == 1 and "silently fell back" in cuda[0], model.info["skipped"]
    assert model.verify()["ok"]
    with pytest.warns(UserWarning):
        with pytest.raises(BackendUnavailable) as exc:
            Model.load(mnist_bundle, backend="onnxruntime-cuda")
    assert "silently fell back" in _one_line(exc)


def test_named_backend_raises_its_own_reason(mnist_bundle):
    status = available_backends()
    for name in GPU_BACKENDS:
        if status[name][0]:
            continue
        with pytest.raises(BackendUnavailable) as exc:
            Model.load(mnist_bundle, backend=name)
        assert _one_line(exc) == f"backend {name} is unavailable here: {status[name][1]}"
    with pytest.raises(EdgeconvError, match="unknown backend"):
        Model.load(mnist_bundle, backend="openvino")


def test_model_is_a_context_manager_and_close_is_idempotent(mnist_bundle):
    image = read_bundle(mnist_bundle).path(read_bundle(mnist_bundle).manifest.reference["images"][0])  # a real digit
    with Model.load(mnist_bundle) as model:
        label = model.predict(str(image)).label
        x = model.preprocess_images([str(image)])
    assert label in model.classes
    with pytest.raises(EdgeconvError) as exc:
        model.run(x)
    assert "closed" in _one_line(exc)
    model.close()
    model.close()


# ---------------------------------------------------------------------------------- a broken GPU install
FAKE_TENSORRT = 'raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")\n'
FAKE_CUDA = 'raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")\n'


def _fake_packages(tmp_path: Path) -> dict:
    root = tmp_path / "fake-site"
    for name, body in (("tensorrt", FAKE_TENSORRT), ("cuda", FAKE_CUDA)):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_a_tensorrt_that_raises_at_import_marks_only_its_backend_unavailable(tmp_path, mnist_bundle):
    env = _fake_packages(tmp_path)
    script = textwrap.dedent("""
        import json, sys
        from edgeconv_runtime import Model
        from edgeconv_runtime.backends import trt
        mod, why = trt._import_tensorrt()
        cudart, cuda_why = trt._import_cudart()
        # the status logic once a GPU is found (gpu_info() finds none on this machine): the import failure is the reason
        ok, status_why = trt._status_with_gpu({"name": "GPU record given to the status logic", "compute_capability": "8.6"})
        model = Model.load(sys.argv[1])
        print(json.dumps({"module": mod is None, "why": why, "cuda_why": cuda_why, "ok": ok, "status_why": status_why,
                          "backend": model.backend_name, "verify": model.verify()["ok"], "skipped": model.info["skipped"]}))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(mnist_bundle)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["module"] is True
    assert "OSError" in out["why"] and "libnvinfer.so.10" in out["why"] and "installed but cannot load" in out["why"], out
    assert "RuntimeError" in out["cuda_why"] and "insufficient" in out["cuda_why"], out
    assert out["ok"] is False and out["status_why"] == out["why"]
    assert out["backend"] in ("onnxruntime-cpu", "openvino-cpu") and out["verify"] is True  # the first usable CPU one
    assert [s.split(":")[0] for s in out["skipped"]][: len(GPU_BACKENDS)] == list(GPU_BACKENDS)

    cli = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "backends"], capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr
    lines = {line.split()[0]: line for line in cli.stdout.strip().splitlines()}
    assert set(lines) == set(backends_mod.BACKENDS), cli.stdout
    assert lines["onnxruntime-cpu"].split()[1] == "yes"
    assert lines["tensorrt"].split()[1] == "no" and len(lines["tensorrt"].split()) > 2  # with its reason


def test_import_helpers_without_the_packages():
    mod, why = _import_tensorrt()
    assert (mod is None) == bool(why)
    if mod is None:
        assert "tensorrt" in why and "\n" not in why
    cudart, why = _import_cudart()
    assert (cudart is None) == bool(why)


# ---------------------------------------------------------------------------------- CUDA errors and engine checks
def test_cuda_errors_are_compared_and_named_as_the_samples_do():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    ok = cudart.cudaError_t.cudaSuccess
    assert _check((ok,), "x", cudart) is None
    assert _check((ok, 5), "x", cudart) == 5
    assert _check((ok, 1, 2), "x", cudart) == (1, 2)
    with pytest.raises(EdgeconvError) as exc:
        _check((cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMallocHost", cudart)
    msg = _one_line(exc)
    assert msg.startswith("cudaMallocHost failed with cudaErrorMemoryAllocation (2)") and "out of GPU memory" in msg, msg
    # a real call: without a GPU (or with too old a driver) CUDA says so, and the message names it
    try:
        count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount", cudart)
    except EdgeconvError as err:
        assert "cudaError" in str(err) and "\n" not in str(err)
    else:
        assert isinstance(count, int) and count >= 1
    with pytest.raises(TypeError):
        _check((0, 1), "x", cudart)  # a bare int is not a cudaError_t: a bug, not a user error


def test_pinned_host_view_is_writable_memory_at_that_address():
    raw = ctypes.create_string_buffer(64)
    view = _host_array(ctypes.addressof(raw), 64, np.float32)
    assert view.shape == (16,) and view.flags.writeable
    view[:4] = [1, 2, 3, 4]
    assert np.frombuffer(raw.raw, dtype=np.float32)[:4].tolist() == [1, 2, 3, 4]


def test_engine_mismatch_names_both_sides():
    side = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A100", "compute_capability": "8.0"}
    here = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    assert engine_mismatch(side, "10.3.0", {"name": "NVIDIA A100", "compute_capability": "8.0"}) is None
    assert engine_mismatch(side, "10.3.0", None) is None  # no GPU identity to compare: TensorRT itself checks at load
    msg = engine_mismatch(side, "10.7.0", here, "engine model.plan")
    assert "10.3.0" in msg and "10.7.0" in msg and "build-engine" in msg and "\n" not in msg
    msg = engine_mismatch(side, "10.3.0", here, "engine model.plan")
    assert "NVIDIA A100" in msg and "NVIDIA H100" in msg and "8.0" in msg and "9.0" in msg and "\n" not in msg


def test_check_engine_compatible_refuses_a_forged_or_unreadable_sidecar(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine: never deserialized by these checks")
    with pytest.raises(BackendUnavailable) as exc:
        check_engine_compatible(engine, "10.3.0")
    assert "no sidecar model.json" in _one_line(exc)
    sidecar = engine.with_suffix(".json")
    sidecar.write_text('{"tensorrt_version": "10.3.0", ')
    with pytest.raises(BackendUnavailable) as exc:
        check_engine_compatible(engine, "10.3.0")
    assert "not readable JSON" in _one_line(exc)
    sidecar.write_text("[1, 2]")
    with pytest.raises(BackendUnavailable) as exc:
        check_engine_compatible(engine, "10.3.0")
    _one_line(exc)
    sidecar.write_text(json.dumps({"tensorrt_version": "8.6.1", "gpu_name": "Orin", "compute_capability": "8.7"}))
    with pytest.raises(BackendUnavailable) as exc:
        check_engine_compatible(engine, "10.3.0")
    assert "8.6.1" in _one_line(exc) and "10.3.0" in str(exc.value)
    sidecar.write_text(json.dumps({"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}))
    if available_backends()["tensorrt"][0] is False:  # no GPU identity here: only the TensorRT version is compared
        assert check_engine_compatible(engine, "10.3.0")["gpu_name"] == "Orin"


# ---------------------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
def test_tensorrt_backend_pinned_buffers_profile_refusal_and_close(mnist_bundle, tmp_path):
    ok, why = available_backends()["tensorrt"]
    if not ok:
        pytest.skip(f"backend tensorrt is unavailable here: {why}")
    bundle = tmp_path / "bundle"
    shutil.copytree(mnist_bundle, bundle)
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "build-engine", str(bundle), "--precision", "fp32", "--batch", "1,2,4"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stderr or r.stdout)[-2000:]
    b = read_bundle(bundle)
    x = np.load(b.path(b.manifest.reference["inputs"])).astype(np.float32)
    with Model.load(bundle, backend="tensorrt", precision="fp32") as model:
        be = model.backend
        assert be.max_batch == 4
        full = model.run(x)  # more than MAX: run in slices through the same pinned buffers
        assert full.shape == (len(x), len(model.classes))
        host_in = be._buffers["in"][0]
        again = model.run(x[:3])
        assert np.allclose(again, full[:3], atol=1e-5) and be._buffers["in"][0] == host_in  # reused, not reallocated
        with pytest.raises(EdgeconvError) as exc:  # a shape outside the engine's profile: set_input_shape says False
            be.infer(np.zeros((1, x.shape[1], x.shape[2] + 1, x.shape[3]), np.float32))
        assert "refused input shape" in _one_line(exc)
    assert be.context is None and be.stream is None and not be._buffers
    model.close()
