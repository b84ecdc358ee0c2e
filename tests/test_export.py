import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from edgeconv.exporting import ExportRequest, export_run, parse_targets
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import sha256_file


def test_bundle_layout_and_manifest(mnist_bundle, mnist_run):
    names = {p.name for p in mnist_bundle.iterdir()}
    assert {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "manifest.json", "reference"} <= names
    m = json.loads((mnist_bundle / "manifest.json").read_text())
    assert m["format"] == "edgeconv.bundle" and m["version"] == 1
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["input"] == {"name": "input", "shape": ["batch", 1, 28, 28], "layout": "NCHW", "dtype": "float32"}
    assert m["preprocess"]["mean"] == [0.0] and m["preprocess"]["value_range"] == [0, 255]
    assert m["source"]["checkpoint_sha256"] == sha256_file(mnist_run / "model.pt")
    assert m["versions"]["onnxruntime"] and m["versions"]["torch"]
    assert m["calibration"]["images"] == 200 and m["calibration"]["method"] == "auto" and m["calibration"]["ranges_measured"][0] == "minmax"
    for a in m["artifacts"]:
        assert sha256_file(mnist_bundle / a["file"]) == a["sha256"]
        assert a["bytes"] == (mnist_bundle / a["file"]).stat().st_size
    assert {a["precision"] for a in m["artifacts"]} == {"fp32", "fp16", "int8"}
    ref = m["reference"]
    x = np.load(mnist_bundle / ref["inputs"])
    assert x.shape == (8, 1, 28, 28) and len(ref["images"]) == 8


def test_fp32_parity_on_real_validation_images(mnist_bundle):
    m = json.loads((mnist_bundle / "manifest.json").read_text())
    fp32 = next(a for a in m["artifacts"] if a["precision"] == "fp32")
    p = fp32["parity"]
    assert p["n"] == 500  # the checkpoint's validation split
    assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] <= 1e-4 and p["cosine_min"] > 0.99999
    for a in m["artifacts"]:
        assert a["parity"]["accuracy"] >= fp32["parity"]["accuracy"] - 0.01
        assert {"max_abs_diff", "cosine_mean", "top1_agreement", "accuracy"} <= set(a["parity"])


def test_onnx_files_are_plain_checked_and_self_describing(mnist_bundle):
    for f in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        model = onnx.load(str(mnist_bundle / f))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == ["input"]
        assert [o.name for o in model.graph.output] == ["logits"]
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "batch"
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["edgeconv.classes"])[3] == "3"
        assert json.loads(meta["edgeconv.preprocess"])["size"] == [28, 28]
    int8 = onnx.load(str(mnist_bundle / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    fp16 = onnx.load(str(mnist_bundle / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)


def test_exported_onnx_matches_pytorch_on_a_dynamic_batch(mnist_bundle, mnist_run):
    import onnxruntime as ort

    from edgeconv.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(mnist_run))
    x = np.load(mnist_bundle / "reference" / "inputs.npy")
    sess = ort.InferenceSession(str(mnist_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for bs in (1, 3, 8):
        got = sess.run(["logits"], {"input": x[:bs]})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x[:bs])).numpy()
        assert np.abs(got - want).max() < 1e-4


def test_refuses_existing_out_and_force_replaces_whole(mnist_run, mnist_bundle, tmp_path):
    out = tmp_path / "b"
    export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out)))
    with pytest.raises(EdgeconvError, match="already exists; pass --force"):
        export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out)))
    before = (out / "manifest.json").read_text()
    # a failing export (INT8 allowed to lose nothing at all, a gate it cannot pass) leaves the old bundle intact
    with pytest.raises(EdgeconvError, match="points below FP32"):
        export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out), precisions=("int8",), calib_size=10, max_accuracy_drop=-50, force=True))
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp directories left behind
    export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out), precisions=("fp16",), force=True))
    assert (out / "model.fp16.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # replaced whole: the old bundle is not kept aside


def test_bad_inputs_are_clear_errors(tmp_path, mnist_run):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(EdgeconvError, match="not a readable edgeconv checkpoint"):
        export_run(ExportRequest(checkpoint=str(junk), out=str(tmp_path / "o1")))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(EdgeconvError, match="not an edgeconv checkpoint"):
        export_run(ExportRequest(checkpoint=str(foreign), out=str(tmp_path / "o2")))
    with pytest.raises(EdgeconvError, match="unknown export target 'int4'"):
        parse_targets("onnx,int4")
    empty = tmp_path / "calib"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(EdgeconvError, match="holds no images"):
        export_run(ExportRequest(checkpoint=str(mnist_run), out=str(tmp_path / "o3"), precisions=("int8",), calib_data=str(empty)))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_cli_export_one_line_errors(tmp_path, mnist_run):
    def export(*args):
        return subprocess.run([sys.executable, "-m", "edgeconv", "export", *args], capture_output=True, text=True, timeout=300)

    r = export(str(mnist_run), "--out", str(tmp_path / "x"), "--precision", "fp64")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown export target 'fp64'" in r.stderr
    r = export(str(tmp_path / "missing"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("edgeconv_runtime.gpu", fromlist=["gpu_info"]).gpu_info() is not None, reason="checks the no-GPU path")
def test_tensorrt_without_gpu_is_a_one_line_error_and_writes_nothing(tmp_path, mnist_run):
    r = subprocess.run([sys.executable, "-m", "edgeconv", "export", str(mnist_run), "--out", str(tmp_path / "trt"), "--format", "tensorrt"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: no NVIDIA GPU found") and r.stderr.strip().count("\n") == 0
    assert "edgeconv-runtime[tensorrt" in r.stderr  # the runtime's builder names what to install
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_tensorrt_engines_build_and_run(tmp_path, mnist_run):
    from edgeconv_runtime import Model

    out = tmp_path / "trt"
    cache = tmp_path / "timing.cache"
    m = export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out), formats=("onnx", "tensorrt"), precisions=("fp32", "fp16", "int8"),
                                 calib_size=200, timing_cache=str(cache)))
    engines = [a for a in m.artifacts if a.format == "tensorrt"]
    assert {a.precision for a in engines} == {"fp32", "fp16", "int8"}
    assert cache.is_file() and cache.stat().st_size > 0
    for a in engines:
        side = json.loads((out / a.file).with_suffix(".json").read_text())
        assert side["gpu_name"] and side["tensorrt_version"] and side["profile"]["max"][0] == 32 and side["tf32"] is False
        model = Model.load(out, backend="tensorrt", precision=a.precision)
        assert model.verify()["ok"], a.precision
