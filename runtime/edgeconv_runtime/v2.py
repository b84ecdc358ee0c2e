"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) next to ``/v1/predict``.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/1]``,
``/v2/models/{name}[/versions/1]/ready`` and ``POST /v2/models/{name}[/versions/1]/infer``.

The model takes ONE of two inputs per request:
- ``image``, BYTES ``[N]`` (or ``[N, 1]``): each element one encoded image (JPEG, PNG, WebP), preprocessed
  here exactly as ``/v1/predict`` does; in JSON each element is a base64 string;
- the ONNX input (``input``), FP32 ``[N, C, H, W]``, already preprocessed; in JSON ``data`` flat or nested.
Outputs: ``logits`` and ``probabilities`` FP32 ``[N, K]``, ``labels`` BYTES ``[N]`` (top-1 class name); all
three when the request names none. Triton's extensions are supported: binary tensor data (the JSON header
followed by raw tensors, ``Inference-Header-Content-Length``; what ``tritonclient`` sends by default) and
classification (an output requested with ``"parameters": {"classification": k}`` answers BYTES ``[N, k]``
of ``"value:index:label"``, highest first). Names follow the Triton repository ``edgeconv export`` writes.

Requests go through the server's own admission control and batcher, like ``/v1/predict``: a JSON part over
--max-json-mb or more images than --max-queue answer 413, a full queue 503 before any decoding, timeouts 504; a body
over 64 KB is parsed in a decode thread, never on the event loop. Errors are the protocol's ``{"error": "..."}``
body: 400 for a malformed request, 404 for an unknown model or version.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import time
from typing import Optional

import numpy as np

from . import __version__
from .admission import Admission, HTTPError, json_object, whole_number
from .backends import REGISTRY
from .prediction import softmax, top_indices

VERSION = "1"
IMAGE_INPUT = "image"
OUTPUTS = ("logits", "probabilities", "labels")
HEADER_LENGTH = "inference-header-content-length"
MAX_IMAGES = 64  # per request, as /v1/predict
# Triton's platform names, as each backend declares its own (triton_platform); ONNX Runtime's is onnxruntime_onnx
PLATFORMS = {name: cls.triton_platform for name, cls in REGISTRY.items() if cls.triton_platform != "onnxruntime_onnx"}


class V2Error(Exception):
    """A request the protocol refuses: ``status`` and the one-line message of its error body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def model_name(name: str) -> str:
    """The name a Triton repository gives the bundle (edgeconv_export.triton.model_name): clients can switch servers."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bytes_elements(raw: bytes, where: str, count: int) -> list:
    """Triton's binary BYTES layout: each element a 4-byte little-endian length, then that many bytes. Refused as soon as
    the data holds more than the ``count`` elements the shape declares (9 MB of zeros are 2.4 million empty elements)."""
    out, i = [], 0
    while i < len(raw):
        if len(out) == count:
            raise V2Error(400, f"{where}: binary BYTES data holds more than the {count} element{'s' if count != 1 else ''} its shape "
                               "declares; make 'shape' count the images sent")
        if i + 4 > len(raw):
            raise V2Error(400, f"{where}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise V2Error(400, f"{where}: binary BYTES element of {n} bytes runs past the tensor's binary_data_size")
        out.append(raw[i : i + n])
        i += n
    return out


def _flatten(data, where: str) -> list:
    """A row-major flat or nested JSON list, flattened."""
    if not isinstance(data, list):
        raise V2Error(400, f"{where}: 'data' must be a list (flat or nested), not {type(data).__name__}")
    flat, stack = [], [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def _encode_bytes(items: list) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


class Protocol:
    """Parses, checks and answers v2 requests for one served model."""

    def __init__(self, model, input_name: str, ident: dict, max_json_bytes: int):
        self.model = model
        self.max_json_bytes = max_json_bytes
        self.name = model.bundle.name
        self.names = {self.name, model_name(self.name)}
        self.public_name = model_name(self.name)
        self.input_name = input_name
        self.chw = tuple(int(d) for d in model.preprocess.input_shape)
        self.classes = list(model.classes)
        self.ident = ident

    # ------------------------------------------------------------------ metadata
    def check_model(self, name: str, version: Optional[str]) -> None:
        if name not in self.names:
            raise V2Error(404, f"unknown model {name!r}; this server serves {self.public_name!r} (GET /v2/models/{self.public_name})")
        if version is not None and version != VERSION:
            raise V2Error(404, f"model {name!r} has no version {version!r}; it has version {VERSION}")

    def metadata(self) -> dict:
        k = len(self.classes)
        return {
            "name": self.public_name,
            "versions": [VERSION],
            "platform": PLATFORMS.get(self.ident.get("backend"), "onnxruntime_onnx"),
            "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.chw]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "labels", "datatype": "BYTES", "shape": [-1]}],
        }

    # ------------------------------------------------------------------ requests
    def json_length(self, header: Optional[str]) -> Optional[int]:
        """The JSON part's length under the binary tensor data extension (None without it, the whole body is JSON):
        400 unless ASCII digits, 413 over --max-json-mb; both known before the body is read."""
        if header is None:
            return None
        n = whole_number(header)
        if n is None:
            raise V2Error(400, f"Inference-Header-Content-Length {header[:40]!r} must be a whole number of bytes in ASCII digits")
        if n > self.max_json_bytes:
            raise V2Error(413, f"JSON header of {n} bytes exceeds the {self.max_json_bytes}-byte limit (--max-json-mb)")
        return n

    def parse(self, body: bytes, json_length: Optional[int]) -> dict:
        """The request's plan (see ``plan``) from its body and JSON part's length; run off the event loop for a large body."""
        if json_length is not None and json_length > len(body):
            raise V2Error(400, f"Inference-Header-Content-Length {json_length} must be a whole number <= the body's {len(body)} bytes")
        n = len(body) if json_length is None else json_length
        return self.plan(json_object(body[:n], "request", '{"inputs": [...]}'), body[n:])

    def plan(self, doc: dict, binary: bytes) -> dict:
        """Check the request; returns what to run: the kind of input, its images or tensor, the outputs to answer."""
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise V2Error(400, f"request has no inputs; send one: {IMAGE_INPUT!r} (BYTES, encoded images) or {self.input_name!r} "
                               f"(FP32 [N, {', '.join(map(str, self.chw))}])")
        if len(inputs) != 1:
            raise V2Error(400, f"request has {len(inputs)} inputs; send exactly one, {IMAGE_INPUT!r} or {self.input_name!r}")
        params = doc.get("parameters", {})
        if not isinstance(params, dict):
            raise V2Error(400, "request 'parameters' must be an object")
        rid = doc.get("id")
        if rid is not None and not isinstance(rid, str):
            raise V2Error(400, "request 'id' must be a string")
        inp = inputs[0]
        if not isinstance(inp, dict):
            raise V2Error(400, "each input must be an object with name, shape, datatype and data")
        name, shape, dtype = inp.get("name"), inp.get("shape"), inp.get("datatype")
        if name not in (IMAGE_INPUT, self.input_name):
            raise V2Error(400, f"unknown input {name!r}; this model takes {IMAGE_INPUT!r} (BYTES) or {self.input_name!r} (FP32)")
        if not isinstance(shape, list) or not shape or not all(_int(d) and d >= 0 for d in shape):
            raise V2Error(400, f"input {name!r}: 'shape' must be a list of whole numbers >= 0, got {shape!r}")
        want = "BYTES" if name == IMAGE_INPUT else "FP32"
        if dtype != want:
            raise V2Error(400, f"input {name!r} has datatype {dtype!r}; it takes {want}")
        raw = self._binary_part(inp, binary)
        if name == IMAGE_INPUT:
            kind, payload = "images", self._images(inp, shape, raw)
            n = len(payload)
        else:
            kind, payload = "tensor", self._tensor_source(inp, shape, raw)
            n = shape[0]
        return {"kind": kind, "payload": payload, "shape": shape, "n": n, "id": rid, "outputs": self._outputs(doc, params)}

    @staticmethod
    def _binary_part(inp: dict, binary: bytes) -> Optional[bytes]:
        p = inp.get("parameters") or {}
        if not isinstance(p, dict):
            raise V2Error(400, f"input {inp.get('name')!r}: 'parameters' must be an object")
        size = p.get("binary_data_size")
        if size is None:
            if binary:
                raise V2Error(400, f"the body carries {len(binary)} binary bytes but input {inp.get('name')!r} declares no binary_data_size")
            if "data" not in inp:
                raise V2Error(400, f"input {inp.get('name')!r} has neither 'data' nor a binary_data_size parameter")
            return None
        if not _int(size) or size != len(binary):
            raise V2Error(400, f"input {inp.get('name')!r}: binary_data_size {size!r} does not match the {len(binary)} binary bytes "
                               "after the JSON header (Inference-Header-Content-Length)")
        if "data" in inp:
            raise V2Error(400, f"input {inp.get('name')!r} has both 'data' and binary data; send one")
        return binary

    def _images(self, inp: dict, shape: list, raw: Optional[bytes]) -> list:
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise V2Error(400, f"input {IMAGE_INPUT!r} has shape {shape}; it takes [N] or [N, 1], one encoded image per element")
        count = int(np.prod(shape))
        if count < 1:
            raise V2Error(400, f"input {IMAGE_INPUT!r} has no images (shape {shape})")
        if count > MAX_IMAGES:
            raise V2Error(413, f"{count} images in one request; send at most {MAX_IMAGES}")
        if raw is not None:
            blobs = _bytes_elements(raw, f"input {IMAGE_INPUT!r}", count)
        else:
            items = _flatten(inp["data"], f"input {IMAGE_INPUT!r}")
            if len(items) != count:  # before any base64 is decoded
                raise V2Error(400, f"input {IMAGE_INPUT!r} has shape {shape} ({count} elements) but carries {len(items)}")
            blobs = []
            for i, s in enumerate(items):
                if not isinstance(s, str):
                    raise V2Error(400, f"input {IMAGE_INPUT!r} element {i} must be a base64 string of an encoded image, not {type(s).__name__}")
                try:
                    blobs.append(base64.b64decode(s, validate=True))
                except (binascii.Error, ValueError):
                    raise V2Error(400, f"input {IMAGE_INPUT!r} element {i} is not valid base64")
        if len(blobs) != count:
            raise V2Error(400, f"input {IMAGE_INPUT!r} has shape {shape} ({count} elements) but carries {len(blobs)}")
        return blobs

    def _tensor_source(self, inp: dict, shape: list, raw: Optional[bytes]):
        if len(shape) != 4 or tuple(shape[1:]) != self.chw or shape[0] < 1:
            raise V2Error(400, f"input {self.input_name!r} has shape {shape}; it takes [N, {', '.join(map(str, self.chw))}] with N >= 1")
        count = int(np.prod(shape))
        if raw is not None:
            if len(raw) != 4 * count:
                raise V2Error(400, f"input {self.input_name!r}: {len(raw)} binary bytes for shape {shape}; FP32 needs {4 * count}")
            return raw
        data = inp["data"]
        if not isinstance(data, list):
            raise V2Error(400, f"input {self.input_name!r}: 'data' must be a list (flat or nested), not {type(data).__name__}")
        return data

    def tensor(self, plan: dict) -> np.ndarray:
        """The FP32 batch of a tensor request (run off the event loop: a JSON tensor is ~150k Python floats)."""
        shape, src = plan["shape"], plan["payload"]
        if isinstance(src, bytes):
            x = np.frombuffer(src, dtype="<f4").reshape(shape)
        else:
            flat = _flatten(src, f"input {self.input_name!r}")
            if len(flat) != int(np.prod(shape)):
                raise V2Error(400, f"input {self.input_name!r} has shape {shape} ({int(np.prod(shape))} elements) but 'data' holds {len(flat)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
                raise V2Error(400, f"input {self.input_name!r}: FP32 'data' must hold numbers only")
            x = np.asarray(flat, dtype=np.float32).reshape(shape)
        if not np.isfinite(x).all():
            raise V2Error(400, f"input {self.input_name!r} holds NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _outputs(self, doc: dict, params: dict) -> list:
        """[(name, binary, classification k or 0)]: the outputs asked for, or all of them."""
        wanted = doc.get("outputs")
        if wanted is None:
            binary = params.get("binary_data_output", False)
            if not isinstance(binary, bool):
                raise V2Error(400, "parameter 'binary_data_output' must be true or false")
            return [(name, binary, 0) for name in OUTPUTS]
        if not isinstance(wanted, list) or not wanted:
            raise V2Error(400, f"'outputs' must be a non-empty list of {{\"name\": ...}} objects naming {', '.join(OUTPUTS)}")
        out, seen = [], set()
        for o in wanted:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in OUTPUTS:
                raise V2Error(400, f"unknown output {name!r}; this model answers {', '.join(OUTPUTS)}")
            if name in seen:
                raise V2Error(400, f"output {name!r} is asked for twice")
            seen.add(name)
            p = o.get("parameters") or {}
            if not isinstance(p, dict):
                raise V2Error(400, f"output {name!r}: 'parameters' must be an object")
            binary, k = p.get("binary_data", False), p.get("classification", 0)
            if not isinstance(binary, bool):
                raise V2Error(400, f"output {name!r}: 'binary_data' must be true or false")
            if not _int(k) or k < 0:
                raise V2Error(400, f"output {name!r}: 'classification' must be a whole number >= 0")
            if k and name == "labels":
                raise V2Error(400, "classification applies to 'logits' or 'probabilities', not 'labels'")
            out.append((name, binary, min(k, len(self.classes))))
        return out

    # ------------------------------------------------------------------ responses
    def response(self, plan: dict, logits: np.ndarray) -> tuple:
        """(JSON header bytes, binary tail) of the answer."""
        logits = logits.astype(np.float32, copy=False)
        probs = None
        outputs, chunks = [], []
        for name, binary, k in plan["outputs"]:
            if name == "labels":
                if probs is None:
                    probs = softmax(logits)
                values, dtype = [self.classes[i] for i in probs.argmax(1)], "BYTES"
                shape = [len(values)]
            else:
                if name == "probabilities" and probs is None:
                    probs = softmax(logits)
                t = logits if name == "logits" else probs.astype(np.float32)
                if k:  # Triton's classification extension: "value:index:label", highest first
                    idx = top_indices(t, k)
                    values = [f"{t[r, i]:f}:{i}:{self.classes[i]}" for r in range(len(t)) for i in idx[r]]
                    dtype, shape = "BYTES", [len(t), k]
                else:
                    values, dtype, shape = t, "FP32", list(t.shape)
            entry = {"name": name, "datatype": dtype, "shape": shape}
            if binary:
                blob = _encode_bytes([v.encode() for v in values]) if dtype == "BYTES" else np.ascontiguousarray(values, dtype="<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                chunks.append(blob)
            else:
                entry["data"] = values if dtype == "BYTES" else values.ravel().tolist()
            outputs.append(entry)
        doc = {"model_name": self.public_name, "model_version": VERSION, "outputs": outputs}
        if plan["id"] is not None:
            doc["id"] = plan["id"]
        return json.dumps(doc).encode(), b"".join(chunks)


def v2_routes(*, model, gate: Admission, state: dict, registry, ident: dict) -> list:
    """Starlette routes of the protocol, wired to the server's own admission gate (batcher, decode pool, limits) and readiness."""
    from prometheus_client import Counter, Histogram
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    proto = Protocol(model, model.bundle.manifest.input.get("name") or "input", ident, gate.cfg.max_json_bytes)
    requests = Counter("edgeconv_v2_infer_requests", "HTTP requests to /v2/models/.../infer by status", ["status"], registry=registry)
    latency = Histogram("edgeconv_v2_request_latency_seconds", "v2 infer latency", registry=registry,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))

    def error(status: int, msg: str, headers=None):
        return JSONResponse({"error": msg}, status_code=status, headers=headers)

    def flag(ok: bool, what: str):
        # health and readiness answer by status code alone: 200 true, 4xx false (the spec); the body says which
        return JSONResponse({what: ok}, status_code=200 if ok else 400)

    async def server_metadata(request: Request):
        return JSONResponse({"name": "edgeconv-runtime", "version": __version__, "extensions": ["binary_tensor_data", "classification"]})

    async def live(request: Request):
        return flag(True, "live")

    async def ready(request: Request):
        return flag(bool(state["ready"]), "ready")

    async def model_metadata(request: Request):
        try:
            proto.check_model(request.path_params["name"], request.path_params.get("version"))
        except V2Error as exc:
            return error(exc.status, exc.message)
        return JSONResponse(proto.metadata())

    async def model_ready(request: Request):
        try:
            proto.check_model(request.path_params["name"], request.path_params.get("version"))
        except V2Error as exc:
            return error(exc.status, exc.message)
        return flag(bool(state["ready"]), "ready")

    async def infer(request: Request):
        t0 = time.perf_counter()
        status = 200
        try:
            proto.check_model(request.path_params["name"], request.path_params.get("version"))
            json_length = proto.json_length(request.headers.get(HEADER_LENGTH))
            body = await gate.read_body(request, gate.cfg.max_json_bytes if json_length is None else None)
            plan = await gate.parse(body, proto.parse, json_length)
            if plan["kind"] == "images":
                logits = await gate.infer(plan["n"], model.preprocess_images, plan["payload"])
            else:
                logits = await gate.infer(plan["n"], proto.tensor, plan)
            head, tail = proto.response(plan, logits)
            latency.observe(time.perf_counter() - t0)
            if not tail:
                return Response(head, media_type="application/json")
            return Response(head + tail, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(len(head))})
        except V2Error as exc:
            status = exc.status
            return error(exc.status, exc.message)
        except HTTPError as exc:  # the body limit (413), a full queue (503), undecodable input (400), the timeout (504)
            status = exc.status
            return error(exc.status, exc.message, headers=exc.headers)
        except ClientDisconnect:
            status = 499
            return Response(status_code=499)
        finally:
            requests.labels(str(status)).inc()

    model_path = "/v2/models/{name}"
    version_path = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
    ]
    for base in (model_path, version_path):
        routes += [Route(base, model_metadata), Route(base + "/ready", model_ready), Route(base + "/infer", infer, methods=["POST"])]
    return routes
