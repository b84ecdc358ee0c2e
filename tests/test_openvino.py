"""The openvino-cpu backend on real bundles: f32 exact, bf16 where the CPU has it, the Q/DQ INT8 graph, `auto`'s order."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgeconv_runtime import BackendUnavailable, EdgeconvError, Model, available_backends
from edgeconv_runtime.backends import auto_order
from edgeconv_runtime.backends.openvino import INSTALL_HINT, bf16_status
from edgeconv_runtime.cpuclass import cpu_class

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")


def _reference(bundle):
    m = Model.load(bundle, backend="onnxruntime-cpu")
    ref = m.bundle.manifest.reference
    return np.load(m.bundle.path(ref["inputs"])).astype(np.float32), m


def test_fp32_is_exact_against_onnxruntime(mnist_bundle):
    x, ort = _reference(mnist_bundle)
    with Model.load(mnist_bundle, backend="openvino-cpu", precision="fp32") as ov:
        assert ov.backend_name == "openvino-cpu" and ov.artifact.name == "model.onnx"
        d = ov.describe()
        assert d["inference_precision"] == "f32" and d["threads"] == ort.backend.threads and d["performance_hint"] == "LATENCY"
        # f32 pinned: the same arithmetic as ONNX Runtime up to summation order (bf16 would move logits by ~1e-2)
        np.testing.assert_allclose(ov.run(x), ort.run(x), rtol=0, atol=1e-4)
        r = ov.verify()
        assert r["ok"] and r["max_abs_diff"] < 1e-4, r
        img = ov.bundle.path(ov.bundle.manifest.reference["images"][0])
        assert ov.predict(img, top_k=3).labels == ort.predict(img, top_k=3).labels


def test_bf16_runs_the_fp32_graph_with_the_fp16_tolerance_or_says_why(mnist_bundle):
    ok, why = bf16_status()
    if not ok:
        with pytest.raises(BackendUnavailable) as exc:
            Model.load(mnist_bundle, backend="openvino-cpu", precision="bf16")
        assert "AVX-512 BF16 nor AMX" in str(exc.value) and "\n" not in str(exc.value)
        return
    x, ort = _reference(mnist_bundle)
    with Model.load(mnist_bundle, backend="openvino-cpu", precision="bf16") as ov:
        assert ov.precision == "bf16" and ov.artifact.name == "model.onnx" and ov.describe()["inference_precision"] == "bf16"
        diff = np.abs(ov.run(x) - ort.run(x)).max()
        assert diff > 1e-4, diff  # really ran in bf16 (8-bit mantissa), not f32
        r = ov.verify()
        assert r["ok"], r
        assert r["tolerance"]["cosine_min"] == 0.999 and r["tolerance"]["max_abs_diff"] is None  # FP16's


def test_bf16_is_only_openvinos_and_auto_finds_it(mnist_bundle):
    with pytest.raises(BackendUnavailable) as exc:
        Model.load(mnist_bundle, backend="onnxruntime-cpu", precision="bf16")
    assert str(exc.value) == "backend onnxruntime-cpu does not run bf16; bf16 runs on openvino-cpu"
    with pytest.raises(EdgeconvError, match="unknown precision 'bf8'"):
        Model.load(mnist_bundle, precision="bf8")
    if bf16_status()[0]:
        m = Model.load(mnist_bundle, precision="bf16")
        assert m.backend_name == "openvino-cpu"
    assert auto_order("bf16") == ("openvino-cpu",)  # the one backend that runs bf16: auto's error is its reason alone


def test_int8_runs_the_qdq_graph(mnist_bundle):
    x, _ = _reference(mnist_bundle)
    ort8 = Model.load(mnist_bundle, backend="onnxruntime-cpu", precision="int8")
    with Model.load(mnist_bundle, backend="openvino-cpu", precision="int8") as ov:
        # both CPU backends run the INT8 graph validated for this CPU's class (the portable one on x86 without VNNI)
        assert ov.artifact.name == ort8.artifact.name and ov.describe()["inference_precision"] == "f32"
        assert ov.artifact.name == ("model.int8.onnx" if cpu_class() in ov.bundle.manifest.find("onnx", "int8", "default").details[
            "validated_cpu_classes"] else "model.int8.portable.onnx")
        r = ov.verify()
        assert r["ok"], r
        assert (ov.run(x).argmax(1) == ort8.run(x).argmax(1)).mean() >= 0.9


def test_fp16_is_refused_with_its_reason(mnist_bundle):
    with pytest.raises(BackendUnavailable) as exc:
        Model.load(mnist_bundle, backend="openvino-cpu", precision="fp16")
    assert str(exc.value) == "backend openvino-cpu runs fp32, bf16, int8, not fp16"


def test_concurrent_calls_get_their_own_rows(mnist_bundle):
    x, ort = _reference(mnist_bundle)
    want = ort.run(x)
    ov = Model.load(mnist_bundle, backend="openvino-cpu")
    errors = []

    def worker(i):
        for _ in range(20):
            rows = [(i + j) % len(x) for j in range(3)]
            if not np.allclose(ov.run(x[rows]), want[rows], atol=1e-4):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ov.close()
    with pytest.raises(EdgeconvError, match="closed"):
        ov.run(x)


def test_missing_openvino_is_one_line_with_the_install_hint(mnist_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package looks like to find_spec
    assert available_backends()["openvino-cpu"] == (False, INSTALL_HINT)
    with pytest.raises(BackendUnavailable) as exc:
        Model.load(mnist_bundle, backend="openvino-cpu")
    assert str(exc.value) == f"backend openvino-cpu is unavailable here: {INSTALL_HINT}"


def test_auto_order_follows_the_measurement(mnist_bundle):
    # openvino-cpu was not consistently faster for fp32 or int8 (benchmarks/results/backends.md); bf16 runs only there
    for precision in ("fp32", "fp16", "int8"):
        m = Model.load(mnist_bundle, precision=precision)
        assert m.backend_name == "onnxruntime-cpu", (precision, m.info)
    if bf16_status()[0]:  # a CPU with AVX-512 BF16 or AMX
        m = Model.load(mnist_bundle, precision="bf16")
        assert m.backend_name == "openvino-cpu" and all(not s.startswith("openvino-cpu") for s in m.info["skipped"])


def test_probing_does_not_import_openvino(mnist_bundle):
    # `backends` and a load that ends on ONNX Runtime must not pay OpenVINO's import (~1 s)
    code = ("import sys; from edgeconv_runtime import Model, available_backends; s = available_backends(); "
            "m = Model.load(sys.argv[1], precision='fp16'); print(s['openvino-cpu'][0], m.backend_name, 'openvino' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(mnist_bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "onnxruntime-cpu", "False"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_answers_do_not_depend_on_the_batch_an_image_runs_in(lite0_int8_bundle, precision):
    """A server batches requests as they come: one image must get the same logits alone or in a batch."""
    model = Model.load(lite0_int8_bundle, backend="openvino-cpu", precision=precision)
    x = model.preprocess_images([lite0_int8_bundle / f for f in model.bundle.manifest.reference["images"]])
    alone = np.concatenate([model.run(x[i : i + 1]) for i in range(len(x))])
    assert np.array_equal(alone, model.run(x)), float(np.abs(alone - model.run(x)).max())
