"""The real HTTP server on an ephemeral loopback port, driven by a real HTTP client."""
import base64
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from edgeconv_runtime import Model


class Server:
    """`edgeconv-runtime serve` on an ephemeral port, up (/healthz 200) and, with ``ready``, ready (/readyz 200); killed if not."""

    def __init__(self, bundle, *args, ready: bool = True):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeconv_runtime", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self._start(ready)
        except BaseException:
            self.kill()
            raise

    def _start(self, ready: bool) -> None:
        line = self.proc.stdout.readline()  # the global pytest timeout ends a server that never prints it
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        path, deadline = ("/readyz" if ready else "/healthz"), time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"server never answered {path} with 200")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def kill(self) -> None:
        """Whatever state it is in: gone when this returns (for ``finally`` blocks)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def rgb_server(rgb_bundle):
    s = Server(rgb_bundle, "--max-body-mb", "0.05")
    yield s
    s.stop()


def jpegs(catsdogs_tiny, n=8):
    return sorted((catsdogs_tiny / "test" / "cats").iterdir())[: n // 2] + sorted((catsdogs_tiny / "test" / "dogs").iterdir())[: n // 2]


def test_predict_matches_the_runtime(rgb_server, rgb_bundle, catsdogs_tiny):
    model = Model.load(rgb_bundle)
    sha = next(a["sha256"] for a in json.loads((rgb_bundle / "manifest.json").read_text())["artifacts"] if a["file"] == "model.onnx")
    for f in jpegs(catsdogs_tiny, 4):
        r = httpx.post(rgb_server.url + "/v1/predict", content=f.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["sha256"] == sha
        want = model.predict(str(f), top_k=2)
        got = body["predictions"][0]["top"]
        assert [t["label"] for t in got] == want.labels
        assert abs(got[0]["probability"] - want.probabilities[0]) < 1e-6


def test_json_base64_batch_and_png(rgb_server, catsdogs_tiny):
    files = jpegs(catsdogs_tiny, 2)
    r = httpx.post(rgb_server.url + "/v1/predict", json={"images": [base64.b64encode(f.read_bytes()).decode() for f in files], "top_k": 1})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2 and len(r.json()["predictions"][0]["top"]) == 1
    buf = io.BytesIO()
    Image.open(files[0]).save(buf, format="PNG")
    r = httpx.post(rgb_server.url + "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200


@pytest.mark.parametrize("body,ctype,status,needle", [
    (b"hello", "text/plain", 415, "unsupported content type"),
    (b"\xff\xd8\xff\xe0 truncated", "image/jpeg", 400, "cannot decode image"),
    (b"", "image/jpeg", 400, "0 bytes"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"image": "@@@"}', "application/json", 400, "not valid base64"),
    (b'{"images": []}', "application/json", 400, "needs"),
    (b"x" * 60_000, "image/jpeg", 413, "exceeds"),
])
def test_bad_requests_get_the_right_status(rgb_server, body, ctype, status, needle):
    r = httpx.post(rgb_server.url + "/v1/predict", content=body, headers={"content-type": ctype})
    assert r.status_code == status and needle in r.json()["error"]


def test_grayscale_image_to_rgb_model_is_400(rgb_server, catsdogs_tiny):
    buf = io.BytesIO()
    Image.open(jpegs(catsdogs_tiny, 2)[0]).convert("L").save(buf, format="PNG")
    r = httpx.post(rgb_server.url + "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 400 and "grayscale" in r.json()["error"]


def test_health_ready_model_and_metrics(rgb_server):
    assert httpx.post(rgb_server.url + "/v1/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert httpx.get(rgb_server.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(rgb_server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["verify"]["ok"]
    assert httpx.get(rgb_server.url + "/v1/model").json()["classes"] == ["cats", "dogs"]
    text = httpx.get(rgb_server.url + "/metrics").text
    for name in ("edgeconv_requests_total", "edgeconv_request_latency_seconds_bucket", "edgeconv_batch_size_bucket", "edgeconv_queue_depth"):
        assert name in text
    assert 'edgeconv_requests_total{status="415"}' in text


def test_concurrent_requests_are_batched_and_answered_to_the_right_caller(rgb_bundle, catsdogs_tiny):
    server = Server(rgb_bundle, "--max-batch", "16", "--max-delay-ms", "20")
    try:
        model = Model.load(rgb_bundle)
        files = jpegs(catsdogs_tiny, 16)
        expected = {f.name: model.predict(str(f), top_k=2) for f in files}

        def call(f):
            r = httpx.post(server.url + "/v1/predict", content=f.read_bytes(), headers={"content-type": "image/jpeg"}, timeout=30)
            return f.name, r

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, files * 4))
        for name, r in results:
            assert r.status_code == 200
            top = r.json()["predictions"][0]["top"]
            assert top[0]["label"] == expected[name].label
            assert abs(top[0]["probability"] - expected[name].probabilities[0]) < 1e-5
        metrics = httpx.get(server.url + "/metrics").text
        count = float(re.search(r"edgeconv_batch_size_count ([\d.e+]+)", metrics).group(1))
        total = float(re.search(r"edgeconv_batch_size_sum ([\d.e+]+)", metrics).group(1))
        assert total == 64 and count < 64  # some inferences served several callers
    finally:
        assert server.stop() == 0


def test_overload_answers_503_never_500_and_stays_healthy(rgb_bundle, catsdogs_tiny):
    # no admission wait: a request that finds the queue full gets 503 at once (with the default 100 ms wait in line,
    # a fast machine serves all 128 and the overload path is never taken)
    server = Server(rgb_bundle, "--max-batch", "1", "--max-queue", "2", "--admit-wait-ms", "0")
    try:
        body = jpegs(catsdogs_tiny, 2)[0].read_bytes()

        def call(_):
            return httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "image/jpeg"}, timeout=60)

        with ThreadPoolExecutor(64) as pool:
            rs = list(pool.map(call, range(128)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        assert all(r.headers.get("retry-after") == "1" for r in rs if r.status_code == 503)
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()


def test_sigterm_finishes_requests_in_flight(rgb_bundle, catsdogs_tiny):
    # a long batching delay holds all 16 requests in the server's queue when SIGTERM lands
    server = Server(rgb_bundle, "--max-batch", "64", "--max-delay-ms", "3000")
    body = jpegs(catsdogs_tiny, 2)[0].read_bytes()
    results, failures = [], []

    def call():
        try:
            results.append(httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "image/jpeg"}, timeout=60).status_code)
        except httpx.HTTPError as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            depth = re.search(r"^edgeconv_queue_depth (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
            if float(depth.group(1)) == 16:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the 16 requests never all reached the queue")
        rc = server.stop(signal.SIGTERM)
    finally:
        server.kill()
        for t in threads:
            t.join()
    assert rc == 0
    assert not failures, failures
    assert results == [200] * 16, results


def test_fuzzed_bodies_and_headers_never_500(rgb_server, catsdogs_tiny):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = jpegs(catsdogs_tiny, 2)[0].read_bytes()
    seen = {"n": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=st.one_of(st.binary(max_size=2048), st.integers(0, len(good)).map(lambda k: good[:k]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["image", "images", "top_k", "x"]), c, max_size=3),
                                    max_leaves=6).map(lambda o: json.dumps(o).encode())),
        ctype=st.sampled_from(["image/jpeg", "image/png", "image/webp", "application/json", "text/html", "", "image/jpeg; charset=x", "multipart/form-data"]),
    )
    def check(body, ctype):
        seen["n"] += 1
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(rgb_server.url + "/v1/predict", content=body, headers=headers, timeout=30)
        assert r.status_code in (200, 400, 413, 415), (r.status_code, r.text[:200])

    check()
    assert seen["n"] >= 150
    assert httpx.get(rgb_server.url + "/healthz").status_code == 200


def _png_declaring(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h (valid CRC), with one tiny IDAT: the header lies about the canvas."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_fuzzed_forged_images_nesting_headers_and_v2_never_500(rgb_server):
    """Forged canvas sizes, JSON nested to any depth, arbitrary extra headers, on /v1 and /v2: never a 5xx but 503."""
    import struct

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    size = st.integers(1, 2**31 - 1)
    forged = st.one_of(
        st.tuples(size, size).map(lambda wh: _png_declaring(*wh)),
        st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda wh: b"GIF89a" + struct.pack("<HH", *wh) + b"\x00\x00\x00;"),
    )
    nested = st.integers(1, 20000).map(lambda d: (b"[" * d + b"]" * d) if d % 2 else (b'{"image":' * d + b'"x"' + b"}" * d))
    headers = st.dictionaries(st.from_regex(r"x-[a-z]{1,12}", fullmatch=True), st.from_regex(r"[!-~]{1,200}( [!-~]{1,50}){0,2}", fullmatch=True),
                              max_size=8)  # values a client can send (no leading/trailing blanks)
    seen = {"n": 0}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(forged, nested, forged.map(lambda b: json.dumps({"image": base64.b64encode(b).decode()}).encode())),
           extra=headers, route=st.sampled_from(["v1", "v2"]))
    def check(body, extra, route):
        seen["n"] += 1
        if route == "v1":
            ctype = "application/json" if body[:1] in (b"[", b"{") else "image/png"
            r = httpx.post(rgb_server.url + "/v1/predict", content=body, headers={"content-type": ctype, **extra}, timeout=30)
        else:
            doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(body).decode()]}]}
            r = httpx.post(rgb_server.url + "/v2/models/chollet_catsdogs/infer", json=doc, headers=extra, timeout=30)
        assert r.status_code < 500 or r.status_code == 503, (route, r.status_code, r.text[:200])
        assert r.status_code != 200 or route == "v2" or body[:1] not in (b"[",)  # a bare JSON list is never a valid v1 body

    check()
    assert seen["n"] >= 120
    assert httpx.get(rgb_server.url + "/healthz").status_code == 200


def test_triton_repository_config_is_valid_model_config(tmp_path, mnist_run):
    import importlib.util

    import onnx
    from google.protobuf import text_format

    from edgeconv.exporting import ExportRequest, export_run

    repo = tmp_path / "repo"
    export_run(ExportRequest(checkpoint=str(mnist_run), out=str(repo), formats=("triton",), precisions=("fp32", "int8"), batch_max=16))
    mdir = repo / "chollet_mnist"
    spec = importlib.util.find_spec("tritonclient")
    pb2_path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("model_config_pb2", pb2_path)
    pb2 = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(pb2)  # Triton's generated ModelConfig schema
    cfg = text_format.Parse((mdir / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert cfg.name == "chollet_mnist" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    model = onnx.load(str(mdir / "1" / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the INT8 artifact
    inp, out = model.graph.input[0], model.graph.output[0]
    assert cfg.input[0].name == inp.name and cfg.output[0].name == out.name
    assert list(cfg.input[0].dims) == [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    assert list(cfg.output[0].dims) == [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    assert cfg.input[0].data_type == pb2.TYPE_FP32
    labels = (mdir / cfg.output[0].label_filename).read_text().split()
    assert labels == [str(i) for i in range(10)]
