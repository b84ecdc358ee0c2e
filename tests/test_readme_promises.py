"""README promises that had no test (issue 17): /readyz 503 when verify fails, 413 for too many images in one
request, 503 answered before decoding, the Triton repository from the CLI and with TensorRT's platform,
`bench --data` accuracy. (504 past --timeout-s: test_serve_limits; forged engine sidecars and `auto`'s choice:
test_backends.)"""
import base64
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bundle_helpers import copy_bundle, edit_manifest
from edgeconv_runtime import Model
from test_serve import Server


def _digits(mnist_bundle, n: int) -> list:
    """``n`` PNGs of the bundle's real reference digits (repeated as needed)."""
    images = sorted((mnist_bundle / "reference" / "images").iterdir())
    return [images[i % len(images)].read_bytes() for i in range(n)]


def _queue_depth(url: str) -> float:
    return float(re.search(r"^edgeconv_queue_depth (\S+)$", httpx.get(url + "/metrics").text, re.M).group(1))


# ---------------------------------------------------------------------------------------------- server
def test_readyz_is_503_when_verify_fails(mnist_bundle, tmp_path):
    """A consistent bundle whose model drifted from its reference outputs: the server runs, but is not ready."""
    b = copy_bundle(mnist_bundle, tmp_path / "b")
    out = np.load(b / "reference" / "outputs.npy")
    np.save(b / "reference" / "outputs.npy", out + 3e-3)  # outside FP32's max-abs-diff limit, top-1 unchanged
    digest = hashlib.sha256((b / "reference" / "outputs.npy").read_bytes()).hexdigest()
    edit_manifest(b, lambda m: m["files"].update({"reference/outputs.npy": digest}))
    server = Server(b, ready=False)
    try:
        deadline = time.time() + 60
        while (r := httpx.get(server.url + "/readyz")).json()["verify"] is None and time.time() < deadline:
            time.sleep(0.1)
        body = r.json()
        assert r.status_code == 503 and body["status"] == "not ready", body
        assert body["verify"]["ok"] is False and any(p.startswith("max abs diff") for p in body["verify"]["problems"]), body
        assert httpx.get(server.url + "/healthz").status_code == 200  # alive, just not ready
    finally:
        server.kill()


@pytest.fixture(scope="module")
def digit_server(mnist_bundle):
    s = Server(mnist_bundle)
    try:
        yield s
    finally:
        s.kill()


def test_more_than_64_images_in_one_request_is_413(digit_server, mnist_bundle):
    def post(n):
        doc = {"images": [base64.b64encode(png).decode() for png in _digits(mnist_bundle, n)], "top_k": 1}
        return httpx.post(digit_server.url + "/v1/predict", json=doc, timeout=60)

    r = post(64)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 64, r.text[:200]
    r = post(65)
    assert r.status_code == 413 and "65 images in one request" in r.json()["error"], r.text[:200]


def test_a_full_queue_answers_503_before_decoding(mnist_bundle):
    """With the one queue place taken, a body no decoder can read gets 503 + Retry-After, not 400: it was
    refused before anything decoded it. Once the place is free, the same body is decoded and gets 400."""
    server = Server(mnist_bundle, "--max-queue", "1", "--max-batch", "64", "--max-delay-ms", "3000")
    holder = {}
    waiting = threading.Thread(target=lambda: holder.update(r=httpx.post(
        server.url + "/v1/predict", content=_digits(mnist_bundle, 1)[0], headers={"content-type": "image/png"}, timeout=60)))
    garbage = {"content": b"\x89PNG not really an image", "headers": {"content-type": "image/png"}, "timeout": 60}
    try:
        waiting.start()  # held in the queue by the 3 s batching delay
        deadline = time.time() + 30
        while _queue_depth(server.url) < 1:
            assert time.time() < deadline, "the first request never reached the queue"
            time.sleep(0.02)
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/predict", **garbage)
        took = time.perf_counter() - t0
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", (r.status_code, r.text[:200])
        assert took < 2.0, took  # answered at once, not after the queued request's batch
        big = httpx.post(server.url + "/v1/predict", **dict(garbage, content=b"\x89PNG" + b"\0" * 100_000))
        # a body over 64 KB is refused before it is read: 503 and the connection closed (the unread body is not drained)
        assert big.status_code == 503 and big.headers.get("connection") == "close", (big.status_code, dict(big.headers))
        waiting.join(timeout=60)
        assert holder["r"].status_code == 200, holder["r"].text[:200]
        r = httpx.post(server.url + "/v1/predict", **garbage)
        assert r.status_code == 400 and "not a recognised image" in r.json()["error"], r.text[:200]
    finally:
        server.kill()
        waiting.join(timeout=60)


# ---------------------------------------------------------------------------------------------- Triton
def _model_config(path: Path):
    """config.pbtxt parsed with Triton's own generated ModelConfig schema (from tritonclient)."""
    import importlib.util

    from google.protobuf import text_format

    spec = importlib.util.find_spec("tritonclient")
    pb2_path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("model_config_pb2", pb2_path)
    pb2 = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(pb2)
    return text_format.Parse(path.read_text(), pb2.ModelConfig()), pb2


def test_cli_export_format_triton_writes_a_model_repository(mnist_run, tmp_path):
    repo = tmp_path / "repo"
    r = subprocess.run([sys.executable, "-m", "edgeconv", "export", str(mnist_run), "--format", "triton", "--out", str(repo),
                        "--batch-max", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg, pb2 = _model_config(repo / "chollet_mnist" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8 and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert list(cfg.input[0].dims) == [1, 28, 28] and list(cfg.output[0].dims) == [10]
    assert (repo / "chollet_mnist" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(repo / "chollet_mnist" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [cfg.input[0].name] and [o.name for o in sess.get_outputs()] == [cfg.output[0].name]


def test_triton_repository_of_an_engine_uses_tensorrt_plan(mnist_bundle, tmp_path):
    """`--format triton,tensorrt` lays the engine out for Triton's TensorRT backend. The engine file here is a
    placeholder (no GPU needed): the repository writer copies it and never deserializes it."""
    from edgeconv_export.triton import write_triton_repo

    b = copy_bundle(mnist_bundle, tmp_path / "b")
    engine = b"placeholder engine bytes"
    (b / "model.plan").write_bytes(engine)
    art = {"file": "model.plan", "format": "tensorrt", "precision": "fp16", "sha256": hashlib.sha256(engine).hexdigest(),
           "bytes": len(engine), "parity": {}, "details": {}}
    edit_manifest(b, lambda m: m["artifacts"].append(art))
    repo = tmp_path / "repo"
    write_triton_repo(b, repo, precision="fp16", engine=True, max_batch=16)
    mdir = repo / "chollet_mnist"
    cfg, pb2 = _model_config(mdir / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert (mdir / "1" / "model.plan").read_bytes() == engine and not (mdir / "1" / "model.onnx").exists()


# ---------------------------------------------------------------------------------------------- bench
def test_bench_data_reports_the_accuracy_of_the_model_it_timed(rgb_bundle, catsdogs_tiny, tmp_path):
    data = catsdogs_tiny / "test"
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "bench", str(rgb_bundle), "--backend", "onnxruntime-cpu", "--precision", "fp32", "--batch-sizes", "1,4",
                        "--iterations", "3", "--no-e2e", "--data", str(data), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    with Model.load(rgb_bundle, backend="onnxruntime-cpu", precision="fp32") as model:
        files = [(f, label) for label in model.classes for f in sorted((data / label).iterdir())]
        right = sum(model.predict(str(f)).label == label for f, label in files)
    assert len(files) == 32
    for row in rows:
        assert row["accuracy"] == pytest.approx(right / len(files), abs=1e-9), row
