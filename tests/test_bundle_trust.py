"""Bundle trust: every file the runtime reads is covered by a sha256 in the manifest; the graph must fit the manifest."""
import json
from pathlib import Path

import numpy as np
import pytest
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.backends.trt import read_sidecar
from edgeconv_runtime.bundle import read_bundle
from edgeconv_runtime.fileio import sha256_file
from bundle_helpers import copy_bundle, edit_manifest


def flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


def test_export_hashes_every_file_but_the_artifacts(mnist_bundle):
    m = json.loads((mnist_bundle / "manifest.json").read_text())
    artifacts = {a["file"] for a in m["artifacts"]}
    on_disk = {p.relative_to(mnist_bundle).as_posix() for p in mnist_bundle.rglob("*") if p.is_file()}
    docs = {"MODEL_CARD.md", "model_card.json", "curves.png"}  # written beside the bundle for people; the runtime never reads them
    assert set(m["files"]) == on_disk - artifacts - docs - {"manifest.json"}
    ref = m["reference"]
    assert {ref["inputs"], ref["outputs"], ref["labels"], *ref["images"]} <= set(m["files"])
    assert all(m["files"][rel] == sha256_file(mnist_bundle / rel) for rel in m["files"])


@pytest.mark.parametrize("rel", ["reference/inputs.npy", "reference/outputs.npy", "reference/images/000.png"])
def test_a_tampered_reference_file_is_a_one_line_error(mnist_bundle, tmp_path, rel):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    m = Model.load(b)
    assert m.verify()["ok"]
    flip_byte(b / rel)
    with pytest.raises(EdgeconvError) as info:
        m.verify()  # a model loaded before the change: the file is hashed again where it is read
    assert one_line(info).startswith(f"{rel} in {b} does not match its sha256 in manifest.json") and "copy the bundle again" in str(info.value)
    with pytest.raises(EdgeconvError) as info:
        Model.load(b)  # every file is checked when the bundle is opened, the model intact or not
    assert one_line(info).startswith(f"{rel} in {b} does not match its sha256 in manifest.json") and "copy the bundle again" in str(info.value)


def test_a_tampered_labels_file_is_refused_where_it_is_read(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    flip_byte(b / "reference" / "labels.npy")
    with pytest.raises(EdgeconvError, match="labels.npy .* does not match its sha256") as info:
        read_bundle(b).path("reference/labels.npy")
    one_line(info)


def test_a_bundle_without_the_files_map_is_refused(mnist_bundle, tmp_path):
    """Removing the map used to switch hashing off; now it is a bundle to re-export (issue 24)."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m.pop("files"))
    with pytest.raises(EdgeconvError, match="has no 'files' map.*re-export") as info:
        Model.load(b)
    one_line(info)
    edit_manifest(b, lambda m: m.update(files={"reference/inputs.npy": "zz"}))
    with pytest.raises(EdgeconvError, match="not a hex sha256") as info:
        Model.load(b)
    one_line(info)
    edit_manifest(b, lambda m: m.update(files={"../x.npy": "0" * 64}))
    with pytest.raises(EdgeconvError, match="outside the bundle"):
        Model.load(b)


def test_engine_sidecars_are_covered(mnist_bundle, tmp_path):
    """What build-engine writes beside an engine: read by the TensorRT backend, checked against the manifest."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    side = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "sha256": "0" * 64}
    (b / "model.plan").write_bytes(b"engine")
    (b / "model.json").write_text(json.dumps(side))
    edit_manifest(b, lambda m: m["files"].update({"model.json": sha256_file(b / "model.json")}))
    assert read_sidecar(b / "model.plan") == side
    (b / "model.json").write_text(json.dumps({**side, "compute_capability": "9.0"}))  # claims to fit another GPU
    with pytest.raises(EdgeconvError) as info:
        read_sidecar(b / "model.plan")
    assert one_line(info).startswith("model.json in ") and "does not match its sha256" in str(info.value)


def test_onnx_external_data_is_covered(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    (b / "model.onnx.data").write_bytes(b"\0" * 64)

    def declare(m, digest):
        fp32 = next(a for a in m["artifacts"] if a["file"] == "model.onnx")
        fp32["details"]["external_data"] = ["model.onnx.data"]
        if digest:
            m["files"]["model.onnx.data"] = digest

    edit_manifest(b, lambda m: declare(m, sha256_file(b / "model.onnx.data")))
    read_bundle(b).artifact("onnx", "fp32")
    flip_byte(b / "model.onnx.data")
    with pytest.raises(EdgeconvError, match="model.onnx.data in .* does not match its sha256") as info:
        Model.load(b, backend="onnxruntime-cpu")
    one_line(info)
    edit_manifest(b, lambda m: m["files"].pop("model.onnx.data"))
    with pytest.raises(EdgeconvError, match="gives no sha256 for") as info:
        Model.load(b, backend="onnxruntime-cpu")
    one_line(info)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(classes=m["classes"] + ["extra"]), r"graph outputs \['(batch|\?)', 10\] but manifest.json lists 11 classes"),
    (lambda m: m.update(classes=m["classes"][:9]), "lists 9 classes"),
    (lambda m: m["preprocess"].update(size=[32, 32]), r"takes input \['(batch|\?)', 1, 28, 28\] but manifest.json preprocess gives \[N, 1, 32, 32\]"),
])
def test_a_manifest_that_disagrees_with_the_graph_is_a_one_line_error(mnist_bundle, tmp_path, mutate, message):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, mutate)
    for precision in ("fp32", "int8"):  # ONNX Runtime's session and OpenVINO's compiled model (int8 picks it here)
        with pytest.raises(EdgeconvError, match=message) as info:
            Model.load(b, precision=precision)
        one_line(info)
    with pytest.raises(EdgeconvError, match=message):
        Model.load(b / "model.onnx")  # a bare graph inside the bundle is checked against its manifest too


def test_reference_tensors_stay_in_sync_with_the_hash_cache(mnist_bundle, tmp_path):
    """A file changed after it was checked once is hashed again (the cache is keyed on size, mtime, inode)."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    m = Model.load(b)
    assert m.verify()["ok"]
    x = np.load(b / "reference" / "inputs.npy")
    np.save(b / "reference" / "inputs.npy", x + 1.0)
    with pytest.raises(EdgeconvError, match="does not match its sha256"):
        m.verify()


def test_a_mistyped_preprocess_record_is_a_one_line_error(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m["preprocess"].update(size=32))
    with pytest.raises(EdgeconvError, match="invalid 'preprocess' record") as info:
        Model.load(b)
    one_line(info)


def test_the_cli_reports_a_tampered_file_in_one_line(mnist_bundle, tmp_path):
    import subprocess
    import sys

    b = copy_bundle(mnist_bundle, tmp_path / "b")
    flip_byte(b / "reference" / "outputs.npy")
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "verify", str(b)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: reference/outputs.npy in ") and r.stderr.strip().count("\n") == 0, r.stderr
