"""The admission gate's arithmetic on real Starlette requests (torch-free, no server: `make mutants` runs these per
mutant of runtime/edgeconv_runtime/admission.py). The HTTP behaviour end to end is in test_serve_limits.py."""
import asyncio

import pytest

starlette = pytest.importorskip("starlette")
from starlette.requests import Request  # noqa: E402

from edgeconv_runtime.admission import Admission, Batcher, HTTPError  # noqa: E402
from edgeconv_runtime.serve import ServeConfig  # noqa: E402


def _request(chunks, declared=None) -> Request:
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers, "query_string": b""}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    return Request(scope, receive)


def _gate(cap: int) -> Admission:
    cfg = ServeConfig(bundle="-", max_inflight_body_bytes=cap, max_body_bytes=10 * cap)
    return Admission(cfg, Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=8))


def _read(gate, request):
    return asyncio.run(gate.read_body(request))


def test_a_body_that_exactly_fills_the_in_flight_cap_is_admitted_and_one_byte_more_is_not():
    gate = _gate(1000)
    req = _request([b"x" * 1000], declared=1000)
    assert _read(gate, req) == b"x" * 1000
    assert gate.inflight_bytes == 1000  # held until the response has gone
    with pytest.raises(HTTPError) as exc:
        _read(gate, _request([b"y"], declared=1))
    assert exc.value.status == 503 and "bodies in flight" in exc.value.message
    gate.release_body(req.scope)
    assert gate.inflight_bytes == 0
    gate.shutdown()


def test_declared_bodies_are_charged_once_and_chunked_bodies_chunk_by_chunk():
    gate = _gate(1000)
    declared = _request([b"a" * 300, b"b" * 300], declared=600)
    assert _read(gate, declared) == b"a" * 300 + b"b" * 300
    assert gate.inflight_bytes == 600
    chunked = _request([b"c" * 200, b"d" * 150])  # no Content-Length: charged as it arrives
    assert len(_read(gate, chunked)) == 350
    assert gate.inflight_bytes == 950
    with pytest.raises(HTTPError) as exc:  # 50 bytes left: the second chunk of this one crosses the cap
        _read(gate, _request([b"e" * 40, b"f" * 40]))
    assert exc.value.status == 503
    for req in (declared, chunked):
        gate.release_body(req.scope)
    gate.shutdown()


def test_a_declared_length_over_the_body_limit_is_413_before_reading():
    gate = _gate(1000)
    with pytest.raises(HTTPError) as exc:
        _read(gate, _request([b"z"], declared=10 * 1000 + 1))
    assert exc.value.status == 413 and gate.inflight_bytes == 0
    gate.shutdown()


async def _admit_all(batcher, *calls):
    return await asyncio.gather(*(batcher.admit(n, wait) for n, wait in calls), return_exceptions=True)


def test_the_queue_refuses_more_images_than_it_can_ever_hold_and_a_full_queue_without_waiting():
    from edgeconv_runtime.admission import QueueFull

    b = Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=8)

    async def too_many():  # 9 images never fit: refused at once, not after the request's wait
        task = asyncio.ensure_future(b.admit(9, wait_s=60.0))
        for _ in range(3):
            await asyncio.sleep(0)
        assert task.done() and not b.waiters
        task.result()

    with pytest.raises(QueueFull):
        asyncio.run(too_many())
    assert b.pending == 0
    asyncio.run(b.admit(8, wait_s=0.0))
    assert b.pending == 8
    with pytest.raises(QueueFull):  # full, and no wait asked for: refused at once
        asyncio.run(b.admit(1, wait_s=0.0))
    b.release(8)
    assert b.pending == 0


def test_a_waiting_request_gets_the_places_a_finished_one_releases_first_come_first_served():
    from edgeconv_runtime.admission import QueueFull

    async def scenario():
        b = Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=8)
        await b.admit(8, 0.0)
        first = asyncio.ensure_future(b.admit(3, 2.0))
        second = asyncio.ensure_future(b.admit(6, 0.05))
        await asyncio.sleep(0.01)
        assert b.pending == 8 and len(b.waiters) == 2
        b.release(5)  # 3 in use: the first waiter (3) fits, the second (6) does not
        await first
        assert b.pending == 6
        with pytest.raises(QueueFull):  # its 50 ms pass without 6 free places
            await second
        assert not b.waiters and b.pending == 6

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue():
    """A client that goes away while it waits (or the request deadline) must not keep a place in line or in the queue."""

    async def scenario():
        b = Batcher(model=None, max_batch=4, max_delay_s=0.0, max_queue=8)
        await b.admit(8, 0.0)
        waiting = asyncio.ensure_future(b.admit(2, 10.0))
        await asyncio.sleep(0.01)
        assert len(b.waiters) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not b.waiters and b.pending == 8

    asyncio.run(scenario())


def test_with_the_queue_full_a_body_over_64_kb_is_refused_before_it_is_read_and_a_small_one_is_read():
    """Small bodies are read (their request may still find a place while it decodes); bigger ones are not buffered
    for a queue that has no room."""
    gate = _gate(10 * 1024 * 1024)
    gate.batcher.pending = gate.batcher.max_queue  # full
    small = b"s" * (64 * 1024)
    assert _read(gate, _request([small], declared=len(small))) == small
    with pytest.raises(HTTPError) as exc:
        _read(gate, _request([small + b"!"], declared=len(small) + 1))
    assert exc.value.status == 503 and exc.value.headers.get("Retry-After") == "1"
    with pytest.raises(HTTPError):  # no Content-Length: its size is unknown, so it is not read either
        _read(gate, _request([b"c"]))
    gate.shutdown()
