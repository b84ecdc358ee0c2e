"""The v2 protocol's checks and answers (runtime/edgeconv_runtime/v2.py: Protocol), driven in-process with the real RGB
bundle and real cat/dog JPEGs, as the server's infer route drives them (check_model, json_length, parse, then the model
and response). tests/test_v2.py drives the same code through a real server and tritonclient; these run in seconds, so
`make mutants` runs them once per mutant."""
import base64
import json
import struct

import numpy as np
import pytest

from edgeconv_runtime import Model
from edgeconv_runtime.admission import HTTPError
from edgeconv_runtime.prediction import softmax
from edgeconv_runtime.v2 import MAX_IMAGES, OUTPUTS, Protocol, V2Error, _bytes_elements, _flatten, model_name
from test_serve import jpegs
from test_v2 import _malformed

MAX_JSON = 4096


@pytest.fixture(scope="module")
def model(rgb_bundle):
    m = Model.load(rgb_bundle)
    yield m
    m.close()


@pytest.fixture(scope="module")
def proto(model):
    return Protocol(model, "input", {"backend": "onnxruntime-cpu"}, MAX_JSON)


@pytest.fixture(scope="module")
def photos(catsdogs_tiny):
    return [f.read_bytes() for f in jpegs(catsdogs_tiny, 4)]


def _status(fn, *args) -> tuple:
    try:
        fn(*args)
    except (V2Error, HTTPError) as exc:
        return exc.status, exc.message
    return 200, ""


def _infer(proto, model, body: bytes, headers: dict) -> tuple:
    """What the server's infer route does with a body, minus the network: (JSON header, binary tail)."""
    n = proto.json_length(headers.get("Inference-Header-Content-Length"))
    plan = proto.parse(body, n)
    logits = model.preprocess_images(plan["payload"]) if plan["kind"] == "images" else proto.tensor(plan)
    logits = model.run(logits)
    return proto.response(plan, logits)


def _img_doc(blobs, **kw) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(blobs)], "datatype": "BYTES",
                        "data": [base64.b64encode(b).decode() for b in blobs]}], **kw}


def test_model_name_and_versions(proto, model):
    assert model_name("chollet catsdogs/v1") == "chollet_catsdogs_v1" and model_name("") == "model" and model_name("a.b-c_d") == "a.b-c_d"
    proto.check_model(model.bundle.name, None)
    proto.check_model(model_name(model.bundle.name), "1")
    assert _status(proto.check_model, "other", None)[0] == 404
    status, msg = _status(proto.check_model, model.bundle.name, "2")
    assert status == 404 and "has no version '2'; it has version 1" in msg
    md = proto.metadata()
    assert md["name"] == model_name(model.bundle.name) and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"][1] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}
    assert [o["shape"] for o in md["outputs"]] == [[-1, 2], [-1, 2], [-1]]
    assert Protocol(model, "input", {"backend": "tensorrt"}, MAX_JSON).metadata()["platform"] == "tensorrt_plan"


def test_json_length_is_ascii_digits_up_to_max_json(proto):
    assert proto.json_length(None) is None
    assert proto.json_length(str(MAX_JSON)) == MAX_JSON
    status, msg = _status(proto.json_length, str(MAX_JSON + 1))
    assert status == 413 and f"{MAX_JSON + 1} bytes exceeds the {MAX_JSON}-byte limit" in msg
    assert _status(proto.json_length, "12a")[0] == 400 and _status(proto.json_length, "\u00b2")[0] == 400


def test_parse_splits_the_json_part_from_the_binary_tail(proto, photos):
    one = struct.pack("<I", len(photos[0])) + photos[0]
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(one)}}]}).encode()
    plan = proto.parse(head + one, len(head))
    assert plan["kind"] == "images" and plan["payload"] == [photos[0]] and plan["n"] == 1 and plan["id"] is None
    status, msg = _status(proto.parse, head, len(head) + 1)
    assert status == 400 and f"must be a whole number <= the body's {len(head)} bytes" in msg
    doc = json.dumps(_img_doc(photos[:2], id="r-7")).encode()
    plan = proto.parse(doc, len(doc))  # the whole body is JSON: a length equal to the body's is fine
    assert plan["n"] == 2 and plan["id"] == "r-7" and plan["payload"] == photos[:2]


def test_every_malformed_request_is_a_400_with_one_line(proto, model, photos):
    for case, body, headers, needle in _malformed(photos[0]):
        try:
            _infer(proto, model, body, headers)
        except (V2Error, HTTPError) as exc:
            assert exc.status == 400 and needle in exc.message and "\n" not in exc.message, (case, exc.status, exc.message)
        except Exception as exc:  # an undecodable image: the server's decode step turns the runtime's error into a 400
            assert case == "not an image" and needle in str(exc), (case, exc)
        else:
            pytest.fail(f"{case}: accepted")


@pytest.mark.parametrize("doc, needle", [
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "parameters": []}, "'parameters' must be an object"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "id": 5}, "'id' must be a string"),
    ({"inputs": ["image"]}, "each input must be an object"),
    ({"inputs": [{"name": "image", "shape": [], "datatype": "BYTES", "data": []}]}, "'shape' must be a list"),
    ({"inputs": [{"name": "image", "shape": [True], "datatype": "BYTES", "data": ["x"]}]}, "'shape' must be a list"),
    ({"inputs": [{"name": "image", "shape": "1", "datatype": "BYTES", "data": ["x"]}]}, "'shape' must be a list"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"], "parameters": 3}]}, "'parameters' must be an object"),
    ({"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["x", "y"]}]}, "it takes [N] or [N, 1]"),
    ({"inputs": [{"name": "image", "shape": [1, 1, 1], "datatype": "BYTES", "data": ["x"]}]}, "it takes [N] or [N, 1]"),
    ({"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}, "has no images"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": "eA=="}]}, "'data' must be a list"),
    ({"inputs": [{"name": "input", "shape": [0, 3, 64, 64], "datatype": "FP32", "data": []}]}, "with N >= 1"),
    ({"inputs": [{"name": "input", "shape": [1, 3, 64], "datatype": "FP32", "data": []}]}, "with N >= 1"),
    ({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": {"a": 1}}]}, "'data' must be a list"),
])
def test_more_malformed_requests(proto, doc, needle):
    body = json.dumps(doc).encode()
    status, msg = _status(proto.parse, body, None)
    assert status == 400 and needle in msg, (status, msg)


def test_binary_data_must_match_its_declared_size_and_not_come_with_data(proto, photos):
    one = struct.pack("<I", len(photos[0])) + photos[0]
    inp = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"], "parameters": {"binary_data_size": len(one)}}
    status, msg = _status(proto.plan, {"inputs": [inp]}, one)
    assert status == 400 and "has both 'data' and binary data" in msg
    inp = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photos[0]).decode()]}
    status, msg = _status(proto.plan, {"inputs": [inp]}, one)
    assert status == 400 and f"carries {len(one)} binary bytes but input 'image' declares no binary_data_size" in msg
    inp = {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": True}}
    assert "binary_data_size True does not match" in _status(proto.plan, {"inputs": [inp]}, b"\x00")[1]
    inp = {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "parameters": {"binary_data_size": 4 * 3 * 64 * 64}}
    plan = proto.plan({"inputs": [inp]}, np.ones((1, 3, 64, 64), "<f4").tobytes())
    assert plan["kind"] == "tensor" and plan["n"] == 1
    assert np.array_equal(proto.tensor(plan), np.ones((1, 3, 64, 64), np.float32))


def test_binary_bytes_elements_stop_at_the_declared_count():
    raw = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert _bytes_elements(raw, "w", 2) == [b"ab", b""]
    with pytest.raises(V2Error, match="holds more than the 1 element its shape"):
        _bytes_elements(raw, "w", 1)
    with pytest.raises(V2Error, match="holds more than the 2 elements its shape"):
        _bytes_elements(raw + struct.pack("<I", 0), "w", 2)
    assert _bytes_elements(struct.pack("<I", 3) + b"abc", "w", 1) == [b"abc"]  # an element ending exactly at the end
    with pytest.raises(V2Error, match="runs past"):
        _bytes_elements(struct.pack("<I", 4) + b"abc", "w", 1)
    with pytest.raises(V2Error, match="ends inside an element's 4-byte length"):
        _bytes_elements(b"\x01\x00\x00", "w", 1)
    assert _bytes_elements(b"", "w", 1) == []


def test_flatten_is_row_major_over_any_nesting():
    assert _flatten([[1, [2, 3]], [], [[4]], 5], "w") == [1, 2, 3, 4, 5]
    assert _flatten([], "w") == []
    with pytest.raises(V2Error, match="must be a list"):
        _flatten(3, "w")


def test_image_count_limits(proto, photos):
    doc = _img_doc([photos[0]] * MAX_IMAGES)
    plan = proto.plan(doc, b"")
    assert plan["n"] == MAX_IMAGES
    status, msg = _status(proto.plan, _img_doc([photos[0]] * (MAX_IMAGES + 1)), b"")
    assert status == 413 and f"{MAX_IMAGES + 1} images in one request; send at most {MAX_IMAGES}" in msg
    nx1 = {"inputs": [{**_img_doc(photos[:2])["inputs"][0], "shape": [2, 1]}]}
    assert proto.plan(nx1, b"")["payload"] == photos[:2]
    nested = {"inputs": [{**_img_doc(photos[:2])["inputs"][0], "shape": [2, 1]}]}
    nested["inputs"][0]["data"] = [[d] for d in nested["inputs"][0]["data"]]
    assert proto.plan(nested, b"")["payload"] == photos[:2]
    raw = b"".join(struct.pack("<I", len(p)) + p for p in photos[:2])
    inp = {"name": "image", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    status, msg = _status(proto.plan, {"inputs": [inp]}, raw)
    assert status == 400 and "has shape [3] (3 elements) but carries 2" in msg


def test_a_tensor_must_be_finite_numbers_of_its_shape(proto):
    base = {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32"}
    flat = [0.5] * (3 * 64 * 64)
    x = proto.tensor(proto.plan({"inputs": [{**base, "data": flat}]}, b""))
    assert x.dtype == np.float32 and x.shape == (1, 3, 64, 64) and x.flags["C_CONTIGUOUS"] and float(x.max()) == 0.5
    for bad, needle in (([True] * len(flat), "numbers only"), (flat[:-1], "but 'data' holds 12287"),
                        ([float("nan")] + flat[1:], "NaN or infinite"), ([1e39] + flat[1:], "NaN or infinite")):
        status, msg = _status(proto.tensor, proto.plan({"inputs": [{**base, "data": bad}]}, b""))
        assert status == 400 and needle in msg, (needle, msg)
    raw = np.full((1, 3, 64, 64), np.inf, "<f4").tobytes()
    plan = proto.plan({"inputs": [{**base, "parameters": {"binary_data_size": len(raw)}}]}, raw)
    assert "NaN or infinite" in _status(proto.tensor, plan)[1]


@pytest.mark.parametrize("outputs, params, needle", [
    ([], {}, "non-empty list"), ({"name": "logits"}, {}, "non-empty list"), (None, {"binary_data_output": 1}, "true or false"),
    ([{"name": "logits"}, {"name": "logits"}], {}, "asked for twice"), (["logits"], {}, "unknown output None"),
    ([{"name": "logits", "parameters": [1]}], {}, "'parameters' must be an object"),
    ([{"name": "logits", "parameters": {"binary_data": "yes"}}], {}, "'binary_data' must be true or false"),
    ([{"name": "logits", "parameters": {"classification": -1}}], {}, "'classification' must be a whole number >= 0"),
    ([{"name": "logits", "parameters": {"classification": True}}], {}, "'classification' must be a whole number >= 0"),
    ([{"name": "labels", "parameters": {"classification": 1}}], {}, "not 'labels'"),
])
def test_bad_output_requests(proto, photos, outputs, params, needle):
    doc = _img_doc(photos[:1], parameters=params)
    if outputs is not None:
        doc["outputs"] = outputs
    status, msg = _status(proto.plan, doc, b"")
    assert status == 400 and needle in msg, (status, msg)


def test_answers_are_the_models_own_logits_probabilities_and_labels(proto, model, photos):
    body = json.dumps(_img_doc(photos, id="abc")).encode()
    head, tail = _infer(proto, model, body, {})
    assert tail == b""
    doc = json.loads(head)
    assert doc["model_name"] == model_name(model.bundle.name) and doc["model_version"] == "1" and doc["id"] == "abc"
    assert [o["name"] for o in doc["outputs"]] == list(OUTPUTS)
    want = model.run(model.preprocess_images(photos))
    logits, probs, labels = doc["outputs"]
    assert logits["datatype"] == "FP32" and logits["shape"] == [4, 2]
    np.testing.assert_allclose(np.array(logits["data"]).reshape(4, 2), want, rtol=1e-6)
    np.testing.assert_allclose(np.array(probs["data"]).reshape(4, 2), softmax(want.astype(np.float64)), rtol=1e-6)
    assert labels == {"name": "labels", "datatype": "BYTES", "shape": [4], "data": [model.classes[i] for i in want.argmax(1)]}
    assert [p.label for p in model.predict(photos, top_k=1)] == labels["data"]
    # labels alone, first: the probabilities are computed for them too
    doc2 = json.loads(_infer(proto, model, json.dumps({**_img_doc(photos), "outputs": [{"name": "labels"}]}).encode(), {})[0])
    assert [o["name"] for o in doc2["outputs"]] == ["labels"] and doc2["outputs"][0]["data"] == labels["data"] and "id" not in doc2


def test_binary_outputs_and_the_classification_extension(proto, model, photos):
    want = model.run(model.preprocess_images(photos[:2]))
    doc = {**_img_doc(photos[:2]), "parameters": {"binary_data_output": True}}
    head, tail = _infer(proto, model, json.dumps(doc).encode(), {})
    outs = json.loads(head)["outputs"]
    sizes = [o["parameters"]["binary_data_size"] for o in outs]
    assert sizes[:2] == [2 * 2 * 4, 2 * 2 * 4] and sum(sizes) == len(tail) and all("data" not in o for o in outs)
    np.testing.assert_array_equal(np.frombuffer(tail[:16], "<f4").reshape(2, 2), want)
    np.testing.assert_allclose(np.frombuffer(tail[16:32], "<f4").reshape(2, 2), softmax(want.astype(np.float64)), rtol=1e-6)
    assert _bytes_elements(tail[32:], "labels", 2) == [model.classes[i].encode() for i in want.argmax(1)]
    doc = {**_img_doc(photos[:2]), "outputs": [{"name": "probabilities", "parameters": {"classification": 5}},
                                              {"name": "logits", "parameters": {"classification": 1, "binary_data": False}}]}
    outs = json.loads(_infer(proto, model, json.dumps(doc).encode(), {})[0])["outputs"]
    probs = softmax(want.astype(np.float64)).astype(np.float32)
    assert outs[0]["datatype"] == "BYTES" and outs[0]["shape"] == [2, 2]  # k capped at the model's 2 classes
    for r in range(2):
        order = np.argsort(-probs[r], kind="stable")
        assert outs[0]["data"][2 * r : 2 * r + 2] == [f"{probs[r, i]:f}:{i}:{model.classes[i]}" for i in order]
        assert outs[1]["data"][r] == f"{want[r].max():f}:{int(want[r].argmax())}:{model.classes[int(want[r].argmax())]}"
    assert outs[1]["shape"] == [2, 1]
