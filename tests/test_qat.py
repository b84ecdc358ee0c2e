"""Quantization-aware training (`edgeconv train --qat`): a real chollet_mnist run fine-tuned with fake quantization,
its QDQ graph shipped as the bundle's INT8 graph, verified like any other."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeconv.exporting import ExportRequest, export_run
from edgeconv.training.qat import QAT_ONNX, WEIGHT_QMAX, WEIGHT_QMIN


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeconv", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, mnist_run):
    """The suite's 2-epoch chollet_mnist run, copied, then `edgeconv train --qat --from RUN --qat-epochs 1` (the CLI)."""
    run = tmp_path_factory.mktemp("qat") / "run"
    shutil.copytree(mnist_run, run)
    r = cli("train", "--qat", "--from", str(run), "--qat-epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qat: val_accuracy float" in r.stdout
    return run


@pytest.fixture(scope="module")
def qat_bundle(tmp_path_factory, qat_run):
    out = tmp_path_factory.mktemp("qat_bundle") / "bundle"
    export_run(ExportRequest(checkpoint=str(qat_run), out=str(out), precisions=("fp32", "int8"), calib_size=200))
    return out


def _int8_initializers(model) -> list:
    """The int8 weights: initializers a DequantizeLinear reads as its data (zero points are its third input)."""
    data = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name in data]


def _activation_scales(model) -> list:
    """The scale of every activation QuantizeLinear, in graph order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_qat_writes_its_graph_and_record(qat_run):
    m = json.loads((qat_run / "metrics.json").read_text())
    q = m["qat"]
    assert q["file"] == QAT_ONNX and (qat_run / QAT_ONNX).is_file()
    assert q["epochs"] == 1 and q["epochs_run"] == 1 and q["best_epoch"] in (0, 1)
    assert q["val_accuracy_float"] == pytest.approx(m["val_accuracy"]) and q["val_images"] == 500
    assert q["val_accuracy_int8"] > 0.9 and abs(q["val_accuracy_int8"] - q["val_accuracy_float"]) < 0.02  # the shipped graph, in ONNX Runtime
    assert q["fake_quant_top1_agreement"] >= 0.99 and q["fake_quant_agreement_images"] == 128  # it runs what training simulated
    assert q["quantizers"]["layers"] == 5  # 3 convs, 2 dense layers


def test_qat_graph_is_a_qdq_graph_onnx_runtime_runs_in_int8(qat_run, tmp_path):
    import onnxruntime as ort

    model = onnx.load(str(qat_run / QAT_ONNX))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    last = next(n for n in model.graph.node if "logits" in n.output)
    assert last.op_type == "Gemm"  # no QDQ on the output
    weights = _int8_initializers(model)
    assert len(weights) == 5 and all(WEIGHT_QMIN <= w.min() and w.max() <= WEIGHT_QMAX for w in weights)  # 7-bit: no AVX2 overflow
    assert any(w.min() == WEIGHT_QMIN or w.max() == WEIGHT_QMAX for w in weights)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(qat_run / QAT_ONNX), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 2 and "Conv" not in ops  # every layer on int8 kernels


def test_export_ships_the_qat_graph_not_a_calibration(qat_bundle, qat_run, mnist_bundle):
    m = json.loads((qat_bundle / "manifest.json").read_text())
    cal = m["calibration"]
    assert cal["method"] == "qat" and cal["source"].endswith(QAT_ONNX) and cal["weight_values"] == [WEIGHT_QMIN, WEIGHT_QMAX]
    int8 = onnx.load(str(qat_bundle / "model.int8.onnx"))
    qat = onnx.load(str(qat_run / QAT_ONNX))
    assert _activation_scales(int8) == _activation_scales(qat)  # the learned values, as trained
    calibrated = onnx.load(str(mnist_bundle / "model.int8.onnx"))  # the same weights' calibrated export
    assert json.loads((mnist_bundle / "manifest.json").read_text())["calibration"]["method"] != "qat"
    a, b = _activation_scales(int8), _activation_scales(calibrated)
    assert a and b and a[: min(len(a), len(b))] != b[: min(len(a), len(b))]
    assert len(set(a) - set(b)) >= len(set(a)) - 1  # learned, not calibrated (the [0, 1] input may give both 1/255)
    for f in ("model.int8.onnx", "model.int8.trt.onnx"):
        g = onnx.load(str(qat_bundle / f))
        assert all(WEIGHT_QMIN <= w.min() and w.max() <= WEIGHT_QMAX for w in _int8_initializers(g))
    trt = onnx.load(str(qat_bundle / "model.int8.trt.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in trt.graph.initializer}
    zps = [inits[n.input[2]] for n in trt.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric int8, zero points 0
    fp32 = next(a for a in m["artifacts"] if a["precision"] == "fp32")["parity"]["accuracy"]
    for art in m["artifacts"]:
        if art["precision"] == "int8":
            assert art["parity"]["accuracy"] >= fp32 - 0.01, art["file"]


def test_qat_bundle_verifies_on_its_reference_images(qat_bundle):
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "verify", str(qat_bundle), "--precision", "int8"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify OK" in r.stdout


def test_a_stale_qat_graph_is_not_shipped(qat_run, tmp_path):
    """qat.onnx trained from other weights than model.pt (the run was retrained): the export calibrates instead."""
    run = tmp_path / "run"
    shutil.copytree(qat_run, run)
    model = onnx.load(str(run / QAT_ONNX))
    meta = next(p for p in model.metadata_props if p.key == "edgeconv.qat")
    meta.value = json.dumps({**json.loads(meta.value), "checkpoint_weights_sha256": "0" * 64})
    onnx.save(model, str(run / QAT_ONNX))
    m = export_run(ExportRequest(checkpoint=str(run), out=str(tmp_path / "b"), precisions=("fp32", "int8"), calib_size=100))
    assert m.calibration["method"] == "auto"  # calibrated (the default ranges), not the stale QAT graph


def test_train_with_qat_runs_it_after_training(tmp_path):
    """`train(..., qat=True)`: training as usual, then QAT of its best checkpoint (on a seeded sample of 500 digits)."""
    from edgeconv.training import TrainConfig, train

    res = train(TrainConfig(data="mnist-5k", model="chollet_mnist", out=str(tmp_path / "run"), epochs=1, optimizer="adam", lr=2e-3, progress=False,
                            qat=True, qat_epochs=1, qat_images=500))
    q = json.loads((res.out / "metrics.json").read_text())["qat"]
    assert res.metrics["qat"]["file"] == QAT_ONNX and (res.out / QAT_ONNX).is_file()
    assert q["epochs_run"] == 1 and q["train_images_per_epoch"] == 500
    assert q["val_accuracy_float"] > 0.8 and q["val_accuracy_int8"] >= q["val_accuracy_float"] - 0.03


@pytest.mark.parametrize("args, message", [
    (["--qat", "--qat-epochs", "0", "--data", "mnist-5k", "--model", "chollet_mnist", "--out", "{tmp}/a"], "--qat-epochs must be at least 1"),
    (["--qat", "--qat-lr", "0", "--data", "mnist-5k", "--model", "chollet_mnist", "--out", "{tmp}/a"], "--qat-lr must be positive"),
    (["--from", "{run}"], "add --qat"),
    (["--qat", "--from", "{run}", "--data", "mnist-5k"], "drop --data"),
    (["--qat", "--from", "{run}", "--qat-epochs", "0"], "--qat-epochs must be at least 1"),
    (["--qat", "--from", "{run}", "--qat-images", "0"], "--qat-images must be at least 1"),
    (["--qat", "--from", "{tmp}/missing"], "checkpoint not found"),
])
def test_bad_qat_flags_are_one_line_errors(tmp_path, mnist_run, args, message):
    r = cli("train", *[a.format(tmp=tmp_path, run=mnist_run) for a in args], timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert not (tmp_path / "a").exists() and not (mnist_run / QAT_ONNX).exists()
