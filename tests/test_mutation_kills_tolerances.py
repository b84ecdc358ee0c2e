"""Every number in parity's tolerance table, pinned by behaviour: a report just inside the documented limit passes and
one just outside fails, so a limit moved either way (loosened or tightened) is caught. `make mutants` runs these once
per mutant of parity.TOLERANCES (the table, the TensorRT override and the preprocessing limit)."""
import hashlib

import numpy as np
import pytest

from bundle_helpers import copy_bundle, edit_manifest
from edgeconv_runtime import Model
from edgeconv_runtime.parity import tolerance_problems

# precision -> (max abs diff on a device, at export, top-1 agreement, min cosine); None: not judged on that figure.
# The FP32 limits are the README's ("max |logit diff| <= 1e-4 (1e-3 on a device)"); the others are parity.py's.
DOCUMENTED = {
    "fp32": (1e-3, 1e-4, 1.0, 0.99999),
    "fp16": (None, None, 1.0, 0.999),
    "bf16": (None, None, 1.0, 0.999),
    "int8": (None, None, 0.75, 0.98),
}


def _report(**kw) -> dict:
    return {"finite": True, "max_abs_diff": 0.0, "top1_agreement": 1.0, "cosine_min": 1.0, **kw}


@pytest.mark.parametrize("precision", sorted(DOCUMENTED))
def test_each_table_number_is_the_documented_one_either_way(precision):
    device, export, top1, cosine = DOCUMENTED[precision]
    for at_export, limit in ((False, device), (True, export)):
        if limit is None:  # not judged on the difference: any finite one passes
            assert tolerance_problems(_report(max_abs_diff=1e6), precision, at_export=at_export) == []
            continue
        assert tolerance_problems(_report(max_abs_diff=limit * 0.9), precision, at_export=at_export) == [], (precision, at_export)
        assert tolerance_problems(_report(max_abs_diff=limit * 1.1), precision, at_export=at_export)[0].startswith("max abs diff")
    # agreement and cosine: the limit itself passes, a little below it fails, and a little below is not far below
    assert tolerance_problems(_report(top1_agreement=top1), precision) == []
    below = top1 - 0.001 if top1 == 1.0 else top1 * 0.99
    assert tolerance_problems(_report(top1_agreement=below), precision)[0].startswith("top-1 agreement")
    assert tolerance_problems(_report(top1_agreement=below), precision, at_export=True)[0].startswith("top-1 agreement")
    assert tolerance_problems(_report(cosine_min=cosine), precision) == []
    shy = 1 - (1 - cosine) * 1.5  # 50 % more distance from 1 than the limit allows
    assert tolerance_problems(_report(cosine_min=shy), precision)[0].startswith("min cosine")
    assert tolerance_problems(_report(cosine_min=shy), precision, at_export=True)[0].startswith("min cosine")


def test_the_tensorrt_override_is_1e_2_either_way():
    trt = "onnxruntime-tensorrt"
    assert tolerance_problems(_report(max_abs_diff=0.9e-2), "fp32", backend=trt) == []
    assert tolerance_problems(_report(max_abs_diff=1.1e-2), "fp32", backend=trt)[0].startswith("max abs diff")
    # and it loosens FP32's difference only: agreement and cosine stay strict there
    assert tolerance_problems(_report(max_abs_diff=5e-3, cosine_min=0.9999), "fp32", backend=trt)[0].startswith("min cosine")


@pytest.mark.parametrize("shift, ok", [(0.7e-5, True), (1.5e-5, False)])
def test_verify_holds_preprocessing_to_1e_5(mnist_bundle, tmp_path, shift, ok):
    """The bundle's reference inputs moved by ``shift`` against what this machine's decoder makes of its reference
    images: 0.7e-5 is inside the 1e-5 preprocessing limit, 1.5e-5 is outside (the model's logits move far less than
    FP32's 1e-3, so only the preprocessing check can fail)."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    base = Model.load(b).verify()
    assert base["ok"] and base["preprocess_max_abs_diff"] < 1e-6
    x = np.load(b / "reference" / "inputs.npy")
    x[0] += np.float32(shift)
    np.save(b / "reference" / "inputs.npy", x)
    digest = hashlib.sha256((b / "reference" / "inputs.npy").read_bytes()).hexdigest()
    edit_manifest(b, lambda m: m["files"].update({"reference/inputs.npy": digest}))
    r = Model.load(b).verify()
    assert r["preprocess_max_abs_diff"] == pytest.approx(shift, rel=0.05)
    assert r["ok"] is ok, r["problems"]
    if not ok:
        assert r["problems"] == [p for p in r["problems"] if p.startswith("preprocessing differs")] and r["problems"]
