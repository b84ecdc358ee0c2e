"""The GPU review's fixes (issue 23 §2), each checked on a CPU.

- ONNX Runtime provider options by onnxruntime version, and nothing of a provider that fails to start on stdout;
- DLA builds refused before TensorRT is touched (dynamic profile, fp32, Q/DQ INT8 before TensorRT 10);
- `edgeconv export --opset 12 --precision int8` refused before anything is exported;
- INT8 through ORT's TensorRT provider also enables FP16, cuda-python's native handle, and nvidia-smi's row trusted
  for a CUDA_VISIBLE_DEVICES index only under CUDA_DEVICE_ORDER=PCI_BUS_ID.

Where a library's behaviour on other hardware or an older release is needed, the test says which part stands in for
it: an older onnxruntime's option parser (one option refused, as 1.16's CUDA provider refuses use_tf32) wraps the real
InferenceSession, whose own fallback and banner code then runs unchanged; nvidia-smi is a script printing a
recorded two-GPU answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from edgeconv_runtime import BackendUnavailable, EdgeconvError

ort = pytest.importorskip("onnxruntime")
from edgeconv_runtime.backends.ort import OrtBackend, provider_list, trt_provider_options  # noqa: E402
from test_backends import _tiny_onnx  # noqa: E402  the same one-Relu graph


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _options(providers: list, name: str) -> dict:
    return next(p[1] for p in providers if isinstance(p, tuple) and p[0] == name)


# ------------------------------------------------------------------------- 1. provider options by onnxruntime version
@pytest.mark.parametrize("version, cuda_missing, trt_missing", [
    ("1.16.3", {"use_tf32"}, {"trt_timing_cache_path"}),                 # JetPack 5 / Python 3.8 wheels
    ("1.17.1", {"use_tf32"}, set()),
    ("1.14.1", {"use_tf32"}, {"trt_timing_cache_path", "trt_timing_cache_enable", "trt_profile_min_shapes",
                              "trt_profile_opt_shapes", "trt_profile_max_shapes"}),
    ("1.18.0", set(), set()),
    ("1.22.0+cu126", set(), set()),
])
def test_provider_options_leave_out_what_the_installed_onnxruntime_lacks(monkeypatch, tmp_path, version, cuda_missing, trt_missing):
    # an option an older onnxruntime does not know makes it refuse the whole provider (then fall back to the CPU)
    monkeypatch.setattr(ort, "__version__", version)
    every_cuda = {"device_id", "use_tf32", "cudnn_conv_algo_search"}
    cuda = _options(provider_list("CUDAExecutionProvider"), "CUDAExecutionProvider")
    assert set(cuda) == every_cuda - cuda_missing
    omitted = []
    providers = provider_list("TensorrtExecutionProvider", "fp16", "input", (3, 32, 32), tmp_path, omitted=omitted)
    every_trt = set(trt_provider_options("fp16", "input", (3, 32, 32), tmp_path))
    assert set(_options(providers, "TensorrtExecutionProvider")) == every_trt - trt_missing
    assert set(_options(providers, "CUDAExecutionProvider")) == every_cuda - cuda_missing
    assert set(omitted) == cuda_missing | trt_missing  # said, not silent (OrtBackend.describe()["dropped_options"])
    assert provider_list("CPUExecutionProvider") == ["CPUExecutionProvider"]


class _OlderOptionParser:
    """Stands in for an onnxruntime build whose provider refuses the option ``refused`` (with onnxruntime's own message,
    provider_options_utils.h) or fails to start (``failure``). It wraps the installed session's provider check, which
    runs inside InferenceSession.__init__'s own try: its fallback and banner code then run as they would on a GPU."""

    def __init__(self, monkeypatch, refused: str = "", failure: str = "", honour_enable_fallback: bool = True):
        from onnxruntime.capi import onnxruntime_inference_collection as collection

        self.calls = []
        real_check = collection.check_and_normalize_provider_args
        parser = self

        def check(providers, provider_options, available_provider_names):
            parser.calls.append([p if isinstance(p, str) else (p[0], dict(p[1])) for p in providers or []])
            if refused and any(isinstance(p, tuple) and refused in p[1] for p in providers or []):
                raise RuntimeError(f'provider_options_utils.h:146 Parse Unknown provider option: "{refused}".')
            if failure and any((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider" for p in providers or []):
                raise RuntimeError(failure)
            return real_check(providers, provider_options, available_provider_names)

        monkeypatch.setattr(collection, "check_and_normalize_provider_args", check)
        if not honour_enable_fallback:  # releases before the enable_fallback keyword take it into **kwargs and ignore it
            real_init = ort.InferenceSession.__init__

            def init(session, *args, **kwargs):
                kwargs.pop("enable_fallback", None)
                real_init(session, *args, **kwargs)

            monkeypatch.setattr(ort.InferenceSession, "__init__", init)


def test_a_refused_option_is_dropped_and_retried_and_nothing_reaches_stdout(tmp_path, capfd, monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider: it would really start here")
    parser = _OlderOptionParser(monkeypatch, refused="use_tf32")
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.warns(UserWarning):  # onnxruntime's own: this CPU build has no CUDA provider
        with pytest.raises(BackendUnavailable) as exc:
            OrtBackend(str(model), provider="CUDAExecutionProvider")
    assert "CUDAExecutionProvider" in _one_line(exc)
    # onnxruntime's own fallback did not catch the refusal: our loop dropped the option and asked again
    assert len(parser.calls) == 2, parser.calls
    assert "use_tf32" in parser.calls[0][0][1] and "use_tf32" not in parser.calls[1][0][1]
    out, _ = capfd.readouterr()
    assert out == "", out  # stdout may carry --json output: no "EP Error ... Falling back" banner


def test_an_onnxruntime_that_falls_back_on_its_own_says_why_on_the_error_not_on_stdout(tmp_path, capfd, monkeypatch):
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the TensorRT provider: it would really start here")
    why = "TensorRT EP failed to create engine: libnvinfer.so.8: cannot open shared object file"
    _OlderOptionParser(monkeypatch, failure=why, honour_enable_fallback=False)
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(BackendUnavailable) as exc:
        OrtBackend(str(model), provider="TensorrtExecutionProvider", cache_dir=tmp_path / "cache")
    msg = _one_line(exc)
    assert "TensorrtExecutionProvider" in msg and "libnvinfer.so.8" in msg, msg  # the real reason, not a guess
    out, _ = capfd.readouterr()
    assert out == "", out


def test_verify_json_stays_json_on_an_onnxruntime_that_refuses_use_tf32(mnist_bundle):
    """JetPack 5's onnxruntime 1.16: its CUDA provider refuses ``use_tf32``. `auto` tries CUDA first (the status probe is
    told it is there), which must neither print onnxruntime's banner into --json output nor name a wrong reason."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider: it would really start here")
    script = textwrap.dedent(f"""
        import sys, warnings
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_inference_collection as collection
        from edgeconv_runtime.backends import ort as backends  # each ONNX Runtime backend's status() asks its ort_provider_status
        from edgeconv_runtime.cli import main

        warnings.simplefilter("ignore")
        ort.__version__ = "1.16.3"
        real_check, real_status = collection.check_and_normalize_provider_args, backends.ort_provider_status

        def check(providers, provider_options, available):
            if any(isinstance(p, tuple) and "use_tf32" in p[1] for p in providers or []):
                raise RuntimeError('provider_options_utils.h:146 Parse Unknown provider option: "use_tf32".')
            return real_check(providers, provider_options, available)

        collection.check_and_normalize_provider_args = check
        backends.ort_provider_status = lambda p: (True, "ok") if p == "CUDAExecutionProvider" else real_status(p)
        main(["verify", {str(mnist_bundle)!r}, "--json"])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)  # the whole of stdout: no "EP Error ... Falling back" lines around it
    assert report["ok"] is True and "cuda" not in report["backend"], report


def test_the_cpu_session_has_no_fallback_left_to_rerun_silently(tmp_path):
    be = OrtBackend(str(_tiny_onnx(tmp_path / "tiny.onnx")))
    assert be.session._enable_fallback is False  # a provider failing inside run() raises instead of rerunning on the CPU
    be.close()


# ------------------------------------------------------------------------------------------------ 2. DLA refusals
def test_dla_refuses_a_dynamic_profile_and_fp32_before_tensorrt():
    from edgeconv_runtime.engine import EngineOptions

    for opts, words in [(EngineOptions(("fp16",), (1, 8, 32), dla_core=0), "fixed batch"),
                        (EngineOptions(("fp32",), (4, 4, 4), dla_core=0), "fp16 and int8 only"),
                        (EngineOptions(("fp16", "fp32"), (4, 4, 4), dla_core=1, gpu_fallback=True), "fp16 and int8 only")]:
        with pytest.raises(EdgeconvError) as exc:
            opts.validate()
        assert words in _one_line(exc) and f"--dla-core {opts.dla_core}" in str(exc.value)
    EngineOptions(("fp16", "int8"), (4, 4, 4), dla_core=0).validate()  # what DLA can run passes
    EngineOptions(("fp32",), (1, 8, 32)).validate()  # and the GPU keeps its dynamic profile


def test_dla_refuses_qdq_int8_before_tensorrt_10():
    from edgeconv_runtime.engine import EngineOptions, build_serialized, dla_problem

    opts = EngineOptions(("int8",), (8, 8, 8), dla_core=0)
    assert "TensorRT 8.6.2" in dla_problem(opts, "int8", "8.6.2") and "\n" not in dla_problem(opts, "int8", "8.6.2")
    assert dla_problem(opts, "int8", "10.3.0") is None and dla_problem(opts, "fp16", "8.6.2") is None
    assert dla_problem(EngineOptions(("int8",), (1, 8, 32)), "int8", "8.6.2") is None  # no DLA: nothing to refuse
    # build_serialized refuses before its first TensorRT call: this stand-in has nothing but a version
    with pytest.raises(EdgeconvError) as exc:
        build_serialized(types.SimpleNamespace(__version__="8.6.2"), Path("model.int8.trt.onnx"), "int8", "input", (1, 28, 28), opts)
    assert "explicitly quantized" in _one_line(exc)


def test_build_engine_cli_refuses_dla_with_the_default_profile_in_one_line(tmp_path):
    # before the bundle is read or TensorRT imported: the default --batch 1,8,32 and --precision fp32 are both wrong for DLA
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "build-engine", str(tmp_path / "no-bundle"), "--dla-core", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dla-core 0" in lines[0] and "--batch N,N,N" in lines[0], r.stderr


# ------------------------------------------------------------------------------------------- 3. INT8 needs opset 13
def test_export_options_refuse_int8_below_opset_13():
    from edgeconv_export.bundle import ExportOptions

    with pytest.raises(EdgeconvError) as exc:
        ExportOptions(precisions=("fp32", "int8"), opset=12).validate()
    assert "--opset 12" in _one_line(exc) and "13" in str(exc.value)
    ExportOptions(precisions=("fp32", "int8"), opset=13).validate()
    ExportOptions(precisions=("fp32", "fp16"), opset=12).validate()  # float graphs still export at 12


def test_edgeconv_export_opset_12_int8_is_refused_before_the_checkpoint_is_read(tmp_path):
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from edgeconv.cli import cli

    r = CliRunner().invoke(cli, ["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "b"), "--opset", "12",
                                 "--precision", "int8"])
    assert r.exit_code != 0
    text = r.output.strip()
    assert len(text.splitlines()) == 1 and "--opset 12" in text and "opset 13" in text, text
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------- 4. smaller ones
def test_int8_through_the_tensorrt_provider_also_enables_fp16(tmp_path):
    opts = trt_provider_options("int8", "input", (3, 32, 32), tmp_path)
    assert opts["trt_int8_enable"] is True and opts["trt_fp16_enable"] is True  # float layers in FP16, not FP32
    assert trt_provider_options("fp32", "input", (3, 32, 32), tmp_path)["trt_fp16_enable"] is False


def test_stream_address_from_cuda_bindings_utils_where_it_exists(monkeypatch):
    from edgeconv_runtime.backends import trt

    # without cuda.bindings.utils (this machine, or cuda-python < 12.9.1): int(), as before
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)
    assert trt.native_handle_getter() is int
    # cuda-bindings 12.9.1 / 13.0: get_cuda_native_handle, which replaces the deprecated int(obj)
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: 0x7F00
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    assert trt.native_handle_getter() is utils.get_cuda_native_handle


# `nvidia-smi --query-gpu=compute_cap,compute_mode,driver_version,name,index --format=csv`
# (triton-inference-server/server pull request #8070): nvidia-smi's index 0 is the TITAN V, in PCI bus order
SMI_TWO_GPUS = """compute_cap, compute_mode, driver_version, name, index
7.0, Default, 570.86.15, NVIDIA TITAN V, 0
8.9, Default, 570.86.15, NVIDIA RTX 5880 Ada Generation, 1
"""


@pytest.fixture
def smi_only(tmp_path, monkeypatch):
    """gpu_info() on its nvidia-smi path: the CUDA driver cannot be loaded, nvidia-smi answers with SMI_TWO_GPUS."""
    from edgeconv_runtime import gpu

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI_TWO_GPUS}EOF\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def no_driver():
        raise gpu.CudaUnavailable("the CUDA driver library could not be loaded")

    monkeypatch.setattr(gpu, "query_cuda", no_driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    gpu.gpu_info.cache_clear()
    yield gpu.gpu_info
    gpu.gpu_info.cache_clear()


@pytest.mark.parametrize("visible, order, name", [
    ("1", None, None),          # FASTEST_FIRST (CUDA's default): index 1 is not nvidia-smi's row 1
    (None, None, None),         # nor is CUDA's ordinal 0 nvidia-smi's first row
    ("1", "PCI_BUS_ID", "NVIDIA RTX 5880 Ada Generation"),
    (None, "PCI_BUS_ID", "NVIDIA TITAN V"),
    ("0", "pci_bus_id", "NVIDIA TITAN V"),
])
def test_nvidia_smi_index_trusted_only_in_pci_bus_order(smi_only, monkeypatch, visible, order, name):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if order is not None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    info = smi_only()
    assert info is not None and info["source"] == "nvidia-smi"  # a GPU is there either way
    assert info["name"] == name
    assert info["compute_capability"] == {None: None, "NVIDIA TITAN V": "7.0", "NVIDIA RTX 5880 Ada Generation": "8.9"}[name]
    assert info["driver"] == "570.86.15"  # one driver for every GPU


def test_nvidia_smi_rows_alike_or_past_the_end(monkeypatch):
    from edgeconv_runtime.gpu import parse_smi_csv, smi_row_for_cuda

    alike = parse_smi_csv("name, compute_cap, index\nNVIDIA A100, 8.0, 0\nNVIDIA A100, 8.0, 1\n")
    assert smi_row_for_cuda(alike, "1", None)["name"] == "NVIDIA A100"  # whichever CUDA takes, it is an A100
    assert smi_row_for_cuda(alike, "2", None) is None  # past the last GPU in any order
    two = parse_smi_csv(SMI_TWO_GPUS)
    assert smi_row_for_cuda(two, "7", None) is None
    assert smi_row_for_cuda(two, "bogus", None) is None
