"""Admission control shared by /v1 and /v2: the batching queue, body limits, decoding and the request deadline.

Every request goes through the same gate in the same order: its body is admitted (size and bytes in flight) before
a byte of it is buffered, its images are admitted to the queue before any decoding, decoding runs in a thread pool
and inference in batches, all within --timeout-s. Refusals are ``HTTPError`` with the status and a one-line reason.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from .errors import EdgeconvError, ImageTooLarge
from .preprocess import declared_pixels

log = logging.getLogger("edgeconv.serve")

# A request decodes in the big-image lane (its own thread) when its images carry more bytes than LARGE_PAYLOAD or their
# headers declare more pixels than LARGE_PIXELS (about Full HD): a 36-megapixel PNG of flat colour is a 100 KB file.
LARGE_PAYLOAD = 1024 * 1024
LARGE_PIXELS = 2_000_000
LARGE_LANE_DEPTH = 4  # requests in the big-image lane (decoding or waiting for it); beyond it 503, not a 504 after --timeout-s
INLINE_BYTES = 64 * 1024  # request bodies up to this are parsed on the event loop; larger ones in a decode thread
CLOSE = {"Connection": "close"}  # the body was not (fully) read: do not keep the connection for another request
RETRY = {"Retry-After": "1"}


class QueueFull(Exception):
    pass


class Batcher:
    """Gathers queued requests into batches for one inference thread."""

    def __init__(self, model, max_batch: int, max_delay_s: float, max_queue: int, on_batch=None):
        self.model = model
        self.max_batch = max(1, max_batch)
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.pending = 0  # images admitted: decoding, queued or in inference
        self.waiters: collections.deque = collections.deque()  # (images, future) waiting for places, oldest first
        self.freed = 0  # releases so far: the line moves while this grows
        self.batch_s = 0.0  # how long the last inference took: places are freed a batch at a time
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeconv-infer")
        self.on_batch = on_batch
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def admit(self, n: int, wait_s: float, max_wait_s: Optional[float] = None) -> None:
        """Admission control: take ``n`` queue places before any decoding, or raise QueueFull. Rejecting before the
        decode keeps an overloaded server's CPU for the requests it accepted and its memory bounded by the queue, not by
        the number of connections. A request that finds the queue full waits in line for places, first come first served:
        it gets QueueFull once ``wait_s`` (or two inferences, when they take longer) pass without a place freed (the
        queue is stuck) or after ``max_wait_s`` in all (default ``wait_s``). The wait costs no CPU, so clients that retry at once on 503 are slowed to the pace the
        server can serve instead of spinning it with rejections; and while the queue moves they keep their turn however
        slow the server is (a busy machine), instead of a 503 after a fixed wait that only a fast server can meet."""
        if n > self.max_queue:
            raise QueueFull()
        if not self.waiters and self.pending + n <= self.max_queue:
            self.pending += n
            return
        if wait_s <= 0:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        entry = (n, loop.create_future())
        self.waiters.append(entry)
        give_up = loop.time() + max(wait_s, max_wait_s or 0.0)
        try:
            while True:
                freed = self.freed
                try:
                    await asyncio.wait_for(asyncio.shield(entry[1]), min(max(wait_s, 2 * self.batch_s), give_up - loop.time()))
                    return
                except asyncio.TimeoutError:
                    if entry[1].done():  # granted at the last moment: keep it
                        return
                    if self.freed == freed or loop.time() >= give_up:
                        self.waiters.remove(entry)
                        raise QueueFull()
        except asyncio.CancelledError:
            if entry[1].done():
                self.release(n)
            else:
                self.waiters.remove(entry)
            raise

    def release(self, n: int) -> None:
        self.pending -= n
        self.freed += 1
        while self.waiters and self.pending + self.waiters[0][0] <= self.max_queue:
            k, fut = self.waiters.popleft()
            if not fut.done():
                self.pending += k
                fut.set_result(True)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Queue a reserved batch of images for inference; returns its logits."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            x, fut = await self.queue.get()
            items, count = [(x, fut)], len(x)
            deadline = loop.time() + self.max_delay_s
            while count < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nx, nf = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if count + len(nx) > self.max_batch:  # would overflow: it starts the next batch
                    await self._run(items, count, loop)
                    items, count = [], 0
                    deadline = loop.time() + self.max_delay_s
                items.append((nx, nf))
                count += len(nx)
            if items:
                await self._run(items, count, loop)

    async def _run(self, items, count, loop) -> None:
        live = [(x, f) for x, f in items if not f.done()]  # callers that timed out are skipped
        if not live:
            return
        batch = np.concatenate([x for x, _ in live]) if len(live) > 1 else live[0][0]
        t0 = loop.time()
        try:
            logits = await loop.run_in_executor(self.executor, self.model.run, batch)
            self.batch_s = loop.time() - t0
        except Exception as exc:  # give every caller the failure instead of hanging them
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        if self.on_batch:
            self.on_batch(len(batch))
        i = 0
        for x, f in live:
            if not f.done():
                f.set_result(logits[i : i + len(x)])
            i += len(x)


def whole_number(text: Optional[str]) -> Optional[int]:
    """A header's value as a whole number when it is 1 to 18 ASCII digits, else None. ``str.isdigit`` alone also
    accepts '²' or '١' (which ``int`` refuses or reads), and ``int`` refuses more than 4300 digits."""
    t = (text or "").strip()
    return int(t) if 0 < len(t) <= 18 and t.isascii() and t.isdigit() else None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def json_object(body: bytes, what: str, shape: str) -> dict:
    """The request's JSON object; 400 when it is not JSON, nests too deeply for the parser, or is not an object.

    ``what`` names the body in messages ("body", "request"); ``shape`` shows the object expected. /v1 and /v2 share it.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"{what} is not valid JSON: {str(exc)[:200]}")
    except RecursionError:
        raise HTTPError(400, f"{what} JSON is nested too deeply")
    if not isinstance(doc, dict):
        raise HTTPError(400, f"{what} must be a JSON object: {shape}")
    return doc


class Admission:
    """The gate every inference request passes, whatever its protocol (see the module docstring)."""

    def __init__(self, cfg, batcher: Batcher, on_queue=None):
        self.cfg, self.batcher, self.on_queue = cfg, batcher, on_queue or (lambda depth: None)
        self.inflight_bytes = 0  # body bytes reserved by requests in progress; released when the response has gone
        self.decode_pool = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="edgeconv-decode")
        # requests with big images (LARGE_PAYLOAD bytes or LARGE_PIXELS pixels) decode in their own thread, so that a
        # burst of big photos queues behind itself and not in front of ordinary requests
        self.large_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeconv-decode-large")
        self.large_depth = 0  # requests in the big-image lane

    def shutdown(self) -> None:
        self.decode_pool.shutdown(wait=False)
        self.large_pool.shutdown(wait=False)

    def _reserve_body(self, scope: dict, n: int) -> None:
        if self.inflight_bytes + n > self.cfg.max_inflight_body_bytes:
            raise HTTPError(503, "server busy: too many request bodies in flight; retry shortly", {**RETRY, **CLOSE})
        self.inflight_bytes += n
        scope["edgeconv.body_bytes"] = scope.get("edgeconv.body_bytes", 0) + n

    def release_body(self, scope: dict) -> None:
        """Called when the response has gone: the request's body bytes leave the in-flight total."""
        self.inflight_bytes -= scope.get("edgeconv.body_bytes", 0)

    async def read_body(self, request, limit: Optional[int] = None) -> bytes:
        """The body, with admission before a byte of it is buffered.

        A declared Content-Length over the limit is 413 and a full queue (for a body over 64 KB or of unknown
        length) is 503, both before reading; the body bytes of all requests together stay under
        --max-inflight-body-mb (503); the whole body must arrive within --body-timeout-s (408).
        """
        cfg, batcher = self.cfg, self.batcher
        limit = cfg.max_body_bytes if limit is None else min(limit, cfg.max_body_bytes)
        declared = whole_number(request.headers.get("content-length"))
        if declared is not None and declared > limit:
            raise HTTPError(413, f"body of {declared} bytes exceeds the {limit}-byte limit", CLOSE)
        if (declared is None or declared > 64 * 1024) and batcher.pending >= batcher.max_queue:
            raise HTTPError(503, "server busy: the inference queue is full; retry shortly", {**RETRY, **CLOSE})
        if declared is not None:
            self._reserve_body(request.scope, declared)
        chunks, size = [], 0

        async def receive() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"body exceeds the {limit}-byte limit", CLOSE)
                if declared is None:
                    self._reserve_body(request.scope, len(chunk))
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"the body did not arrive within {cfg.body_timeout_s} s", CLOSE)
        return b"".join(chunks)

    async def parse(self, body: bytes, fn, *args):
        """``fn(body, *args)``: inline for a body up to INLINE_BYTES, else in a decode thread (the big-image lane over
        LARGE_PAYLOAD), so that parsing megabytes of JSON or of binary tensor data never stalls the event loop."""
        if len(body) <= INLINE_BYTES:
            return fn(body, *args)
        pool = self.large_pool if len(body) > LARGE_PAYLOAD else self.decode_pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, body, *args)

    async def infer(self, n: int, prepare, payload) -> np.ndarray:
        """Admission before any decoding, decoding in the pool, batched inference within --timeout-s.

        Raises HTTPError: 413 for more images than --max-queue (never admitted, however long the client retries), 503
        with Retry-After when the queue is full, 413 for an image whose header declares more pixels than the cap, 400
        for other input that does not decode, 504 when decoding plus inference take longer than --timeout-s.
        /v1/predict and the v2 protocol both go through here.
        """
        limit = self.batcher.max_queue
        if n > limit:
            raise HTTPError(413, f"{n} images in one request, more than this server ever admits at once (--max-queue {limit}); "
                                 f"send at most {limit} per request")
        try:
            await self.batcher.admit(n, self.cfg.admit_wait_s, self.cfg.timeout_s)
        except QueueFull:
            raise HTTPError(503, "server busy: the inference queue is full; retry shortly", RETRY)
        self.on_queue(self.batcher.pending)
        try:
            return await asyncio.wait_for(self._decode_and_run(prepare, payload), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"decoding and inference did not finish within {self.cfg.timeout_s} s")
        finally:
            self.batcher.release(n)

    @staticmethod
    def _prepare_light(prepare, payload):
        """``prepare(payload)`` in an ordinary decode thread, or None (nothing decoded) for images that belong in the
        big-image lane: more than LARGE_PAYLOAD bytes, or headers declaring more than LARGE_PIXELS pixels."""
        if isinstance(payload, list) and (sum(len(b) for b in payload) > LARGE_PAYLOAD
                                          or sum(declared_pixels(b) for b in payload) > LARGE_PIXELS):
            return None
        return prepare(payload)

    async def _decode_and_run(self, prepare, payload) -> np.ndarray:
        loop = asyncio.get_running_loop()
        try:
            x = await loop.run_in_executor(self.decode_pool, self._prepare_light, prepare, payload)
            if x is None:  # big images queue behind each other in their own thread, not in front of ordinary requests
                if self.large_depth >= LARGE_LANE_DEPTH:
                    raise HTTPError(503, "server busy: too many big images are waiting to be decoded; retry shortly", RETRY)
                self.large_depth += 1
                try:
                    x = await loop.run_in_executor(self.large_pool, prepare, payload)
                finally:
                    self.large_depth -= 1
        except HTTPError:
            raise
        except EdgeconvError as exc:
            raise HTTPError(413 if isinstance(exc, ImageTooLarge) else 400, str(exc))
        except Exception as exc:  # a decoder failure nothing mapped (Pillow raises many types): still the input's fault
            log.warning("input could not be decoded: %s: %s", type(exc).__name__, str(exc)[:200])
            bomb = type(exc).__name__ == "DecompressionBombError"
            raise HTTPError(413 if bomb else 400, f"image could not be decoded: {type(exc).__name__}: {str(exc)[:200]}")
        return await self.batcher.submit(x)
