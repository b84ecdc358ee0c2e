"""Model's decisions (runtime/edgeconv_runtime/model.py) on the real mnist bundle and altered copies of it: softmax,
which artifact a backend and precision take, the INT8 graph validated for this CPU (or FP32 with a note), the graph
checked against its manifest, predict's top-k and batches, evaluate's folders and skips, and load's refusals.
In-process and quick: `make mutants` runs these with test_runtime.py once per mutant."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_helpers import copy_bundle, edit_manifest
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.bundle import read_bundle
from edgeconv_runtime.cpuclass import cpu_class
from edgeconv_runtime.model import _artifact_kind, _missing_artifact, cpu_int8_variant, precision_of
from edgeconv_runtime.prediction import softmax

CPU = "onnxruntime-cpu"  # named where a test asserts what ran: `auto` takes a GPU first where there is one


def _rehash(b: Path, rel: str) -> None:
    digest = hashlib.sha256((b / rel).read_bytes()).hexdigest()
    edit_manifest(b, lambda m: m["files"].update({rel: digest}))


def test_softmax_is_exact_and_stable_for_large_logits():
    p = softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-12)
    big = softmax(np.array([[800.0, 0.0, -800.0]]))
    assert np.isfinite(big).all() and big[0, 0] == 1.0


def test_precision_and_artifact_kind_from_names():
    assert precision_of(Path("model.fp16.onnx")) == "fp16" and precision_of(Path("MODEL.INT8.trt.onnx")) == "int8"
    assert precision_of(Path("model.onnx")) == "fp32" and precision_of(Path("x/model.int8.plan")) == "int8"
    assert _artifact_kind("tensorrt") == ("tensorrt", "tensorrt") and _artifact_kind("onnxruntime-tensorrt") == ("onnx", "tensorrt")
    assert _artifact_kind("onnxruntime-cpu") == ("onnx", None) and _artifact_kind("openvino-cpu") == ("onnx", None)


def test_a_missing_artifact_is_named(mnist_bundle, tmp_path):
    b = read_bundle(mnist_bundle)
    assert _missing_artifact(b, "onnxruntime-cpu", "onnx", "fp16") is None
    assert _missing_artifact(b, "onnxruntime-tensorrt", "onnx", "int8") is None  # the bundle has the TensorRT-ready graph
    assert _missing_artifact(b, "tensorrt", "tensorrt", "fp32") == "bundle has no tensorrt fp32 artifact"
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    edit_manifest(c, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["file"] != "model.int8.trt.onnx"]))
    (c / "model.int8.trt.onnx").unlink()
    b = read_bundle(c)
    assert "needs the TensorRT-ready INT8 graph" in _missing_artifact(b, "onnxruntime-tensorrt", "onnx", "int8")
    assert _missing_artifact(b, "onnxruntime-cpu", "onnx", "int8") is None


def _validated(bundle: Path, dst: Path, default, portable) -> Path:
    c = copy_bundle(bundle, dst)

    def fix(m):
        for a in m["artifacts"]:
            if a["file"] == "model.int8.onnx" and default is not None:
                a["details"]["validated_cpu_classes"] = default
            if a["file"] == "model.int8.portable.onnx" and portable is not None:
                a["details"]["validated_cpu_classes"] = portable
    edit_manifest(c, fix)
    return c


def test_the_int8_graph_validated_for_this_cpu_is_taken(mnist_bundle, tmp_path):
    here = cpu_class()
    assert cpu_int8_variant(read_bundle(_validated(mnist_bundle, tmp_path / "a", [here], [here]))) == ("default", None)
    only_portable = _validated(mnist_bundle, tmp_path / "b", ["other-class"], [here])
    assert cpu_int8_variant(read_bundle(only_portable)) == ("portable", None)
    with Model.load(only_portable, backend=CPU, precision="int8") as m:
        assert m.info["int8_variant"] == "portable" and m.artifact.name == "model.int8.portable.onnx" and m.precision == "int8"
    neither = _validated(mnist_bundle, tmp_path / "c", ["other-class"], ["another"])
    variant, why = cpu_int8_variant(read_bundle(neither))
    assert variant is None and why == (f"no INT8 graph of this bundle was validated on this CPU's class ({here}; "
                                       "model.int8.onnx: other-class, model.int8.portable.onnx: another)")
    with Model.load(neither, backend=CPU, precision="int8") as m:  # FP32 instead, with the reason
        assert m.precision == "fp32" and m.artifact.name == "model.onnx" and m.info["int8_fallback"] == why
        assert m.info["note"] == f"running FP32 instead of INT8: {why}"
    old = copy_bundle(mnist_bundle, tmp_path / "d")  # recorded before classes were: validated wherever it runs
    edit_manifest(old, lambda m: [a["details"].pop("validated_cpu_classes", None) for a in m["artifacts"]])
    assert cpu_int8_variant(read_bundle(old)) == ("default", None)


def test_int8_that_fails_its_reference_here_falls_back_to_fp32(mnist_bundle, tmp_path):
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    out = np.load(c / "reference" / "outputs.npy")
    np.save(c / "reference" / "outputs.npy", out[:, ::-1].copy())
    _rehash(c, "reference/outputs.npy")
    with Model.load(c, backend=CPU, precision="int8") as m:
        assert m.precision == "fp32" and m.info["int8_fallback"].startswith("INT8 fails `verify` on this CPU (top-1 agreement")
    with Model.load(mnist_bundle, backend=CPU, precision="int8") as m:  # the default graph where it is validated, else the portable one
        assert m.precision == "int8" and "int8_fallback" not in m.info and m.info["int8_variant"] == cpu_int8_variant(read_bundle(mnist_bundle))[0]
    with Model.load(mnist_bundle, precision="fp16") as m:
        assert m.precision == "fp16" and m.artifact.name == "model.fp16.onnx" and "int8_variant" not in m.info


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(classes=[str(i) for i in range(9)]), "outputs ['batch', 10] but manifest.json lists 9 classes"),
    (lambda m: m["preprocess"].update(size=[32, 32]), "takes input ['batch', 1, 28, 28] but manifest.json preprocess gives [N, 1, 32, 32]"),
    (lambda m: m["preprocess"].update(channels=3, mean=[0, 0, 0], std=[1, 1, 1], channel_order="RGB"), "preprocess gives [N, 3, 28, 28]"),
])
def test_a_manifest_that_does_not_belong_to_its_graph_is_refused(mnist_bundle, tmp_path, edit, needle):
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    edit_manifest(c, edit)
    with pytest.raises(EdgeconvError) as e:
        Model.load(c, backend="onnxruntime-cpu")
    assert needle in str(e.value) and "re-export the bundle" in str(e.value)


def test_load_refusals(mnist_bundle, tmp_path):
    with pytest.raises(EdgeconvError, match="model not found"):
        Model.load(tmp_path / "none")
    with pytest.raises(EdgeconvError, match="unknown precision 'fp64'"):
        Model.load(mnist_bundle, precision="fp64")
    with pytest.raises(EdgeconvError, match="is one file; a signature covers a whole bundle"):
        Model.load(mnist_bundle / "model.onnx", public_key=tmp_path / "k.pub.pem")
    with pytest.raises(EdgeconvError, match="unknown backend 'onnxruntime-npu'"):
        Model.load(mnist_bundle, backend="onnxruntime-npu")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(EdgeconvError, match="neither a bundle directory, a .onnx file nor a TensorRT engine"):
        Model.load(tmp_path / "x.txt")
    with Model.load(mnist_bundle, backend=CPU) as m:
        assert m.load_seconds > 0 and m.backend_name == "onnxruntime-cpu" and m.precision == "fp32" and m.info["skipped"] is not None


def test_predict_top_k_batches_and_single_inputs(mnist_bundle):
    files = sorted((mnist_bundle / "reference" / "images").iterdir())
    with Model.load(mnist_bundle) as m:
        one = m.predict(files[0])
        assert not isinstance(one, list) and len(one.labels) == 5 and one.source == str(files[0])
        assert len(m.predict(files[0], top_k=0).labels) == 1 and len(m.predict(files[0], top_k=50).labels) == 10
        p = m.predict(files[0], top_k=10)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and abs(sum(p.probabilities) - 1) < 1e-6
        assert p.labels == [str(i) for i in p.indices]
        many = m.predict(files, top_k=3, batch_size=3)  # 8 images in batches of 3, 3 and 2
        assert len(many) == 8 and [q.labels for q in many] == [m.predict(f, top_k=3).labels for f in files]
        want = m.run(m.preprocess_images(files)).argmax(1)
        assert [int(q.indices[0]) for q in many] == want.tolist()
        assert m.predict(files[:1], top_k=1)[0].label == one.label  # a list of one is a list
        px = np.asarray(Image.open(files[0]))
        assert m.predict(px).label == one.label and m.predict(px).source is None  # a 2-D array is one image
        assert len(m.predict(np.stack([px, px])[..., None])) == 2  # N x H x W x C: N images
        assert len(m.predict(px[..., None]).labels) == 5  # H x W x C: one image
        with pytest.raises(EdgeconvError, match="predict\\(\\) got no images"):
            m.predict([])


def test_evaluate_counts_per_class_and_skips_bad_files(mnist_bundle, tmp_path):
    root = tmp_path / "eval"
    ref = mnist_bundle / "reference"
    labels = np.load(ref / "labels.npy")
    files = sorted((ref / "images").iterdir())
    for f, y in zip(files, labels):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / str(y) / f.name)
    first = root / str(labels[0])
    (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (first / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    with Model.load(mnist_bundle, backend=CPU) as m:
        r = m.evaluate(root, batch_size=2)
        preds = m.run(m.preprocess_images(files)).argmax(1)
        assert r["n"] == 8 and r["skipped"] == 1 and r["accuracy"] == pytest.approx(float((preds == labels).mean()))
        assert set(r["per_class"]) == {str(y) for y in labels}
        y0 = labels[0]
        assert r["per_class"][str(y0)] == {"accuracy": float((preds[labels == y0] == y0).mean()), "n": int((labels == y0).sum())}
        assert r["backend"] == "onnxruntime-cpu" and r["precision"] == "fp32"
        (root / "cat").mkdir()
        with pytest.raises(EdgeconvError, match="needs sub-folders named after the model's classes"):
            m.evaluate(root)
        with pytest.raises(EdgeconvError, match="image folder not found"):
            m.evaluate(tmp_path / "none")
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(EdgeconvError, match="needs sub-folders"):
            m.evaluate(empty)
        only_bad = tmp_path / "bad" / "3"
        only_bad.mkdir(parents=True)
        (only_bad / "x.png").write_bytes(b"junk")
        with pytest.raises(EdgeconvError, match="no readable images under"):
            m.evaluate(tmp_path / "bad")


def test_verify_report_fields_and_refusals(mnist_bundle, tmp_path):
    with Model.load(mnist_bundle) as m:
        r = m.verify()
    assert r["ok"] and r["n"] == 8 and r["top1_agreement"] == 1.0 and r["max_abs_diff"] < 1e-3 and r["problems"] == []
    assert r["tolerance"] == {"max_abs_diff": 1e-3, "top1_agreement": 1.0, "cosine_min": 0.99999}
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    np.save(c / "reference" / "inputs.npy", np.load(c / "reference" / "inputs.npy")[:, :, :14])
    _rehash(c, "reference/inputs.npy")
    with Model.load(c) as m, pytest.raises(EdgeconvError, match="bundle reference tensors have shapes"):
        m.verify()
    d = copy_bundle(mnist_bundle, tmp_path / "d")
    edit_manifest(d, lambda m: m.update(reference=None))
    with Model.load(d) as m, pytest.raises(EdgeconvError, match="no reference tensors to verify against"):
        m.verify()


def test_reference_tensors_are_never_unpickled(mnist_bundle, tmp_path):
    """The INT8 check on load reads reference/inputs.npy with allow_pickle=False: an object array (a pickle inside the
    .npy, listed with its right sha256) is refused, not loaded."""
    for name in ("inputs", "outputs"):
        c = copy_bundle(mnist_bundle, tmp_path / name)
        x = np.load(c / "reference" / f"{name}.npy")
        np.save(c / "reference" / f"{name}.npy", x.astype(object), allow_pickle=True)
        _rehash(c, f"reference/{name}.npy")
        with pytest.raises((ValueError, EdgeconvError), match="allow_pickle|pickle"):
            Model.load(c, backend=CPU, precision="int8")


def _plain(tmp_path: Path, name: str, in_dims, out_dims, nhwc=False) -> Path:
    from test_mutation_kills_importer import classifier

    path = tmp_path / f"{name}.onnx"
    import onnx

    onnx.save(classifier(in_dims, out_dims=out_dims, nhwc=nhwc), str(path))
    return path


def test_plain_onnx_files_are_read_for_what_they_say(tmp_path):
    with Model.load(_plain(tmp_path, "wide", [1, 3, 32, 48], [1, 2])) as m:
        assert m.preprocess.size == (32, 48) and m.preprocess.channels == 3 and m.classes == ["0", "1"]
        assert m.info["plain"] and m.info["fixed_batch"] == 1 and "images are stretched to 32x48 and scaled to [0, 1]" in m.info["note"]
        assert len(m.predict([np.zeros((5, 7, 3), np.uint8)] * 3)) == 3  # a fixed batch of 1: three runs of one
    with Model.load(_plain(tmp_path, "two", [2, 3, 8, 8], [2, 2])) as m:  # a fixed batch of 2: the last of 3 images padded
        imgs = [np.full((8, 8, 3), v, np.uint8) for v in (0, 120, 250)]
        three = m.predict(imgs, top_k=2)
        assert m.info["fixed_batch"] == 2 and len(three) == 3
        assert [p.probabilities for p in three] == [m.predict(im, top_k=2).probabilities for im in imgs]
    with Model.load(_plain(tmp_path, "narrow", [1, 3, 8, 3], [1, 2])) as m:  # NCHW 3 pixels wide: not taken for NHWC
        assert m.preprocess.size == (8, 3) and m.preprocess.channels == 3
    with Model.load(_plain(tmp_path, "dyn", ["n", 3, 8, 8], ["n", 2])) as m:
        assert m.info["fixed_batch"] is None and len(m.predict([np.zeros((5, 7, 3), np.uint8)] * 3)) == 3
    for name, in_dims, out_dims, nhwc, needle in (
            ("nhwc1", [1, 28, 28, 1], [1, 2], True, "takes NHWC input [1, 28, 28, 1]; images are fed NCHW"),
            ("nhwc3", [1, 28, 28, 3], [1, 2], True, "takes NHWC input"),
            ("nhwc2", [1, 2, 8, 3], [1, 2], True, "takes NHWC input [1, 2, 8, 3]"),  # H = 2: no channel count, so C is last
            ("four", [1, 4, 8, 8], [1, 2], False, "takes input [1, 4, 8, 8], not images [N, C, H, W]"),
            ("anysize", [1, 3, "h", "w"], [1, 2], False, "takes images of any height/width"),
            ("rank3", [1, 3, 8, 8], [1, 2, 1], False, "not one score per class [N, classes]")):
        with pytest.raises(EdgeconvError) as e:
            Model.load(_plain(tmp_path, name, in_dims, out_dims, nhwc))
        assert needle in str(e.value), (name, str(e.value))


def test_a_plain_grayscale_onnx_file_loads(tmp_path):
    """Found by make mutants: plain_bundle built Preprocess(channels=1) with the 3-value default mean/std, so a plain
    grayscale ONNX file was refused with 'mean/std need 1 values each'."""
    with Model.load(_plain(tmp_path, "gray", ["n", 1, 8, 8], ["n", 2])) as m:
        assert m.preprocess.channels == 1 and m.info["plain"]
        assert m.preprocess.mean == (0.0,) and m.preprocess.std == (1.0,)
        assert len(m.predict(np.full((8, 8), 200, np.uint8)).labels) == 2  # a grayscale image runs


def test_a_file_failing_its_sha256_after_the_backend_started_closes_it(mnist_bundle, tmp_path, monkeypatch):
    """The sha256 of the files a load does not read first are checked while the backend starts; a mismatch found then
    refuses the load and closes the backend it had started (no session left behind)."""
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    labels = c / "reference" / "labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1  # same size, another sha256
    labels.write_bytes(bytes(data))
    closed = []
    original = Model.close
    monkeypatch.setattr(Model, "close", lambda self: closed.append(self.backend_name) or original(self))
    with pytest.raises(EdgeconvError, match="labels.npy"):
        Model.load(c, backend=CPU)
    assert closed == ["onnxruntime-cpu"]


def test_verify_names_reference_tensors_it_cannot_read(mnist_bundle, tmp_path):
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    (c / "reference" / "outputs.npy").write_bytes(b"\x93NUMPY garbage")
    _rehash(c, "reference/outputs.npy")  # consistent with the manifest, but no .npy
    with Model.load(c) as m, pytest.raises(EdgeconvError, match="bundle reference tensors are missing or unreadable .*copy the whole bundle"):
        m.verify()
    d = copy_bundle(mnist_bundle, tmp_path / "d")
    np.save(d / "reference" / "inputs.npy", np.load(d / "reference" / "inputs.npy").astype(object), allow_pickle=True)
    _rehash(d, "reference/inputs.npy")
    with Model.load(d) as m, pytest.raises(EdgeconvError, match="missing or unreadable .*allow_pickle"):
        m.verify()  # a pickle inside is refused, not loaded
    e = copy_bundle(mnist_bundle, tmp_path / "e")  # the reference outputs too (a surviving mutant: allow_pickle=True there)
    np.save(e / "reference" / "outputs.npy", np.load(e / "reference" / "outputs.npy").astype(object), allow_pickle=True)
    _rehash(e, "reference/outputs.npy")
    with Model.load(e) as m, pytest.raises(EdgeconvError, match="missing or unreadable .*allow_pickle"):
        m.verify()


def test_a_file_failing_its_sha256_is_the_error_whatever_else_failed(mnist_bundle, tmp_path):
    """A load that fails for another reason (here an unknown backend) still waits for the sha256 checks running beside
    it: an altered file is what gets reported, not what the altered bundle made the backend say."""
    c = copy_bundle(mnist_bundle, tmp_path / "c")
    labels = c / "reference" / "labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1
    labels.write_bytes(bytes(data))
    with pytest.raises(EdgeconvError, match="labels.npy"):
        Model.load(c, backend="onnxruntime-npu")
    with pytest.raises(EdgeconvError, match="unknown backend 'onnxruntime-npu'"):  # the same bundle unaltered
        Model.load(mnist_bundle, backend="onnxruntime-npu")
