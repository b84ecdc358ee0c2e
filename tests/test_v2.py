"""The Open Inference Protocol (KServe v2) routes of the real server, driven by the real tritonclient.http client."""
import base64
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edgeconv_runtime import Model
from test_serve import Server, jpegs

MAX_QUEUE = 8


@pytest.fixture(scope="module")
def v2_server(rgb_bundle):
    s = Server(rgb_bundle, "--max-queue", str(MAX_QUEUE))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(v2_server):
    c = triton.InferenceServerClient(v2_server.url.split("//", 1)[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def name(rgb_bundle):
    return json.loads((rgb_bundle / "manifest.json").read_text())["name"]


def _images(files, binary=True):
    inp = triton.InferInput("image", [len(files)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=np.object_))
    else:  # JSON: each element a base64 string
        inp.set_data_from_numpy(np.array([base64.b64encode(f.read_bytes()) for f in files], dtype=np.object_), binary_data=False)
    return inp


def _v1(url, files, top_k):
    r = httpx.post(url + "/v1/predict", json={"images": [base64.b64encode(f.read_bytes()).decode() for f in files], "top_k": top_k})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_health_and_metadata(client, v2_server, name, rgb_bundle, catsdogs_tiny):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    meta = client.get_model_metadata(name)
    model = Model.load(rgb_bundle)
    c, h, w = model.preprocess.input_shape
    k = len(model.classes)
    backend = httpx.get(v2_server.url + "/v1/model").json()["serving"]["backend"]
    platform = {"onnxruntime-cpu": "onnxruntime_onnx", "openvino-cpu": "openvino"}[backend]  # auto's pick on this CPU
    assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == platform
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}, {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, k]), ("probabilities", "FP32", [-1, k]), ("labels", "BYTES", [-1])]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{name}/versions/2"):
        r = httpx.get(v2_server.url + path)
        assert r.status_code == 404 and set(r.json()) == {"error"} and "\n" not in r.json()["error"], (path, r.text)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [_images(jpegs(catsdogs_tiny, 2)[:1])])
    assert exc.value.status() == "404" and "unknown model 'nope'" in exc.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_answer_as_v1_and_the_runtime(client, v2_server, rgb_bundle, catsdogs_tiny, name, binary):
    files = jpegs(catsdogs_tiny, 4)
    model = Model.load(rgb_bundle)
    want_logits = model.run(model.preprocess_images([str(f) for f in files]))
    outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in ("logits", "probabilities", "labels")]
    res = client.infer(name, [_images(files, binary)], outputs=outputs, request_id="req-7")
    assert res.get_response()["id"] == "req-7" and res.get_response()["model_version"] == "1"
    logits, probs, labels = res.as_numpy("logits"), res.as_numpy("probabilities"), res.as_numpy("labels")
    assert logits.shape == probs.shape == (4, len(model.classes)) and labels.shape == (4,)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)
    v1 = _v1(v2_server.url, files, top_k=len(model.classes))
    for f, p, lab, pred in zip(files, probs, labels, v1):
        direct = model.predict(str(f), top_k=len(model.classes))
        assert (lab.decode() if isinstance(lab, bytes) else lab) == direct.label == pred["top"][0]["label"]
        for t in pred["top"]:
            assert abs(p[t["index"]] - t["probability"]) < 1e-6
        for i, pr in zip(direct.indices, direct.probabilities):
            assert abs(p[i] - pr) < 1e-6


def test_classification_extension_gives_top_k_labels(client, v2_server, catsdogs_tiny, name):
    files = jpegs(catsdogs_tiny, 2)
    res = client.infer(name, [_images(files, binary=False)], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    top = res.as_numpy("probabilities")
    assert top.shape == (2, 2)
    v1 = _v1(v2_server.url, files, top_k=2)
    for row, pred in zip(top, v1):
        got = [e.decode().split(":") for e in row]
        assert [(int(i), lab) for _, i, lab in got] == [(t["index"], t["label"]) for t in pred["top"]]
        assert all(abs(float(v) - t["probability"]) < 1e-5 for (v, _, _), t in zip(got, pred["top"]))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_fp32_tensor(client, rgb_bundle, catsdogs_tiny, name, binary):
    model = Model.load(rgb_bundle)
    x = model.preprocess_images([str(f) for f in jpegs(catsdogs_tiny, 2)])
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    res = client.infer(name, [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary),
                                             triton.InferRequestedOutput("labels", binary_data=binary)])
    np.testing.assert_allclose(res.as_numpy("logits"), model.run(x), rtol=0, atol=1e-5)
    assert [l.decode() if isinstance(l, bytes) else l for l in res.as_numpy("labels")] == [model.classes[i] for i in model.run(x).argmax(1)]
    assert res.as_numpy("probabilities") is None  # only what was asked for


def test_nested_json_tensor_equals_flat(v2_server, rgb_bundle, catsdogs_tiny, name):
    model = Model.load(rgb_bundle)
    x = model.preprocess_images([str(f) for f in jpegs(catsdogs_tiny, 2)])
    got = []
    for data in (x.tolist(), x.ravel().tolist()):
        r = httpx.post(f"{v2_server.url}/v2/models/{name}/versions/1/infer",
                       json={"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], "outputs": [{"name": "logits"}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]
        assert [o["name"] for o in out] == ["logits"] and out[0]["shape"] == [2, len(model.classes)]
        got.append(np.array(out[0]["data"], dtype=np.float32).reshape(out[0]["shape"]))
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[0], model.run(x), rtol=0, atol=1e-5)


def _binary_request(header: dict, tail: bytes) -> tuple:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


def _malformed(jpeg: bytes):
    img = lambda data, **kw: {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data, **kw}]}
    b64 = base64.b64encode(jpeg).decode()
    good_tensor = {"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * (3 * 64 * 64)}
    one = len(jpeg).to_bytes(4, "little") + jpeg
    yield "not json", b"{nope", {}, "not valid JSON"
    yield "not an object", json.dumps([1]).encode(), {}, "JSON object"
    yield "missing inputs", json.dumps({}).encode(), {}, "no inputs"
    yield "empty inputs", json.dumps({"inputs": []}).encode(), {}, "no inputs"
    yield "two inputs", json.dumps({"inputs": [img([b64])["inputs"][0], good_tensor]}).encode(), {}, "exactly one"
    yield "unknown input", json.dumps({"inputs": [{**good_tensor, "name": "x"}]}).encode(), {}, "unknown input 'x'"
    yield "image as FP32", json.dumps(img([b64], datatype="FP32")).encode(), {}, "datatype 'FP32'; it takes BYTES"
    yield "tensor as INT32", json.dumps({"inputs": [{**good_tensor, "datatype": "INT32"}]}).encode(), {}, "datatype 'INT32'; it takes FP32"
    yield "tensor shape", json.dumps({"inputs": [{**good_tensor, "shape": [1, 3, 32, 32]}]}).encode(), {}, "it takes [N, 3, 64, 64]"
    yield "tensor count", json.dumps({"inputs": [{**good_tensor, "shape": [2, 3, 64, 64]}]}).encode(), {}, "but 'data' holds 12288"
    yield "tensor strings", json.dumps({"inputs": [{**good_tensor, "data": ["a"] * (3 * 64 * 64)}]}).encode(), {}, "numbers only"
    yield "shape negative", json.dumps(img([b64], shape=[-1])).encode(), {}, "'shape' must be"
    yield "image count", json.dumps(img([b64], shape=[2])).encode(), {}, "carries 1"
    yield "bad base64", json.dumps(img(["***"])).encode(), {}, "not valid base64"
    yield "not a string", json.dumps(img([12])).encode(), {}, "base64 string"
    yield "not an image", json.dumps(img([base64.b64encode(b"hello").decode()])).encode(), {}, "image"
    yield "no data", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}).encode(), {}, "neither 'data' nor"
    yield "unknown output", json.dumps({**img([b64]), "outputs": [{"name": "boxes"}]}).encode(), {}, "unknown output 'boxes'"
    yield "bad classification", json.dumps({**img([b64]), "outputs": [{"name": "logits", "parameters": {"classification": "2"}}]}).encode(), {}, "classification"
    hdr = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(one)}}]}
    yield ("truncated bytes",) + _binary_request(hdr, one[:-10]) + ("binary_data_size",)
    hdr1 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(one) - 10}}]}
    yield ("element past end",) + _binary_request(hdr1, one[:-10]) + ("runs past",)
    hdr2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 2}}]}
    yield ("length cut",) + _binary_request(hdr2, b"\x01\x00") + ("4-byte length",)
    hdr3 = {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "parameters": {"binary_data_size": 400}}]}
    yield ("fp32 bytes",) + _binary_request(hdr3, b"\x00" * 400) + ("FP32 needs 49152",)
    yield "header length", b"{}", {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length"


def test_malformed_requests_are_400_with_the_protocol_error_body(v2_server, catsdogs_tiny, name):
    jpeg = jpegs(catsdogs_tiny, 2)[0].read_bytes()
    for case, body, headers, needle in _malformed(jpeg):
        r = httpx.post(f"{v2_server.url}/v2/models/{name}/infer", content=body, headers=headers)
        assert r.status_code == 400, (case, r.status_code, r.text)
        err = r.json()
        assert set(err) == {"error"} and needle in err["error"] and "\n" not in err["error"], (case, err)
    assert httpx.get(v2_server.url + "/v2/health/ready").status_code == 200


def test_tritonclient_sees_400_for_a_wrong_datatype(client, name):
    inp = triton.InferInput("input", [1, 3, 64, 64], "FP64")
    inp.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float64))
    with pytest.raises(InferenceServerException) as exc:
        client.infer(name, [inp])
    assert exc.value.status() == "400" and "it takes FP32" in exc.value.message()


def test_a_batch_over_the_queue_limit_is_413_through_v2_and_v1(v2_server, client, catsdogs_tiny, name):
    """More images than --max-queue can never be admitted: 413 naming the limit (a 503 would be retried for ever)."""
    files = jpegs(catsdogs_tiny, 2)[:1] * (MAX_QUEUE + 1)
    with pytest.raises(InferenceServerException) as exc:
        client.infer(name, [_images(files)])
    assert exc.value.status() == "413" and f"--max-queue {MAX_QUEUE}" in exc.value.message(), exc.value.message()
    assert client.infer(name, [_images(files[:MAX_QUEUE])]).as_numpy("logits").shape[0] == MAX_QUEUE
    r = httpx.post(v2_server.url + "/v1/predict", json={"images": [base64.b64encode(f.read_bytes()).decode() for f in files]}, timeout=60)
    assert r.status_code == 413 and f"--max-queue {MAX_QUEUE}" in r.json()["error"], r.text[:300]
    metrics = httpx.get(v2_server.url + "/metrics").text
    assert 'edgeconv_v2_infer_requests_total{status="413"}' in metrics and 'edgeconv_v2_infer_requests_total{status="200"}' in metrics


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb9", b"\xd9\xa3", b"9" * 5000, b"99999999999999999999", b"+5", b"-1", b"5 5", b""],
                         ids=["superscript-2", "1-superscript-1", "arabic-3", "5000-digits", "20-digits", "plus", "minus", "space", "empty"])
def test_header_length_that_is_not_a_plain_number_is_400(v2_server, name, value):
    """Inference-Header-Content-Length must be ASCII digits no larger than the body: Unicode digits (which str.isdigit
    accepts and int() may not) and numbers int() refuses to read are 400 with the protocol's error body, never 500."""
    r = httpx.post(f"{v2_server.url}/v2/models/{name}/infer", content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": value})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], (r.status_code, r.text[:300])


def test_binary_bytes_that_do_not_match_their_shape_are_refused_at_the_first_extra_element(v2_server, name):
    """Shape [1] over 9.6 MB of binary BYTES data (2.4 million empty elements): refused once a second element shows,
    not after walking every one of them on the event loop (which froze the server for seconds)."""
    raw = b"\x00" * 9_600_000
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = httpx.post(f"{v2_server.url}/v2/models/{name}/infer", content=head + raw, headers={"Inference-Header-Content-Length": str(len(head))},
                   timeout=60)
    assert r.status_code == 400 and "more than the 1 element" in r.json()["error"], (r.status_code, r.text[:300])
    assert httpx.get(v2_server.url + "/healthz").status_code == 200


def test_max_json_mb_applies_to_v2(v2_server, catsdogs_tiny, name):
    """A 9 MiB JSON request is over the default --max-json-mb 8 (and under --max-body-mb 10): 413 on v2 as on v1, from
    the declared sizes, before the body is read, whether the whole body is JSON or only its header part (binary tensor
    data extension). Sent on a raw socket without its body: the answer must come from the headers alone."""
    from test_serve_limits import raw

    size = 9 * 2**20
    for path, extra in ((f"/v2/models/{name}/infer", b""), (f"/v2/models/{name}/infer", b"Inference-Header-Content-Length: %d\r\n" % size),
                        ("/v1/predict", b"")):
        head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                % (path.encode(), size, extra))
        status, _ = raw(v2_server.url, head, read_timeout=30)
        assert status == 413, (path, extra, status)
    b64 = base64.b64encode(jpegs(catsdogs_tiny, 2)[0].read_bytes()).decode()
    doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}], "parameters": {"pad": "x" * (2 * 2**20)}}
    r = httpx.post(f"{v2_server.url}/v2/models/{name}/infer", json=doc, timeout=60)  # under the limit: served
    assert r.status_code == 200, r.text[:300]
