"""The second red-team round against the server (issue 24, serving): an extreme aspect ratio given to a
shorter_center_crop model, big pixels in a small file, requests that can never be admitted. Real servers on loopback,
real PNGs made with Pillow, real HTTP clients."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import resource
import subprocess
import sys
import threading

import httpx
import pytest
from PIL import Image

from test_serve import Server

DATA_LIMIT = 3 * 2**30  # the crop server runs under a 3 GB data limit: a runaway resize fails there, not on the machine


class LimitedServer(Server):
    """`edgeconv-runtime serve` as Server starts it, under RLIMIT_DATA."""

    def __init__(self, bundle, *args, data_bytes: int):
        def limit():
            resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, resource.getrlimit(resource.RLIMIT_DATA)[1]))

        self.proc = subprocess.Popen([sys.executable, "-m", "edgeconv_runtime", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
        try:
            self._start(True)
        except BaseException:
            self.kill()
            raise

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) / 1024


@pytest.fixture(scope="module")
def crop_bundle(tmp_path_factory, rgb_bundle, catsdogs_tiny):
    """The small RGB model imported again with the ImageNet policy: shorter side to 64 / 0.875, centre crop."""
    out = tmp_path_factory.mktemp("crop") / "crop"
    labels = out.parent / "labels.txt"
    labels.write_text("cats\ndogs\n")
    r = subprocess.run([sys.executable, "-m", "edgeconv", "import", str(rgb_bundle / "model.onnx"), "--out", str(out), "--labels", str(labels),
                        "--resize", "shorter_center_crop", "--mean", "0,0,0", "--std", "1,1,1", "--val-data", str(catsdogs_tiny / "test"),
                        "--val-size", "16", "--precision", "fp32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def crop_server(crop_bundle):
    s = LimitedServer(crop_bundle, "--max-queue", "4", data_bytes=DATA_LIMIT)
    yield s
    s.stop()


def _png(size, mode="RGB", color=(200, 30, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _v2_binary(url: str, name: str, blobs: list) -> httpx.Response:
    import json

    raw = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    head = json.dumps({"inputs": [{"name": "image", "shape": [len(blobs)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return httpx.post(f"{url}/v2/models/{name}/infer", content=head + raw, headers={"Inference-Header-Content-Length": str(len(head))},
                      timeout=120)


def test_extreme_aspect_ratio_pngs_are_answered_in_bounded_memory(crop_server):
    """Two PNGs of 1 x 1,000,000 pixels (a few KB): resizing their short side to 73 would make 73 x 73 M images (16 GB
    each). v1 and v2 answer 200 and the server's peak RSS stays far below its 3 GB data limit."""
    pngs = [_png((1, 1_000_000)), _png((1_000_000, 1))]
    assert all(len(p) < 10_000 for p in pngs)
    name = httpx.get(crop_server.url + "/v1/model").json()["serving"]["name"]
    for png in pngs:
        r = httpx.post(crop_server.url + "/v1/predict", content=png, headers={"content-type": "image/png"}, timeout=120)
        assert r.status_code == 200, r.text[:300]
    r = _v2_binary(crop_server.url, name, pngs)
    assert r.status_code == 200 and [o["shape"][0] for o in r.json()["outputs"]] == [2, 2, 2], r.text[:300]
    assert httpx.get(crop_server.url + "/healthz").status_code == 200
    assert crop_server.peak_rss_mb() < 1000, crop_server.peak_rss_mb()


def test_a_batch_larger_than_the_queue_is_413_not_503_forever(crop_server):
    """--max-queue 4: a request of 5 images can never be admitted, whatever the load: 413 naming the limit, on v1 and v2
    (a 503 would have the client retry for ever). 4 images are served."""
    png = _png((80, 60))
    name = httpx.get(crop_server.url + "/v1/model").json()["serving"]["name"]
    body = {"images": [base64.b64encode(png).decode()] * 5}
    r = httpx.post(crop_server.url + "/v1/predict", json=body, timeout=60)
    assert r.status_code == 413 and "--max-queue" in r.json()["error"] and "retry-after" not in r.headers, (r.status_code, r.text[:300])
    r = _v2_binary(crop_server.url, name, [png] * 5)
    assert r.status_code == 413 and "--max-queue" in r.json()["error"], (r.status_code, r.text[:300])
    assert httpx.post(crop_server.url + "/v1/predict", json={"images": body["images"][:4]}, timeout=60).status_code == 200
    assert _v2_binary(crop_server.url, name, [png] * 4).status_code == 200


# ------------------------------------------------------------------ the decode lane comes from the header's pixels
@contextlib.asynccontextmanager
async def _gate(model, bundle):
    """The server's own admission gate (real Batcher, real model) for the length of a block."""
    from edgeconv_runtime.admission import Admission, Batcher
    from edgeconv_runtime.serve import ServeConfig

    batcher = Batcher(model, 8, 0.001, 64)
    gate = Admission(ServeConfig(bundle=str(bundle)), batcher)
    batcher.start()
    try:
        yield gate
    finally:
        await batcher.stop()
        gate.shutdown()


def _lane_of(mnist_bundle, payloads: list) -> list:
    """The decode thread each payload's decoding ran in, through the server's own admission gate (real Batcher, model)."""
    from edgeconv_runtime import Model

    model = Model.load(mnist_bundle)
    threads = []

    def prepare(blobs):
        threads.append(threading.current_thread().name)
        return model.preprocess_images(blobs)

    async def run():
        async with _gate(model, mnist_bundle) as gate:
            for p in payloads:
                logits = await gate.infer(len(p), prepare, p)
                assert logits.shape == (len(p), len(model.classes))

    asyncio.run(run())
    return threads


def test_big_pixels_in_a_small_file_decode_in_the_large_lane(mnist_bundle):
    """A 36-megapixel PNG of ~40 KB is as much decoding as a 36-megapixel photo: it goes to the big-image thread, not to
    the threads of ordinary requests (the lane was chosen by file size). An ordinary digit stays in the ordinary lane."""
    big = _png((6000, 6000), "L", 0)
    assert len(big) < 100_000
    digit = _png((28, 28), "L", 128)
    lanes = _lane_of(mnist_bundle, [[big], [digit], [digit, big]])
    assert lanes[0].startswith("edgeconv-decode-large"), lanes
    assert lanes[1].startswith("edgeconv-decode_"), lanes
    assert lanes[2].startswith("edgeconv-decode-large"), lanes


def test_a_full_big_image_lane_answers_503_at_once(mnist_bundle):
    """The big-image lane holds LARGE_LANE_DEPTH requests (one decoding, the others waiting for its thread); one more is
    503 with Retry-After at once, instead of waiting past --timeout-s for a 504. Ordinary images still pass meanwhile."""
    from edgeconv_runtime import Model
    from edgeconv_runtime.admission import LARGE_LANE_DEPTH, HTTPError

    model = Model.load(mnist_bundle)
    big, digit = _png((3000, 3000), "L", 0), _png((28, 28), "L", 128)
    release = threading.Event()

    def prepare(blobs):
        if threading.current_thread().name.startswith("edgeconv-decode-large"):
            assert release.wait(60)  # the lane's thread is held until the test has seen the lane full
        return model.preprocess_images(blobs)

    async def run():
        async with _gate(model, mnist_bundle) as gate:
            try:
                held = [asyncio.ensure_future(gate.infer(1, prepare, [big])) for _ in range(LARGE_LANE_DEPTH)]
                while gate.large_depth < LARGE_LANE_DEPTH:
                    await asyncio.sleep(0.01)
                with pytest.raises(HTTPError) as exc:
                    await gate.infer(1, prepare, [big])
                assert exc.value.status == 503 and exc.value.headers.get("Retry-After") == "1", exc.value.message
                assert (await gate.infer(1, prepare, [digit])).shape == (1, len(model.classes))  # the ordinary lane is free
                release.set()
                assert all(r.shape == (1, len(model.classes)) for r in await asyncio.gather(*held))
                assert gate.large_depth == 0
            finally:
                release.set()

    asyncio.run(run())


# ------------------------------------------------------------------ goodput on a busy machine
def test_a_waiting_request_keeps_its_turn_while_the_line_moves():
    """On a busy machine the queue drains slower than --admit-wait-ms: a request in line is refused only when no place
    was freed during a whole wait (the server is stuck), not after one fixed wait, so clients that retry at once on 503
    do not burn the CPU the server needs (goodput 0.61 of capacity with the machine's other core busy). The server
    passes --timeout-s as the longest wait in all. Windows of 1 s; every step happens well inside its window."""
    from edgeconv_runtime.admission import Batcher, QueueFull

    wait = 1.0

    async def scenario():
        b = Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=2)
        await b.admit(1, 0.0)
        await b.admit(1, 0.0)  # full: two requests hold one place each
        waiting = asyncio.ensure_future(b.admit(2, wait, 60.0))  # needs both places
        await asyncio.sleep(0.4 * wait)
        b.release(1)  # the line moves (one place freed), not enough for it yet
        await asyncio.sleep(0.9 * wait)  # past its first wait, inside the second
        assert not waiting.done() and len(b.waiters) == 1  # a fixed wait would have refused it by now
        b.release(1)
        await waiting
        assert b.pending == 2 and not b.waiters
        stuck = asyncio.ensure_future(b.admit(1, 0.2, 60.0))  # nothing is freed: refused after one wait
        with pytest.raises(QueueFull):
            await asyncio.wait_for(stuck, 30)
        assert not b.waiters and b.pending == 2

    asyncio.run(scenario())


def test_large_bodies_are_parsed_in_a_decode_thread_not_on_the_event_loop():
    """v1 JSON and every v2 body go through Admission.parse: up to 64 KB inline, bigger in a decode thread (over 1 MB
    the big-image lane's), so walking 9.6 MB of binary BYTES data or megabytes of JSON never stalls other clients."""
    from edgeconv_runtime.admission import INLINE_BYTES, LARGE_PAYLOAD, Admission, Batcher
    from edgeconv_runtime.serve import ServeConfig

    gate = Admission(ServeConfig(bundle="unused"), Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=8))

    async def where(size: int) -> str:
        return await gate.parse(b"x" * size, lambda body: threading.current_thread().name)

    try:
        names = [asyncio.run(where(n)) for n in (INLINE_BYTES, INLINE_BYTES + 1, LARGE_PAYLOAD + 1)]
    finally:
        gate.shutdown()
    assert names[0] == threading.main_thread().name, names
    assert names[1].startswith("edgeconv-decode_") and names[2].startswith("edgeconv-decode-large"), names
    import inspect

    from edgeconv_runtime import serve, v2

    assert "gate.parse(body, _parse_json" in inspect.getsource(serve) and "gate.parse(body, proto.parse" in inspect.getsource(v2)
