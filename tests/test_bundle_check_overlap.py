"""Issue 24 §3, the cost of the check on cold start: Model.load compares every listed file with its sha256 on
background threads while ONNX Runtime builds its session, and joins them before it returns, so a bundle that
fails them is still refused by Model.load (and so by predict, serve, stream and bench) before a single inference,
with the same one-line error as when every file was hashed first.
"""
import re
import threading
from pathlib import Path

import pytest
from bundle_helpers import copy_bundle
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime import bundle as bundle_mod
from edgeconv_runtime import model as model_mod
from edgeconv_runtime.bundle import read_bundle


@pytest.fixture
def bundle(mnist_bundle, tmp_path) -> Path:
    return copy_bundle(mnist_bundle, tmp_path / "b")


@pytest.fixture(autouse=True)
def first_start(monkeypatch):
    """A first start: no stamps from this process or an earlier one, every file is hashed."""
    monkeypatch.setenv(bundle_mod.VERIFY_CACHE_ENV, "off")
    bundle_mod._verified.clear()
    yield
    bundle_mod._verified.clear()


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def backends_made(monkeypatch) -> list:
    made = []
    real = model_mod.create_backend

    def create(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model_mod, "create_backend", create)
    return made


def test_the_graph_is_checked_before_the_backend_parses_it_and_the_rest_while_it_starts(bundle, monkeypatch):
    """The graph handed to ONNX Runtime has matched its sha256 before the backend is created (nothing unchecked is
    parsed); every other file's comparison waits here until the backend is being created (it would wait 20 s, then
    fail, were they still done first); every listed file is compared."""
    starting = threading.Event()
    real_create = model_mod.create_backend

    def create(*args, **kwargs):
        starting.set()
        return real_create(*args, **kwargs)

    waited, checked, graph_before_backend = [], [], []
    real_check = bundle_mod.Bundle.check_file

    def check(self, rel, path, expected):
        if rel == "model.onnx":
            real_check(self, rel, path, expected)
            graph_before_backend.append(not starting.is_set())
        else:
            waited.append(starting.wait(20))
            real_check(self, rel, path, expected)
        checked.append(rel)

    monkeypatch.setattr(model_mod, "create_backend", create)
    monkeypatch.setattr(bundle_mod.Bundle, "check_file", check)
    with Model.load(bundle) as m:
        assert m.bundle._pending is None  # joined before Model.load returned
        listed = set(m.bundle.listed())
    assert graph_before_backend == [True]
    assert waited and all(waited)
    assert sorted(checked) == sorted(listed) and "model.fp16.onnx" in listed and "reference/inputs.npy" in listed


@pytest.mark.parametrize("at", [0, 4096, -1])
def test_a_flipped_byte_in_the_graph_to_load_is_refused_before_any_backend_reads_it(bundle, monkeypatch, at):
    made = backends_made(monkeypatch)
    flip_byte(bundle / "model.onnx", at)
    with pytest.raises(EdgeconvError) as info:
        Model.load(bundle)
    assert str(info.value).startswith("model.onnx in ") and "does not match its sha256" in str(info.value)
    assert made == []


def test_a_flipped_byte_in_an_artifact_not_loaded_is_refused(bundle, monkeypatch):
    made = backends_made(monkeypatch)
    flip_byte(bundle / "model.fp16.onnx", 100)
    with pytest.raises(EdgeconvError, match=r"^model\.fp16\.onnx in .* does not match its sha256"):
        Model.load(bundle, precision="fp32")
    assert len(made) == 1 and made[0].session is None  # started beside the hashes, closed when one failed


def test_the_first_failure_in_manifest_order_is_the_error(bundle):
    listed = list(read_bundle(bundle, check_hash=False).listed())
    first, later = listed[0], listed[-1]
    flip_byte(bundle / later, -1)
    flip_byte(bundle / first, -1)
    bundle_mod._verified.clear()
    with pytest.raises(EdgeconvError, match=f"^{re.escape(first)} in "):
        Model.load(bundle)


def test_read_bundle_still_hashes_every_file_before_it_returns(bundle):
    flip_byte(bundle / "reference" / "labels.npy", -1)
    with pytest.raises(EdgeconvError, match="labels.npy in .* does not match its sha256"):
        read_bundle(bundle)
    deferred = read_bundle(bundle, defer_hashes=True)  # returns at once: the comparisons are under way
    with pytest.raises(EdgeconvError, match="labels.npy in .* does not match its sha256"):
        deferred.path("reference/labels.npy")  # a file handed out to be read waits for them
    deferred = read_bundle(bundle, defer_hashes=True)
    for _ in range(2):  # a failure is not forgotten once raised
        with pytest.raises(EdgeconvError, match="labels.npy in .* does not match its sha256"):
            deferred.wait_checked()


def test_deferred_or_not_a_tampered_file_is_the_error_before_an_unlisted_one(bundle):
    original = (bundle / "model.int8.onnx").read_bytes()
    flip_byte(bundle / "model.int8.onnx", -1)
    (bundle / "extra.bin").write_bytes(b"x")
    for defer in (False, True):
        bundle_mod._verified.clear()
        with pytest.raises(EdgeconvError, match="model.int8.onnx in .* does not match its sha256"):
            read_bundle(bundle, defer_hashes=defer)
    (bundle / "model.int8.onnx").write_bytes(original)  # with no file failing its sha256, the unlisted one is the error
    for defer in (False, True):
        bundle_mod._verified.clear()
        with pytest.raises(EdgeconvError, match="^extra.bin in .* is not listed in its manifest.json"):
            read_bundle(bundle, defer_hashes=defer)


def test_check_hash_off_starts_no_hashing(bundle, monkeypatch):
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: pytest.fail(f"hashed {p}"))
    with Model.load(bundle, check_hash=False) as m:
        assert m.bundle._pending is None


@pytest.mark.parametrize("tampered", [False, True])
def test_a_graph_still_queued_is_hashed_on_the_loading_thread_not_waited_for(bundle, monkeypatch, tampered):
    """The hash threads are busy with bigger files (held here): the graph the backend needs next is hashed by the
    thread that asks for it, at once, and its mismatch raised there."""
    release = threading.Event()
    where = {}
    real_check = bundle_mod.Bundle.check_file

    def check(self, rel, path, expected):
        if threading.current_thread().name.startswith("edgeconv-hash"):
            release.wait(20)
        where[rel] = threading.current_thread().name
        return real_check(self, rel, path, expected)

    monkeypatch.setattr(bundle_mod.Bundle, "check_file", check)
    if tampered:
        flip_byte(bundle / "model.int8.trt.onnx", -1)
    b = read_bundle(bundle, defer_hashes=True)
    try:
        if tampered:
            with pytest.raises(EdgeconvError, match="model.int8.trt.onnx in .* does not match its sha256"):
                b.artifact("onnx", "int8", variant="tensorrt")
        else:
            path, a = b.artifact("onnx", "int8", variant="tensorrt")
            assert a.file == "model.int8.trt.onnx" == path.name
        assert where["model.int8.trt.onnx"] == threading.main_thread().name and not release.is_set()
    finally:
        release.set()
    if tampered:
        with pytest.raises(EdgeconvError, match="model.int8.trt.onnx in .* does not match its sha256"):
            b.wait_checked()
    else:
        b.wait_checked()
        assert set(where) == set(b.listed())
