"""HTTP inference server: Starlette on uvicorn, dynamic batching, limits, Prometheus metrics.

Concurrent requests are decoded in a thread pool, queued, and gathered into one inference
of up to ``max_batch`` images or ``max_delay_ms``, whichever comes first; each caller gets
its own rows back. A full queue answers 503 with Retry-After instead of growing memory.
Torch-free, like the rest of the runtime.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Optional

from .admission import Admission, Batcher, HTTPError, json_object
from .errors import EdgeconvError
from .prediction import predictions
from .v2 import v2_routes

log = logging.getLogger("edgeconv.serve")

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp"}
INSTALL_HINT = "the server needs `pip install edgeconv-runtime[serve]` (starlette, uvicorn, prometheus-client)"


@dataclass
class ServeConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "auto"
    precision: Optional[str] = None
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images admitted (decoding, queued or in inference); beyond it: 503 before decoding
    max_body_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 10.0
    workers: int = 2  # decode/preprocess threads
    threads: Optional[int] = None  # inference threads
    top_k: int = 5
    body_timeout_s: float = 10.0  # the whole body must arrive within this (408): slow-body clients are dropped
    header_timeout_s: float = 10.0  # request line + headers must arrive within this, then the connection is closed
    max_header_bytes: int = 64 * 1024  # request line + headers; beyond it 431 and the connection is closed
    max_json_bytes: int = 8 * 1024 * 1024  # JSON bodies (also capped by max_body_bytes)
    max_inflight_body_bytes: int = 64 * 1024 * 1024  # bodies being received or held by all requests together (503)
    admit_wait_s: float = 0.1  # a request that finds the queue full waits in line (FIFO) while a place is freed this often, up to timeout_s
    profile: bool = True  # `auto`: run the bundle's tuned profile for this device (edgeconv-runtime tune); --no-profile: ignore it


_LINGER_S, _LINGER_BYTES = 2.0, 16 * 1024 * 1024  # after a 431: how long and how much of the client's rest is read and dropped


def _guarded_protocol(cfg: ServeConfig):
    """uvicorn's HTTP protocol with the limits it lacks: request line + headers capped at --max-header-kb (431) and
    due within --header-timeout-s of the connection or of the previous response (closed), so a client that sends
    headers 1 byte a second or never ends them is dropped. Falls back to h11 with its incomplete-event cap."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        return None

    limit, timeout = cfg.max_header_bytes, cfg.header_timeout_s

    class Guarded(Base):
        # _waiting: from the connection (or the previous response) until a request's headers are complete; the
        # timer closes the connection when it lasts longer than the timeout. _in_head: inside a request's head.
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes, self._in_head, self._waiting, self._head_timer, self._refused = 0, False, True, None, False
            self._linger_left, self._linger_timer = 0, None
            self._arm_head_timer()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(timeout, self._head_too_slow)

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._waiting and not self.transport.is_closing():
                if self._in_head:
                    self._refuse(408, b"request headers did not arrive in time")
                else:
                    self.transport.close()

        def _refuse(self, status: int, msg: bytes) -> None:
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(msg), msg))
            self._refused = True
            self._cancel_head_timer()
            _GuardedHttp.count(status)
            idle = self.cycle is None or self.cycle.response_complete  # no earlier (pipelined) response still to be written
            if status == 431 and idle and self.transport.can_write_eof():
                # a lingering close, as nginx does: half-close, then read and drop what the client is still sending for
                # a moment. Closing with its bytes unread makes the kernel send a reset that can wipe the 431 before
                # the client reads it (seen with a 2 MB header on a loaded machine).
                self.transport.write_eof()
                self._linger_left = _LINGER_BYTES
                self._linger_timer = self.loop.call_later(_LINGER_S, self.transport.close)
            else:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._refused:  # lingering after a 431: dropped, up to a cap
                self._linger_left -= len(data)
                if self._linger_left <= 0:
                    self.transport.close()
                return
            was_in_head = self._in_head
            super().data_received(data)
            if was_in_head and self._in_head:  # the chunk that began the request is bounded by the read size
                self._head_bytes += len(data)
                if self._head_bytes > limit and not self.transport.is_closing():
                    self._refuse(431, b"request line and headers exceed the %d-byte limit" % limit)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = self._waiting = False
            self._cancel_head_timer()
            if self._head_bytes > limit:
                self._refuse(431, b"request line and headers exceed the %d-byte limit" % limit)
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._waiting = True
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            for timer in (getattr(self, "_head_timer", None), getattr(self, "_linger_timer", None)):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._linger_timer = None
            super().connection_lost(exc)

    return Guarded


class _GuardedHttp:
    on_reject = None  # set by create_app: counts the protocol-level refusals in /metrics

    @classmethod
    def count(cls, status: int) -> None:
        if cls.on_reject is not None:
            cls.on_reject(status)




def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return reg, {
        "requests": Counter("edgeconv_requests", "HTTP requests to /v1/predict by status", ["status"], registry=reg),
        "latency": Histogram("edgeconv_request_latency_seconds", "predict latency", registry=reg,
                             buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)),
        "batch": Histogram("edgeconv_batch_size", "images per inference", registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
        "queue": Gauge("edgeconv_queue_depth", "images queued or in inference", registry=reg),
    }


def create_app(cfg: ServeConfig, model=None):
    """The Starlette app; loads the model (or takes one), warms it up and verifies it at startup."""
    try:
        from prometheus_client import Counter, generate_latest
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route
    except ImportError as exc:
        raise EdgeconvError(INSTALL_HINT) from exc
    from .model import Model

    state = {"ready": False, "verify": None}
    registry, m = _metrics()
    model = model or Model.load(cfg.bundle, backend=cfg.backend, precision=cfg.precision, threads=cfg.threads, spin=False,
                                profile=cfg.profile)
    artifact_sha = next((a.sha256 for a in model.bundle.manifest.artifacts if a.file == model.artifact.name), None)
    ident = {"name": model.bundle.name, "sha256": artifact_sha, "precision": model.precision, "backend": model.backend_name}
    batcher = Batcher(model, cfg.max_batch, cfg.max_delay_ms / 1000.0, cfg.max_queue, on_batch=m["batch"].observe)
    gate = Admission(cfg, batcher, on_queue=m["queue"].set)

    def error(status: int, msg: str, headers=None):
        m["requests"].labels(str(status)).inc()
        return JSONResponse({"error": msg}, status_code=status, headers=headers)

    async def predict(request: Request):
        t0 = time.perf_counter()
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in IMAGE_TYPES and ctype != "application/json":
                return error(415, f"unsupported content type {ctype or '(none)'}; send image/jpeg, image/png, image/webp or application/json")
            body = await gate.read_body(request, cfg.max_json_bytes if ctype == "application/json" else None)
            top_k = cfg.top_k
            if ctype == "application/json":
                blobs, top_k = await gate.parse(body, _parse_json, top_k)
            else:
                blobs = [body]
            logits = await gate.infer(len(blobs), model.preprocess_images, blobs)
            preds = [p.to_dict() for p in predictions(logits, model.classes, top_k)]
            m["requests"].labels("200").inc()
            m["latency"].observe(time.perf_counter() - t0)
            return JSONResponse({"model": ident, "predictions": preds})
        except HTTPError as exc:
            return error(exc.status, exc.message, headers=exc.headers)
        except ClientDisconnect:
            m["requests"].labels("499").inc()
            return Response(status_code=499)
        finally:
            m["queue"].set(batcher.pending)

    async def healthz(request: Request):
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request):
        if state["ready"]:
            return JSONResponse({"status": "ready", "verify": state["verify"]})
        return JSONResponse({"status": "not ready", "verify": state["verify"]}, status_code=503)

    async def model_info(request: Request):
        tuned = model.info.get("profile")
        return JSONResponse({**model.bundle.manifest.to_dict(), "serving": {**ident, "threads": getattr(model.backend, "threads", None),
                                                                            "profile": tuned["description"] if tuned else None,
                                                                            "profile_note": model.info.get("profile_note")}})

    async def metrics(request: Request):
        m["queue"].set(batcher.pending)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(None, model.verify)  # also the warm-up
            state["verify"] = {k: report[k] for k in ("ok", "max_abs_diff", "top1_agreement", "problems")}
            state["ready"] = bool(report["ok"])
        except EdgeconvError as exc:
            state["verify"] = {"ok": False, "problems": [str(exc)]}
        yield
        await batcher.stop()
        gate.shutdown()

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/model", model_info),
        Route("/metrics", metrics),
    ]
    routes += v2_routes(model=model, gate=gate, state=state, registry=registry, ident=ident)  # the Open Inference Protocol
    responses = Counter("edgeconv_http_responses", "every HTTP response by status, whatever the path (5xx included)", ["status"],
                        registry=registry)
    _GuardedHttp.on_reject = lambda status: responses.labels(str(status)).inc()
    app = Starlette(routes=routes, lifespan=lifespan)

    async def counted(scope, receive, send):
        """Counts the status of every response that goes out, and a 500 for an exception that escaped before one did."""
        if scope["type"] != "http":
            return await app(scope, receive, send)
        sent = {"status": None}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                responses.labels(str(message["status"])).inc()
            await send(message)

        try:
            await app(scope, receive, send_counted)
        except Exception:
            if sent["status"] is None:
                responses.labels("500").inc()
            raise
        finally:
            gate.release_body(scope)

    counted.model = model  # run_server says what it runs
    return counted




def _parse_json(body: bytes, top_k: int) -> tuple:
    doc = json_object(body, "body", '{"image": "<base64>"} or {"images": ["<base64>", ...]}')
    items = doc.get("images", [doc["image"]] if "image" in doc else None)
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise HTTPError(400, 'JSON body needs "image": "<base64>" or "images": ["<base64>", ...]')
    if len(items) > 64:
        raise HTTPError(413, f"{len(items)} images in one request; send at most 64")
    k = doc.get("top_k", top_k)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise HTTPError(400, '"top_k" must be a whole number >= 1')
    blobs = []
    for i, s in enumerate(items):
        try:
            blobs.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPError(400, f"image {i} is not valid base64")
    return blobs, k


def run_server(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; requests in flight finish before the process exits."""
    try:
        import uvicorn
    except ImportError as exc:
        raise EdgeconvError(INSTALL_HINT) from exc
    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        raise EdgeconvError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}; choose another --port") from exc
    port = sock.getsockname()[1]
    print(f"serving {cfg.bundle} on http://{cfg.host}:{port} (max batch {cfg.max_batch}, max delay {cfg.max_delay_ms} ms)", flush=True)
    running = getattr(app, "model", None)
    if running is not None:
        tuned = running.info.get("profile")
        print(f"running {running.backend_name} {running.precision}" + (f" from the {tuned['description']}" if tuned else "")
              + (f" ({running.info['profile_note']})" if running.info.get("profile_note") else ""), flush=True)
    protocol = _guarded_protocol(cfg)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, backlog=2048,
                                           http=protocol or "h11", h11_max_incomplete_event_size=cfg.max_header_bytes))
    # uvicorn drains requests in flight on SIGTERM, then re-raises the signal to the handler it
    # found: make that a no-op so a graceful stop exits 0 instead of dying by the signal.
    import signal

    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    print("server stopped", flush=True)
