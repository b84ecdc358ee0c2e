"""The one tolerance table and the parity report, figure by figure and limit by limit (torch-free, quick: `make mutants`
runs these once per mutant of runtime/edgeconv_runtime/parity.py)."""
import numpy as np
import pytest

from edgeconv_runtime.parity import TOLERANCES, device_tolerance, parity_report, tolerance_problems


def test_parity_report_figures_are_exact():
    ref = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    cand = np.array([[4.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    r = parity_report(ref, cand, labels=np.array([0, 0]))
    assert r == pytest.approx({"n": 2, "finite": True, "max_abs_diff": 1.0, "mean_abs_diff": 1 / 3, "cosine_min": 24 / 25,
                               "cosine_mean": (24 / 25 + 1) / 2, "top1_agreement": 0.5, "accuracy": 1.0, "reference_accuracy": 0.5})
    broken = parity_report(ref, np.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert not broken["finite"] and broken["max_abs_diff"] == broken["mean_abs_diff"] == float("inf")
    assert broken["cosine_min"] == broken["cosine_mean"] == 0.0
    assert tolerance_problems(broken, "fp16") == ["outputs contain NaN/Inf"]
    with pytest.raises(ValueError, match="differ in shape"):
        parity_report(ref, cand[:1])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_each_limit_passes_at_its_value_and_fails_beyond_it(precision):
    tol = TOLERANCES[precision]
    at = {"finite": True, "max_abs_diff": tol["max_abs_diff"] or 0.0, "top1_agreement": tol["top1_agreement"], "cosine_min": tol["cosine_min"]}
    assert tolerance_problems(dict(at), precision) == []
    assert tolerance_problems(dict(at, top1_agreement=tol["top1_agreement"] - 0.01), precision)[0].startswith("top-1 agreement")
    assert tolerance_problems(dict(at, cosine_min=tol["cosine_min"] - 1e-6), precision)[0].startswith("min cosine")
    if tol["max_abs_diff"] is not None:
        assert tolerance_problems(dict(at, max_abs_diff=tol["max_abs_diff"] * 1.01), precision)[0].startswith("max abs diff")
        assert tolerance_problems(dict(at, max_abs_diff=tol["export_max_abs_diff"]), precision, at_export=True) == []
        assert tolerance_problems(dict(at, max_abs_diff=tol["export_max_abs_diff"] * 1.01), precision, at_export=True)


def test_the_tensorrt_provider_alone_gets_its_fp32_limit():
    assert device_tolerance("fp32") == {"max_abs_diff": 1e-3, "top1_agreement": 1.0, "cosine_min": 0.99999}
    assert device_tolerance("fp32", "onnxruntime-tensorrt")["max_abs_diff"] == 1e-2
    assert device_tolerance("fp32", "onnxruntime-cuda")["max_abs_diff"] == 1e-3
    assert device_tolerance("int8", "onnxruntime-tensorrt") == {"max_abs_diff": None, "top1_agreement": 0.75, "cosine_min": 0.98}
    r = {"finite": True, "max_abs_diff": 5e-3, "top1_agreement": 1.0, "cosine_min": 1.0}
    assert tolerance_problems(r, "fp32") and not tolerance_problems(r, "fp32", backend="onnxruntime-tensorrt")
