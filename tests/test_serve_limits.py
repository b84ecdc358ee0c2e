"""Server limits against a real server subprocess on loopback: JSON nesting, declared body size, slow bodies and
headers, huge headers, and /metrics counting every status (5xx included)."""
import re
import socket
import time

import httpx
import pytest

from test_serve import Server


@pytest.fixture(scope="module")
def limited(mnist_bundle):
    s = Server(mnist_bundle, "--max-body-mb", "1", "--body-timeout-s", "1.5", "--header-timeout-s", "1.5", "--max-header-kb", "8")
    try:
        yield s
    finally:
        s.stop()


def raw(url: str, head: bytes, body_chunks=(), pause: float = 0.0, read_timeout: float = 10.0) -> tuple:
    """Sends a hand-made request on a raw socket; returns (status or None, seconds until the answer or the close)."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=read_timeout)
    t0 = time.perf_counter()
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection: what we wanted
                break
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not part:
                break
            data += part
        m = re.match(rb"HTTP/1\.1 (\d+)", data)
        return (int(m.group(1)) if m else None), time.perf_counter() - t0
    finally:
        sock.close()


def metric(url: str, status: int) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf'^edgeconv_http_responses_total\{{status="{status}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_deeply_nested_json_is_400_on_v1_and_v2(limited):
    for depth in (100, 5000, 200_000):
        r = httpx.post(limited.url + "/v1/predict", content=b"[" * depth, headers={"content-type": "application/json"})
        assert r.status_code == 400, (depth, r.status_code, r.text[:200])
        r = httpx.post(limited.url + "/v2/models/mnist/infer", content=b'{"inputs":' + b"[" * depth)
        assert r.status_code in (400, 404), (depth, r.status_code, r.text[:200])
    name = httpx.get(limited.url + "/v1/model").json()["serving"]["name"]
    r = httpx.post(limited.url + f"/v2/models/{name}/infer", content=b'{"inputs":' + b"[" * 5000)
    assert r.status_code == 400 and "nested" in r.text, r.text[:200]


def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(limited):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 50000000\r\n\r\n")
    status, took = raw(limited.url, head, read_timeout=5)  # not one byte of the body is sent
    assert status == 413 and took < 1.0, (status, took)


def test_slow_body_is_408_within_the_deadline(limited):
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    status, took = raw(limited.url, head, body_chunks=[b"x"] * 40, pause=0.1)  # 1 byte every 0.1 s: 4 s in all
    assert status == 408 and took < 3.0, (status, took)


def test_slow_headers_are_dropped(limited):
    chunks = [bytes([c]) for c in b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40]
    status, took = raw(limited.url, b"", body_chunks=chunks, pause=0.1)
    assert status in (408, None) and took < 3.5, (status, took)


def test_huge_header_is_refused_and_counted(limited):
    before = metric(limited.url, 431)
    # 8 MB is more than loopback buffers hold: before the server lingered after its 431 (reading and dropping the
    # rest), closing with unread bytes reset the connection and the client's send failed, every time (CI saw it at 2 MB)
    for size in (20_000, 2_000_000, 8_000_000):
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        status, _ = raw(limited.url, head, read_timeout=5)
        assert status == 431, (size, status)
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(3000)) + b"\r\n"
    assert raw(limited.url, many, read_timeout=5)[0] == 431
    assert metric(limited.url, 431) == before + 4
    assert httpx.get(limited.url + "/healthz", headers={"x-ok": "a" * 1000}).status_code == 200


def test_a_huge_header_behind_a_pipelined_request_is_refused_without_a_traceback(mnist_bundle):
    """A 431 whose connection still owes an earlier (pipelined) response closes at once, as before the lingering close: a
    half-closed connection made that response's write fail ("Cannot call write() after write_eof()", 5 tracebacks in 5)."""
    server = Server(mnist_bundle, "--max-header-kb", "8")
    try:
        for _ in range(5):
            head = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            assert raw(server.url, head, read_timeout=5)[0] in (200, 431)
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()
    err = server.proc.stderr.read()
    assert "Traceback" not in err and "write_eof" not in err, err[-1000:]


def test_a_5xx_is_counted_in_metrics(mnist_bundle, digit_png):
    server = Server(mnist_bundle, "--timeout-s", "0.000001")
    try:
        r = httpx.post(server.url + "/v1/predict", content=digit_png, headers={"content-type": "image/png"})
        assert r.status_code == 504, r.text
        assert metric(server.url, 504) == 1.0
        assert metric(server.url, 200) >= 1.0  # the /readyz polls: every path is counted
    finally:
        server.stop()


@pytest.fixture(scope="module")
def digit_png():
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(28 * 28) % 256).astype("uint8").reshape(28, 28)).save(buf, format="PNG")
    return buf.getvalue()
