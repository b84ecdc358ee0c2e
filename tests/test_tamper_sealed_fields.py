"""Issue 24 §3: the manifest digest seals tolerances, precisions and the calibration record too, not only classes and
preprocessing. Each edit is a legal value changed by hand on a copy of the session's real MNIST bundle (the digest
left as it was): `Model.load` and `verify` refuse it in one line. Resealed, four of these six load (legal values):
only the digest (or a signature) tells them."""
import sys

import pytest
from edgeconv_runtime import Model
from bundle_helpers import copy_bundle, edit_manifest
from test_tamper import load_refused, refused, run

RUNTIME = [sys.executable, "-m", "edgeconv_runtime"]


def _artifact(m, precision):
    return next(a for a in m["artifacts"] if a["precision"] == precision)


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m["parity"].update(fp32_max_abs_limit=1.0), id="fp32-tolerance"),
    pytest.param(lambda m: m["parity"].update(max_accuracy_drop_points=50.0), id="accuracy-budget"),
    pytest.param(lambda m: _artifact(m, "fp16").update(precision="fp32"), id="precision-relabelled"),
    pytest.param(lambda m: m["artifacts"].remove(_artifact(m, "fp16")), id="precision-dropped"),
    pytest.param(lambda m: _artifact(m, "int8")["parity"].update(cosine_min=1.0), id="int8-parity-record"),
    pytest.param(lambda m: m["calibration"].update(images=1), id="calibration-record"),
])
def test_sealed_fields_changed_by_hand_are_refused(mnist_bundle, tmp_path, change):
    bundle = copy_bundle(mnist_bundle, tmp_path / "b")
    assert Model.load(bundle).verify()["ok"]
    edit_manifest(bundle, change, reseal=False)
    load_refused(bundle, "was changed after export")
    refused(run([*RUNTIME, "verify", str(bundle)]), "was changed after export")

