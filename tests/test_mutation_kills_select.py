"""select_backend's decisions (runtime/edgeconv_runtime/backends/select.py) on the real mnist bundle and altered copies: the
INT8 graph a caller (tune, a device profile) names, the hash check by default, the precise message for a named backend
whose artifact is missing, and the INT8 backend closed when its graph fails the reference outputs on this CPU. Each test
kills survivors of `make mutants` on the "backend selection" target (2026-12-03: 12/20 killed before these)."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import copy_bundle, edit_manifest
from edgeconv_runtime import EdgeconvError
from edgeconv_runtime.backends import create_backend
from edgeconv_runtime.backends.select import select_backend
from edgeconv_runtime.bundle import read_bundle

CPU = "onnxruntime-cpu"


def _rehash(b: Path, rel: str) -> None:
    digest = hashlib.sha256((b / rel).read_bytes()).hexdigest()
    edit_manifest(b, lambda m: m["files"].update({rel: digest}))


def test_a_named_int8_graph_runs_that_graph_and_an_unknown_name_is_refused(mnist_bundle):
    bundle = read_bundle(mnist_bundle)
    for variant, file in (("portable", "model.int8.portable.onnx"), ("tensorrt", "model.int8.trt.onnx"), ("default", "model.int8.onnx")):
        got = select_backend(bundle, CPU, "int8", int8_variant=variant)
        try:
            assert got.fp32_instead is None and got.artifact.name == file and got.info["int8_variant"] == variant
        finally:
            got.backend.close()
    with pytest.raises(EdgeconvError, match="unknown INT8 graph variant 'fast'"):
        select_backend(bundle, CPU, "int8", int8_variant="fast")


def test_a_named_int8_graph_the_bundle_lacks_is_refused(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    (b / "model.int8.portable.onnx").unlink()
    edit_manifest(b, lambda m: m.__setitem__("artifacts", [a for a in m["artifacts"] if a["file"] != "model.int8.portable.onnx"]))
    with pytest.raises(EdgeconvError, match="bundle has no portable INT8 graph"):
        select_backend(read_bundle(b), CPU, "int8", int8_variant="portable")


def test_files_are_hash_checked_by_default(mnist_bundle, tmp_path):
    """select_backend(bundle) without check_hash compares the graph with its sha256 (a deferred bundle has not yet)."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    data = bytearray((b / "model.onnx").read_bytes())
    data[-20] ^= 0x01  # in the initializers: ONNX Runtime still loads it
    (b / "model.onnx").write_bytes(bytes(data))
    bundle = read_bundle(b, defer_hashes=True)
    with pytest.raises(EdgeconvError, match="model.onnx"):
        got = select_backend(bundle, CPU, "fp32")
        got.backend.close()


def test_a_named_backend_without_the_artifact_gives_the_precise_message(mnist_bundle, tmp_path):
    """Named: the bundle's own message (what it has, how to export it); auto: that backend skipped with its reason."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    (b / "model.fp16.onnx").unlink()
    edit_manifest(b, lambda m: m.__setitem__("artifacts", [a for a in m["artifacts"] if a["file"] != "model.fp16.onnx"]))
    bundle = read_bundle(b)
    with pytest.raises(EdgeconvError, match=r"has no onnx fp16 artifact \(it has .*\); export it with --precision fp16"):
        select_backend(bundle, CPU, "fp16")
    with pytest.raises(EdgeconvError, match="no backend can run this bundle") as exc:
        select_backend(bundle, "auto", "fp16")
    assert f"{CPU}: bundle has no onnx fp16 artifact" in str(exc.value)


def test_an_int8_graph_that_fails_the_reference_outputs_here_is_closed_and_fp32_runs_instead(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    ref = b / "reference" / "outputs.npy"
    expected = np.load(ref)
    np.save(ref, -expected)  # the reference now disagrees with every graph's top-1
    _rehash(b, "reference/outputs.npy")
    made = []

    def create(*args, **kwargs):
        be = create_backend(*args, **kwargs)
        made.append(be)
        return be

    got = select_backend(read_bundle(b), CPU, "int8", create=create)
    assert got.backend is None and got.fp32_instead and "INT8 fails `verify` on this CPU" in got.fp32_instead
    assert len(made) == 1 and made[0].session is None  # the INT8 session was released, not left to the garbage collector


def test_a_graph_that_does_not_match_its_manifest_is_refused_and_its_session_released(mnist_bundle, tmp_path):
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m["classes"].append("extra"))  # 11 classes in the manifest, 10 outputs in the graph
    made = []

    def create(*args, **kwargs):
        be = create_backend(*args, **kwargs)
        made.append(be)
        return be

    with pytest.raises(EdgeconvError, match="manifest.json lists 11 classes"):
        select_backend(read_bundle(b), CPU, "fp32", create=create)
    assert len(made) == 1 and made[0].session is None
