import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeconv_runtime import EdgeconvError, Model, available_backends
from edgeconv_runtime.cli import main as runtime_main
from bundle_helpers import edit_manifest


def test_backend_registry_says_why():
    status = available_backends()
    assert set(status) == {"onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "openvino-cpu"}
    assert status["onnxruntime-cpu"] == (True, "ok")
    for name, (ok, why) in status.items():
        assert ok or why  # every unavailable backend says why


def test_predict_accepts_paths_bytes_pil_and_arrays(mnist_bundle):
    model = Model.load(mnist_bundle)
    f = mnist_bundle / "reference" / "images" / "000.png"
    by_path = model.predict(str(f), top_k=3)
    by_bytes = model.predict(f.read_bytes(), top_k=3)
    by_pil = model.predict(Image.open(f), top_k=3)
    by_array = model.predict(np.asarray(Image.open(f)), top_k=3)
    for p in (by_bytes, by_pil, by_array):
        assert p.labels == by_path.labels
        assert np.allclose(p.probabilities, by_path.probabilities, atol=1e-7)
    assert len(by_path.labels) == 3 and abs(sum(model.predict(str(f), top_k=10).probabilities) - 1) < 1e-6
    batch = model.predict([str(f), f.read_bytes()])
    assert isinstance(batch, list) and len(batch) == 2


def test_predictions_match_the_reference_labels_and_pytorch(mnist_bundle):
    model = Model.load(mnist_bundle)
    ref = json.loads((mnist_bundle / "manifest.json").read_text())["reference"]
    expected = np.load(mnist_bundle / ref["outputs"]).argmax(1)
    preds = model.predict([str(mnist_bundle / f) for f in ref["images"]], top_k=1)
    assert [int(p.indices[0]) for p in preds] == expected.tolist()


def test_run_rejects_wrong_dtype_shape_and_type(mnist_bundle):
    model = Model.load(mnist_bundle)
    good = np.zeros((2, 1, 28, 28), np.float32)
    assert model.run(good).shape == (2, 10)
    with pytest.raises(EdgeconvError, match="float32"):
        model.run(good.astype(np.float64))
    with pytest.raises(EdgeconvError, match=r"shape \('N', 1, 28, 28\)"):
        model.run(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(EdgeconvError, match="numpy array"):
        model.run([[0.0]])


def test_bad_images_are_clear_errors(mnist_bundle, rgb_bundle, tmp_path):
    model = Model.load(mnist_bundle)
    jpg = next((rgb_bundle / "reference" / "images").iterdir())
    with pytest.raises(EdgeconvError, match="cannot decode image"):
        model.predict(jpg.read_bytes()[:300])
    with pytest.raises(EdgeconvError, match="0 bytes"):
        model.predict(b"")
    with pytest.raises(EdgeconvError, match="image not found"):
        model.predict(str(tmp_path / "nope.png"))
    rgb = Model.load(rgb_bundle)
    gray = io.BytesIO()
    Image.open(jpg).convert("L").save(gray, format="PNG")
    with pytest.raises(EdgeconvError, match="grayscale .* expects RGB"):
        rgb.predict(gray.getvalue())
    assert rgb.predict(str(jpg)).label in ("cats", "dogs")


def test_bundle_integrity_errors(mnist_bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(mnist_bundle, broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(EdgeconvError, match="does not match its sha256"):
        Model.load(broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(EdgeconvError, match="missing model.onnx"):
        Model.load(broken)
    with pytest.raises(EdgeconvError, match="not an edgeconv bundle"):
        Model.load(tmp_path)
    with pytest.raises(EdgeconvError, match="no onnx int8"):
        shutil.rmtree(broken)
        shutil.copytree(mnist_bundle, broken)
        edit_manifest(broken, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["precision"] != "int8"]))
        for name in ("model.int8.onnx", "model.int8.trt.onnx", "model.int8.portable.onnx"):  # the files go with their records
            (broken / name).unlink(missing_ok=True)
        Model.load(broken, backend="onnxruntime-cpu", precision="int8")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_verify_passes_on_every_precision(mnist_bundle, precision):
    r = Model.load(mnist_bundle, precision=precision).verify()
    assert r["ok"], r["problems"]
    assert r["preprocess_max_abs_diff"] <= 1e-5
    if precision == "fp32":
        assert r["max_abs_diff"] < 1e-4


def rehash(bundle, rel):
    """Record an edited file's new sha256 in the manifest's files map, as a re-export would."""
    from edgeconv_runtime.fileio import sha256_file

    edit_manifest(bundle, lambda m: m["files"].update({rel: sha256_file(bundle / rel)}))


def test_verify_catches_wrong_outputs_and_preprocessing_drift(mnist_bundle, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(mnist_bundle, bad)
    out = np.load(bad / "reference" / "outputs.npy")
    np.save(bad / "reference" / "outputs.npy", out[:, ::-1].copy())  # as if the classes were reordered
    rehash(bad, "reference/outputs.npy")  # a consistent bundle (else its files map refuses the edited file)
    with pytest.raises(SystemExit) as e:
        runtime_main(["verify", str(bad)])
    assert e.value.code == 1
    assert "verify FAILED" in capsys.readouterr().out
    drift = tmp_path / "drift"
    shutil.copytree(mnist_bundle, drift)
    img = drift / "reference" / "images" / "000.png"
    Image.open(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(img)
    rehash(drift, "reference/images/000.png")
    r = Model.load(drift).verify()
    assert not r["ok"] and any("preprocessing differs" in p for p in r["problems"])


def test_evaluate_on_a_class_folder(rgb_bundle, catsdogs_tiny):
    r = Model.load(rgb_bundle).evaluate(catsdogs_tiny / "test")
    assert r["n"] == 32 and set(r["per_class"]) == {"cats", "dogs"}
    assert r["per_class"]["cats"]["n"] == 16 and 0 <= r["accuracy"] <= 1
    with pytest.raises(EdgeconvError, match="sub-folders named after the model's classes"):
        Model.load(rgb_bundle).evaluate(catsdogs_tiny)


def test_loads_a_bare_onnx_file_from_its_metadata(mnist_bundle, tmp_path):
    lone = tmp_path / "digits.onnx"
    shutil.copy(mnist_bundle / "model.onnx", lone)
    m = Model.load(lone)
    assert m.classes == [str(i) for i in range(10)] and m.preprocess.size == (28, 28)
    f = mnist_bundle / "reference" / "images" / "001.png"
    assert m.predict(str(f)).labels == Model.load(mnist_bundle).predict(str(f)).labels


def runtime_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *args], capture_output=True, text=True, timeout=300)


def test_cli_predict_evaluate_verify_bench(mnist_bundle, rgb_bundle, catsdogs_tiny, tmp_path):
    f = mnist_bundle / "reference" / "images" / "002.png"
    r = runtime_cli("predict", str(mnist_bundle), str(f), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)[0]["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    r = runtime_cli("evaluate", str(rgb_bundle), str(catsdogs_tiny / "test"), "--json")
    out = json.loads(r.stdout)
    assert set(out) >= {"accuracy", "n", "per_class"} and out["n"] == 32
    r = runtime_cli("verify", str(mnist_bundle), "--precision", "int8")
    assert r.returncode == 0 and r.stdout.startswith("verify OK")
    r = runtime_cli("bench", str(mnist_bundle), "--precision", "fp32,int8", "--batch-sizes", "1,4", "--iterations", "20",
                    "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert len(res["rows"]) == 4
    row = res["rows"][0]
    for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "stdev_ms", "throughput_ips", "load_s",
              "first_inference_ms", "e2e_p50_ms", "e2e_throughput_ips"):
        assert k in row and row[k] > 0, k
    assert row["iterations"] == 20 and row["e2e_p50_ms"] > row["p50_ms"]
    assert res["environment"]["cpu"] and res["environment"]["onnxruntime"]
    assert (tmp_path / "b.csv").read_text().startswith("backend,precision,batch")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(tmp_path, mnist_bundle):
    r = runtime_cli("predict", str(tmp_path / "none"), "x.jpg")
    assert r.returncode == 2 and r.stderr.startswith("error: model not found") and "Traceback" not in r.stderr
    r = runtime_cli("predict", str(mnist_bundle), str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "image not found" in r.stderr and r.stderr.count("\n") == 1


def test_runtime_never_imports_torch(mnist_bundle):
    code = (
        "import sys, edgeconv_runtime\n"
        f"m = edgeconv_runtime.Model.load({str(mnist_bundle)!r})\n"
        f"m.predict({str(mnist_bundle / 'reference' / 'images' / '000.png')!r}); m.verify()\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'edgeconv', 'edgeconv_export')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runtime_source_has_no_torch_imports():
    root = Path(__file__).resolve().parents[1] / "runtime" / "edgeconv_runtime"
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import torch" not in text and "from torch" not in text, f
        assert "import edgeconv." not in text and "from edgeconv " not in text and "from edgeconv." not in text, f


@pytest.mark.parametrize("channels,mean,std", [(3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (1, (0.0,), (1.0,))])
def test_normalize_is_the_formula_per_pixel_in_nchw(channels, mean, std):
    from edgeconv_runtime.preprocess import Preprocess, normalize

    pre = Preprocess(size=(5, 7), channels=channels, mean=mean, std=std)
    px = np.random.default_rng(channels).integers(0, 256, (2, 5, 7, channels), dtype=np.uint8)
    x = normalize(px, pre)
    assert x.shape == (2, channels, 5, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    for n, c, i, j in [(0, 0, 0, 0), (1, channels - 1, 4, 6), (1, 0, 2, 3), (0, channels - 1, 3, 1)]:
        assert x[n, c, i, j] == pytest.approx((px[n, i, j, c] / 255.0 - mean[c]) / std[c], abs=1e-6)
    assert np.array_equal(normalize(px[0], pre), x[:1])  # one HWC image = a batch of one
