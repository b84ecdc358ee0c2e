"""The export's gates and refusals (export/edgeconv_export/bundle.py), each decision tested at its edges: the options a
TensorRT profile accepts, the FP32 agreement check, the accuracy-drop budget (accuracy or top-1 agreement), the NaN gate,
the `verify`-on-the-reference-images gate, the files the manifest covers, and the one-line refusals. Quick (no export is
run; the real mnist bundle and its reference tensors are the material): `make mutants` runs these once per mutant."""
import os

import numpy as np
import pytest

from bundle_helpers import copy_bundle
from edgeconv_export.bundle import (ExportInputs, ExportOptions, _budget, _check_request, _drop_problem, _fp32_agrees, _gate,
                                    _gate_reference, _int8_refusal, covered_files)
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import read_manifest
from edgeconv_runtime.parity import parity_report
from edgeconv_runtime.preprocess import Preprocess


def _report(**kw) -> dict:
    return {"n": 8, "finite": True, "max_abs_diff": 0.0, "top1_agreement": 1.0, "cosine_min": 1.0, "accuracy": 1.0, **kw}


def _inputs(n_val=4, calib=None, **kw) -> ExportInputs:
    return ExportInputs(model=None, name="m", classes=["a", "b"], preprocess=Preprocess(size=(8, 8), channels=1, mean=(0.0,), std=(1.0,)),
                        val_x=np.zeros((n_val, 1, 8, 8), np.float32), val_y=np.zeros(n_val, np.int64), calib_x=calib, **kw)


@pytest.mark.parametrize("batch, ok", [((1, 8, 32), True), ((1, 1, 1), True), ((4, 4, 32), True), ((1, 32, 32), True),
                                       ((0, 8, 32), False), ((9, 8, 32), False), ((1, 33, 32), False)])
def test_the_tensorrt_profile_is_1_le_min_le_opt_le_max(batch, ok):
    opts = ExportOptions(batch_min=batch[0], batch_opt=batch[1], batch_max=batch[2])
    if ok:
        opts.validate()
    else:
        with pytest.raises(EdgeconvError, match="1 <= --batch-min <= --batch-opt <= --batch-max"):
            opts.validate()


@pytest.mark.parametrize("kw, message", [({"precisions": ("fp32", "fp8")}, "unknown precision 'fp8'"),
                                         ({"formats": ("onnx", "tflite")}, "unknown format 'tflite'"),
                                         ({"calibration_method": "mse"}, "unknown calibration method 'mse'")])
def test_unknown_options_are_refused_by_name(kw, message):
    with pytest.raises(EdgeconvError, match=message):
        ExportOptions(**kw).validate()
    with pytest.raises(EdgeconvError, match=message):  # and before anything is written
        _check_request(_inputs(), ExportOptions(**kw))
    ExportOptions(precisions=("fp32", "fp16", "int8"), formats=("onnx", "triton"), calibration_method="entropy").validate()


def test_fp32_agrees_only_with_every_top1_and_every_logit_within_1e_4():
    assert _fp32_agrees(_report(max_abs_diff=0.9e-4))
    assert not _fp32_agrees(_report(max_abs_diff=1.1e-4))
    assert not _fp32_agrees(_report(top1_agreement=0.99))
    assert not _fp32_agrees(_report(top1_agreement=0.99, max_abs_diff=1.1e-4))


def test_the_budget_is_accuracy_or_with_no_labels_top1_agreement():
    opts = ExportOptions(max_accuracy_drop=1.5, max_agreement_drop=4.0)
    assert _budget(_inputs(), opts) == (1.5, "accuracy", "--max-accuracy-drop")
    assert _budget(_inputs(labels_from_reference=True), opts) == (4.0, "top-1 agreement", "--max-agreement-drop")


def test_a_drop_exactly_at_the_budget_passes_and_just_past_it_is_named():
    budget = (1.0, "accuracy", "--max-accuracy-drop")
    at = _report(accuracy=0.99)
    assert _drop_problem("int8", at, 1.0, budget) is None and at["accuracy_drop_points"] == 1.0
    past = _report(accuracy=0.98)
    problem = _drop_problem("fp16", past, 0.995, budget)
    assert past["accuracy_drop_points"] == 1.5
    assert problem == "fp16 accuracy 98.00 % is 1.50 points below FP32 99.50 % (allowed 1.0 by --max-accuracy-drop)"
    gain = _report(accuracy=1.0)
    assert _drop_problem("int8", gain, 0.9, (0.0, "top-1 agreement", "--max-agreement-drop")) is None
    assert gain["accuracy_drop_points"] == -10.0
    assert "top-1 agreement" in _drop_problem("int8", _report(accuracy=0.5), 0.9, (0.0, "top-1 agreement", "--max-agreement-drop"))


def test_gate_refuses_nan_and_a_drifting_fp32_and_judges_the_rest_on_their_drop():
    with pytest.raises(EdgeconvError, match="fp16 model produced NaN/Inf"):
        _gate("fp16", _report(finite=False), 1.0, 1.0)
    with pytest.raises(EdgeconvError, match="fp32 model produced NaN/Inf"):
        _gate("fp32", _report(finite=False, accuracy=1.0), 1.0, 1.0)
    with pytest.raises(EdgeconvError, match=r"FP32 ONNX disagrees with TheSource: top-1 agreement 1.0000, max abs diff 2.00e-04 \(limits 1.0 and 1e-04\)"):
        _gate("fp32", _report(max_abs_diff=2e-4), None, 1.0, "TheSource")
    with pytest.raises(EdgeconvError, match="FP32 ONNX disagrees with PyTorch: top-1 agreement 0.8750"):
        _gate("fp32", _report(top1_agreement=0.875), None, 1.0)
    _gate("fp32", _report(max_abs_diff=5e-5, accuracy=0.1), None, 0.0)  # FP32 is the reference: no accuracy budget applies
    # a float budget is points of accuracy; a tuple names what it is points of
    with pytest.raises(EdgeconvError, match=r"int8 accuracy 97.00 % is 3.00 points below FP32 100.00 % \(allowed 2.0 by --max-accuracy-drop\); "
                                            r"calibrate on more images \(--calib-size\)"):
        _gate("int8", _report(accuracy=0.97), 1.0, 2.0)
    with pytest.raises(EdgeconvError) as e:
        _gate("fp16", _report(accuracy=0.97), 1.0, (2.5, "top-1 agreement", "--max-agreement-drop"))
    assert str(e.value) == "fp16 top-1 agreement 97.00 % is 3.00 points below FP32 100.00 % (allowed 2.5 by --max-agreement-drop)"
    _gate("int8", _report(accuracy=0.97), 1.0, (3.0, "top-1 agreement", "--max-agreement-drop"))
    _gate("fp16", _report(accuracy=0.97), 1.0, 3.0)


def test_gate_reference_holds_the_reference_images_to_verifys_limits(mnist_bundle):
    ref = np.load(mnist_bundle / "reference" / "outputs.npy").astype(np.float64)
    _gate_reference("fp16", parity_report(ref, ref + 1e-3))
    flipped = ref.copy()
    flipped[0] = flipped[0][::-1]  # one top-1 of 8 changes: 0.875 < FP16's 1.0
    with pytest.raises(EdgeconvError) as e:
        _gate_reference("fp16", parity_report(ref, flipped))
    assert str(e.value).startswith("fp16 would fail `verify` on the bundle's own 8 reference images (top-1 agreement 0.875 < 1.0")
    assert str(e.value).endswith("; export without it (--precision)")
    with pytest.raises(EdgeconvError, match=r"int8 would fail .*calibrate on more images \(--calib-size\) or try --calib-method"):
        _gate_reference("int8", parity_report(ref, np.where(np.arange(len(ref))[:, None] < 4, flipped, ref)))


def test_covered_files_are_every_file_but_the_artifacts_and_manifest(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    m = read_manifest(b)
    files = covered_files(b, m)
    # the manifest's own map, and the model card written beside it after the export (edgeconv export adds it)
    assert {k: files[k] for k in m.files} == m.files and set(files) - set(m.files) <= {"MODEL_CARD.md", "model_card.json", "curves.png"}
    assert "reference/outputs.npy" in files and "reference/images/000.png" in files
    assert not set(files) & ({a.file for a in m.artifacts} | {"manifest.json"})
    assert not any((b / f).is_dir() for f in files)
    (b / "extra.txt").write_text("x")
    assert covered_files(b, m)["extra.txt"] == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    os.symlink(b / "extra.txt", b / "reference" / "link.npy")
    with pytest.raises(EdgeconvError, match="holds reference/link.npy, which is not a regular file"):
        covered_files(b, m)


def test_check_request_puts_fp32_first_and_refuses_what_cannot_be_gated():
    assert _check_request(_inputs(), ExportOptions(precisions=("fp16", "fp32", "fp16"))) == ("fp32", "fp16")
    assert _check_request(_inputs(calib=np.zeros((2, 1, 8, 8), np.float32)), ExportOptions(precisions=("int8",))) == ("fp32", "int8")
    for calib in (None, np.zeros((0, 1, 8, 8), np.float32)):
        with pytest.raises(EdgeconvError, match="INT8 needs calibration images and none were found"):
            _check_request(_inputs(calib=calib), ExportOptions(precisions=("fp32", "int8")))
    with pytest.raises(EdgeconvError, match="no validation images to check parity on"):
        _check_request(_inputs(n_val=0), ExportOptions())
    assert _check_request(_inputs(n_val=1), ExportOptions()) == ("fp32",)


@pytest.mark.skipif(__import__("edgeconv_runtime.gpu", fromlist=["gpu_info"]).gpu_info() is not None, reason="checks the no-GPU path")
def test_check_request_asks_for_tensorrt_before_anything_with_the_tensorrt_format():
    with pytest.raises(EdgeconvError, match="no NVIDIA GPU found"):
        _check_request(_inputs(), ExportOptions(formats=("onnx", "tensorrt")))


def test_int8_refusal_names_the_graph_what_it_tried_and_the_way_out():
    first = {"problem": "accuracy 90 %", "nodes_tried": 0}
    assert _int8_refusal("model.int8.onnx", "cpu", first, ExportOptions(max_float_nodes=0)) == (
        "INT8 graph model.int8.onnx (cpu): accuracy 90 %; allow accuracy-aware INT8 (--max-float-nodes N), or export without int8")
    assert _int8_refusal("model.int8.onnx", "cpu", first, ExportOptions(max_float_nodes=1)).endswith(
        "; calibrate on more images (--calib-size), or export without int8")
    tried = {"problem": "p", "nodes_tried": 4, "tried": ["a", "b", "c", "d"], "best_problem": "q"}
    msg = _int8_refusal("g.onnx", "tensorrt", tried, ExportOptions())
    assert msg.startswith("INT8 graph g.onnx (tensorrt): p; kept 4 nodes in float (a, b, c, ...) and the best was still: q; allow more")
    three = dict(tried, tried=["a", "b", "c"], best_problem=None)
    assert "(a, b, c) and the best was still: unknown;" in _int8_refusal("g.onnx", "cpu", three, ExportOptions())
