"""Attack run against `edgeconv-runtime serve` on loopback and against the runtime CLI (bounded in count and time).

Classes: forged image headers (huge-canvas PNG/GIF/WebP/JPEG/BMP, made here), a real PNG decompression bomb,
deep-nested JSON (v1 and v2), oversized bodies with and without Content-Length, huge headers, slowloris (slow
headers and slow bodies), garbage bytes, wrong content types, many concurrent big-but-legal images, 36-megapixel
PNGs of a few KB (big pixels in small files), v2 header and size tricks (Unicode digits in
Inference-Header-Content-Length, binary BYTES data that does not match its shape, JSON over --max-json-mb), and the
CLI on the forged images. A second server runs the bundle's model re-imported with shorter_center_crop (`edgeconv
import`, --max-queue 16) for the extreme aspect ratios (1 x 100,000 to 1 x 10,000,000 pixels: resizing the short
side first would need gigabytes) and for batches larger than its queue (413). For each class: cases tried, statuses
seen, 5xx count, tracebacks in the servers' stderr; the servers' peak RSS (VmHWM) and the latency of normal clients
(a digit to /v1/predict, and /healthz, every 100 ms each) all along. Then goodput under overload: capacity with 64
well-behaved clients, then 200 clients that retry at once on 503 against the same server (--max-queue 64); >= 0.8.
``--busy N`` runs N busy-loop processes beside it all (the machine's other core busy).

    python benchmarks/attack.py BUNDLE [--quick] [--busy 1]

Writes benchmarks/results/attack.{json,md}. Only 127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, table, write_json  # noqa: E402
from serve_load import _read_response, cpu_seconds, roundtrip, rss_mb, start as start_server  # noqa: E402

HOST = "127.0.0.1"


# ------------------------------------------------------------------ payloads
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(w: int, h: int, idat: bytes = b"") -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def png_bomb(w: int, h: int) -> bytes:
    """A real, valid grayscale PNG of w*h zero pixels: a few hundred KB that decodes to w*h bytes."""
    comp, parts, row = zlib.compressobj(9), [], b"\x00" * (w + 1)
    for _ in range(h):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    return png_header(w, h, b"".join(parts))


def gif_header(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00\x3b")


def webp_lossless_header(w: int, h: int) -> bytes:
    bits = (w - 1) | ((h - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l


def jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9"


def bmp_header(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\x00" * 16


def real_image(fmt: str, w: int, h: int, seed: int = 0, **kw) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    grad = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))
    px = (grad[..., None] + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt, **kw)
    return buf.getvalue()


def digit_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)).save(buf, format="PNG")
    return buf.getvalue()


def flat_png(w: int, h: int, mode: str = "RGB") -> bytes:
    """A real PNG of one flat colour: w x h pixels in a few hundred bytes to a few hundred KB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode == "L" else (200, 30, 10)).save(buf, format="PNG")
    return buf.getvalue()


def v2_binary(path: str, blobs: list, shape=None) -> bytes:
    """A v2 infer request carrying ``blobs`` as binary BYTES (what tritonclient sends)."""
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    head = json.dumps({"inputs": [{"name": "image", "shape": shape or [len(blobs)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return http_request(path, head + raw, "application/octet-stream", b"Inference-Header-Content-Length: %d\r\n" % len(head))


def http_request(path: str, body: bytes = b"", ctype: str = "", extra: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    if method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + extra + b"\r\n" + body


# ------------------------------------------------------------------ client
async def exchange(port: int, data: bytes, timeout: float = 30.0, chunks=None, pause: float = 0.0) -> str:
    """Sends ``data`` (then ``chunks`` one per ``pause`` s) on a fresh connection; the status, or closed/timeout."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)

        async def go():
            writer.write(data)
            for c in chunks or ():
                await asyncio.sleep(pause)
                if writer.is_closing() or reader.at_eof():
                    break
                writer.write(c)
                await writer.drain()
            status, _, _ = await _read_response(reader)
            return str(status)

        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return "closed"
    finally:
        if writer is not None:
            writer.close()


async def bounded(coros, limit: int = 16) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


# ------------------------------------------------------------------ attack classes
def build_classes(port: int, model_name: str, quick: bool) -> list:
    """(class name, list of coroutine factories, allowed statuses) — payloads built here, before the clock starts."""
    v1, v2 = "/v1/predict", f"/v2/models/{model_name}/infer"
    big = 100_000
    forged = []
    for w, h in ((big, big), (65535, 65535), (30000, 1), (1, 30000), (16383, 16383)):
        forged += [("image/png", png_header(w, h)), ("image/png", gif_header(min(w, 65535), min(h, 65535))),
                   ("image/webp", webp_lossless_header(min(w, 16383), min(h, 16383))),
                   ("image/jpeg", jpeg_header(min(w, 65500), min(h, 65500))), ("image/png", bmp_header(w, h))]
    forged.append(("image/png", png_bomb(12000, 12000)))  # 144 MP of zeros in ~140 KB: a real, valid PNG
    forged.append(("image/webp", real_image("WEBP", 3000, 3000, lossless=True, quality=0, method=0)))
    fj = [(c, http_request(v1, json.dumps({"image": base64.b64encode(b).decode()}).encode(), "application/json")) for c, b in forged[:8]]
    classes = [("forged image headers", [lambda b=b, c=c: exchange(port, http_request(v1, b, c)) for c, b in forged]
                + [lambda r=r: exchange(port, r) for _, r in fj], {"200", "400", "413", "415"})]  # 200: a 30000x1 canvas is a legal image
    deep = []
    for d in (100, 1000, 10_000, 1_000_000, 5_000_000):
        deep += [http_request(v1, b"[" * d, "application/json"), http_request(v1, b'{"images":' + b"[" * d, "application/json"),
                 http_request(v2, b'{"inputs":' + b"[" * d, "application/json"), http_request(v2, b"{\"a\":" * d, "application/json")]
    classes.append(("deep-nested JSON", [lambda r=r: exchange(port, r) for r in deep], {"400", "413"}))
    over = [lambda: exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 2000000000\r\n\r\n", 10),
            lambda: exchange(port, http_request(v1, b"\x00" * (11 * 2**20), "image/png")),
            lambda: exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
                             30, [b"100000\r\n" + b"\x00" * 0x100000 + b"\r\n"] * 12 + [b"0\r\n\r\n"]),
            lambda: exchange(port, http_request(v1, b"[" * (9 * 2**20), "application/json")),
            lambda: exchange(port, http_request(v2, b"\x00" * (11 * 2**20), "application/octet-stream"))]
    over += [lambda: exchange(port, http_request(v1, b"\x01" * (9 * 2**20), "image/png")) for _ in range(4 if quick else 16)]
    classes.append(("oversized bodies", over, {"400", "413", "503", "closed"}))
    hh = [lambda n=n: exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * n + b"\r\n\r\n", 15)
          for n in (70_000, 1_000_000, 10_000_000, 100_000_000 if not quick else 20_000_000)]
    hh.append(lambda: exchange(port, b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20000)) + b"\r\n"))
    hh.append(lambda: exchange(port, b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    classes.append(("huge headers", hh, {"400", "431", "closed"}))
    slow_head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60
    slow = [lambda: exchange(port, b"", 40, [bytes([c]) for c in slow_head], 1.0) for _ in range(8 if quick else 30)]
    slow += [lambda: exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n",
                              40, [b"x"] * 60, 1.0) for _ in range(8 if quick else 30)]
    slow += [lambda: exchange(port, b"", 40, [b""] * 1, 0.0) for _ in range(4)]  # connect and say nothing
    classes.append(("slowloris", slow, {"408", "closed"}))
    rng = random.Random(0)
    garbage = [bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 50, 2000, 20000)))) for _ in range(20 if quick else 60)]
    gb = [lambda g=g: exchange(port, g + b"\r\n\r\n", 15) for g in garbage]
    gb += [lambda g=g, c=c: exchange(port, http_request(v1, g, c)) for g in garbage[:20] for c in ("image/png", "image/jpeg", "application/json")]
    gb += [lambda g=g: exchange(port, http_request(v2, g, "application/octet-stream",
                                                   b"Inference-Header-Content-Length: %d\r\n" % (len(g) // 2))) for g in garbage[:20]]
    classes.append(("garbage bytes", gb, {"400", "404", "413", "closed"}))
    png = digit_png()
    ct = [lambda c=c: exchange(port, http_request(v1, png, c)) for c in
          ("text/html", "multipart/form-data; boundary=x", "", "image/gif", "application/x-www-form-urlencoded", "image/svg+xml", "image/tiff")]
    ct += [lambda c=c: exchange(port, http_request(v1, png, c)) for c in ("application/json", "image/jpeg", "image/webp")]
    classes.append(("wrong content types", ct, {"200", "400", "415"}))  # 200: a PNG labelled image/jpeg or image/webp is sniffed
    legal = [real_image("JPEG", 4000, 3000, seed=i, quality=90) for i in range(4)]
    many = [lambda b=legal[i % 4]: exchange(port, http_request(v1, b, "image/jpeg"), 60) for i in range(16 if quick else 48)]
    classes.append(("concurrent big legal images", many, {"200", "503", "504"}))
    small_big = [png_bomb(6000, 6000), flat_png(6000, 6000), flat_png(8000, 4500, "L")]  # 36 MP in 40-110 KB
    sb = [lambda b=small_big[i % 3]: exchange(port, http_request(v1, b, "image/png"), 60) for i in range(12 if quick else 24)]
    sb += [lambda: exchange(port, v2_binary(v2, small_big[:2]), 60) for _ in range(2 if quick else 4)]
    classes.append(("36 MP PNGs in small files", sb, {"200", "503"}))
    head = json.dumps({"inputs": []}).encode()
    hv = [lambda v=v: exchange(port, http_request(v2, head, "application/octet-stream", b"Inference-Header-Content-Length: " + v + b"\r\n"))
          for v in (b"\xb2", b"1\xb9", b"\xd9\xa3", b"9" * 5000, b"9" * 20, b"-1", b"0x10")]
    zeros = b"\x00" * 9_600_000  # 2.4 million empty BYTES elements under a shape of [1]
    mismatch = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(zeros)}}]}).encode()
    hv += [lambda: exchange(port, http_request(v2, mismatch + zeros, "application/octet-stream",
                                               b"Inference-Header-Content-Length: %d\r\n" % len(mismatch)), 60) for _ in range(2 if quick else 6)]
    big_json = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
                           "parameters": {"pad": "x" * (9 * 2**20)}}).encode()  # 9 MiB: over --max-json-mb 8, under --max-body-mb 10
    hv += [lambda: exchange(port, http_request(v2, big_json, "application/json"), 60),
           lambda: exchange(port, http_request(v2, big_json, "application/octet-stream", b"Inference-Header-Content-Length: %d\r\n" % len(big_json)), 60)]
    classes.append(("v2 header and size tricks", hv, {"400", "413", "closed"}))
    return classes


def build_crop_classes(port: int, model_name: str, max_queue: int) -> list:
    """The classes for the shorter_center_crop server: extreme aspect ratios, batches larger than its queue."""
    v1, v2 = "/v1/predict", f"/v2/models/{model_name}/infer"
    strips = [flat_png(w, h, mode) for w, h in ((1, 100_000), (100_000, 1), (1, 10_000_000), (10_000_000, 1)) for mode in ("L", "RGB")]
    cases = [lambda b=b: exchange(port, http_request(v1, b, "image/png"), 60) for b in strips]
    cases += [lambda b=real_image("JPEG", w, h): exchange(port, http_request(v1, b, "image/jpeg"), 60) for w, h in ((1, 65500), (65500, 1))]
    cases += [lambda: exchange(port, v2_binary(v2, strips[:2]), 60), lambda: exchange(port, v2_binary(v2, strips[4:6]), 60)]
    classes = [("aspect-ratio bombs (crop server)", cases, {"200", "503"})]  # 503: the big-image lane is full
    png = digit_png()
    batch = [lambda n=n: exchange(port, http_request(v1, json.dumps({"images": [base64.b64encode(png).decode()] * n}).encode(),
                                                     "application/json")) for n in (max_queue + 1, 40, 64)]
    batch += [lambda n=n: exchange(port, v2_binary(v2, [png] * n)) for n in (max_queue + 1, 64)]
    classes.append(("batch over --max-queue (crop server)", batch, {"413"}))
    return classes


async def prober(port: int, req: bytes, stop: asyncio.Event, out: list) -> None:
    """A normal client: one request (a real digit, or /healthz) every 100 ms on its own keep-alive connection, all along
    the attack."""
    conn = None
    while not stop.is_set():
        t = time.perf_counter()
        try:
            conn, status, _ = await asyncio.wait_for(roundtrip(conn, HOST, port, req), 30)
            out.append((status, time.perf_counter() - t))
        except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.TimeoutError) as exc:
            out.append((type(exc).__name__, time.perf_counter() - t))
            conn = None
        await asyncio.sleep(0.1)
    if conn:
        conn[1].close()


async def attack(classes: list) -> tuple:
    """Each class (name, cases, allowed statuses, port) in turn, with normal clients on the same server all along."""
    predict, healthz = http_request("/v1/predict", digit_png(), "image/png"), http_request("/healthz", method="GET")
    rows, normal_all, health_all = [], [], []
    for name, cases, allowed, port in classes:
        stop, normal, health = asyncio.Event(), [], []
        probes = [asyncio.create_task(prober(port, predict, stop, normal)), asyncio.create_task(prober(port, healthz, stop, health))]
        t0 = time.perf_counter()
        concurrency = 64 if name in ("slowloris", "concurrent big legal images") else 8
        statuses = await asyncio.wait_for(bounded([c() for c in cases], concurrency), 180)
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*probes)
        seen = {}
        for s in statuses:
            seen[s] = seen.get(s, 0) + 1
        ok_lat = [t for s, t in normal if s == 200]
        rows.append({"class": name, "cases": len(cases), "statuses": dict(sorted(seen.items())), "5xx": sum(v for k, v in seen.items() if k.startswith("5") and k != "503" and k != "504"),
                     "5xx incl 503/504": sum(v for k, v in seen.items() if k.startswith("5")),
                     "5xx but 503": sum(v for k, v in seen.items() if k.startswith("5") and k != "503"),
                     "unexpected": sorted(set(seen) - allowed), "wall_s": round(wall, 1),
                     "normal requests": len(normal), "normal non-200": len(normal) - len(ok_lat),
                     "normal p50 ms": round(1e3 * float(np.median(ok_lat)), 1) if ok_lat else None,
                     "normal max ms": round(1e3 * max(ok_lat), 1) if ok_lat else None,
                     "healthz max ms": round(1e3 * max(t for _, t in health), 1) if health else None})
        normal_all += normal
        health_all += health
        print(f"  {name}: {len(cases)} cases in {wall:.1f} s, statuses {rows[-1]['statuses']}, normal max {rows[-1]['normal max ms']} ms",
              flush=True)
    return rows, normal_all, health_all


# ------------------------------------------------------------------ goodput
async def goodput_run(port: int, png: bytes, clients: int, seconds: float) -> dict:
    """``clients`` keep-alive clients that send back-to-back and retry at once on 503 (no backoff), for ``seconds``."""
    req = http_request("/v1/predict", png, "image/png")
    codes, errors = {}, 0
    end = time.perf_counter() + seconds

    async def worker():
        nonlocal errors
        conn = None
        while time.perf_counter() < end:
            try:
                conn, status, _ = await roundtrip(conn, HOST, port, req)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                conn = None
                continue
            codes[status] = codes.get(status, 0) + 1
        if conn:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "codes": codes, "connection_errors": errors, "ok_per_s": codes.get(200, 0) / wall, "wall_s": wall}


# ------------------------------------------------------------------ server and CLI
def start(bundle: str, *args, log: Path) -> tuple:
    """(process, port) of a server whose stderr goes to ``log`` (read for tracebacks afterwards)."""
    proc, url = start_server(bundle, *args, stderr=open(log, "w"))
    return proc, int(url.rsplit(":", 1)[1])


def cli_attack(bundle: str, tmp: Path) -> dict:
    """`edgeconv-runtime predict` on each forged image: a non-zero exit with one `error:` line, never a traceback."""
    cases = {"huge.png": png_header(100_000, 100_000), "huge.gif": gif_header(65535, 65535), "huge.webp": webp_lossless_header(16383, 16383),
             "huge.jpg": jpeg_header(65500, 65500), "huge.bmp": bmp_header(100_000, 100_000), "bomb.png": png_bomb(12000, 12000),
             "garbage.jpg": os.urandom(3000), "empty.png": b""}
    out = {"cases": 0, "exit codes": {}, "tracebacks": 0, "peak_rss_mb": 0.0, "lines": {}}
    for name, data in cases.items():
        path = tmp / name
        path.write_bytes(data)
        p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "edgeconv_runtime", "predict", bundle, str(path)],
                           capture_output=True, text=True, timeout=120)
        out["cases"] += 1
        out["exit codes"][str(p.returncode)] = out["exit codes"].get(str(p.returncode), 0) + 1
        out["tracebacks"] += "Traceback" in p.stderr
        m = re.search(r"MAXRSS (\d+)", p.stderr)
        if m:
            out["peak_rss_mb"] = max(out["peak_rss_mb"], int(m.group(1)) / 1024)
        out["lines"][name] = (p.returncode, [l for l in p.stderr.splitlines() if not l.startswith("MAXRSS")][-1:] or p.stdout.splitlines()[-1:])
    return out


def crop_twin(bundle: str, tmp: Path) -> str:
    """The bundle's model imported again with shorter_center_crop (ImageNet's policy, the one an extreme aspect ratio
    could blow up): `edgeconv import` with the bundle's classes, scale, mean/std and reference images."""
    man = json.loads((Path(bundle) / "manifest.json").read_text())
    pre, out, labels = man["preprocess"], tmp / "crop_twin", tmp / "labels.txt"
    labels.write_text("\n".join(man["classes"]) + "\n")
    p = subprocess.run([sys.executable, "-m", "edgeconv", "import", str(Path(bundle) / "model.onnx"), "--out", str(out), "--labels", str(labels),
                        "--resize", "shorter_center_crop", "--scale", repr(pre["scale"]), "--mean", ",".join(map(repr, pre["mean"])),
                        "--std", ",".join(map(repr, pre["std"])), "--val-data", str(Path(bundle) / "reference" / "images"), "--precision", "fp32"],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"could not import the crop twin: {p.stderr.strip()[-500:]}")
    return str(out)


def busy_loops(n: int) -> list:
    """``n`` processes that spin a core each (the machine's other core busy), until terminated."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="an exported bundle (the mnist one is enough)")
    ap.add_argument("--quick", action="store_true", help="fewer cases per class")
    ap.add_argument("--goodput-s", type=float, default=10.0)
    ap.add_argument("--goodput-only", action="store_true", help="only the goodput measurement (nothing written)")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run beside the whole measurement")
    args = ap.parse_args()
    busy = busy_loops(args.busy)
    try:
        run(args)
    finally:
        for b in busy:
            b.terminate()
            b.wait()


def _server_report(proc, port: int, log: Path) -> dict:
    import httpx

    text = httpx.get(f"http://{HOST}:{port}/metrics").text
    return {"healthz_after": httpx.get(f"http://{HOST}:{port}/healthz").status_code,
            "metrics_5xx": {m.group(1): float(m.group(2)) for m in re.finditer(r'^edgeconv_http_responses_total\{status="(5\d\d)"\} (\S+)$', text, re.M)},
            "peak_rss_mb": rss_mb(proc.pid, "VmHWM")}


def run(args) -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="edgeconv-attack-"))
    result = {"args": vars(args), "load_average_start": os.getloadavg()}
    if args.goodput_only:
        png = digit_png()
        for extra, clients in ((["--max-queue", "64"], 64), (["--max-queue", "64"], 200), (["--max-queue", "64", "--admit-wait-ms", "0"], 200)):
            proc, port = start(args.bundle, *extra, log=tmp / "g.err")
            try:
                print(extra, asyncio.run(goodput_run(port, png, clients, args.goodput_s)), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        return
    print("attack: a server with the default limits, and the crop twin with --max-queue 16", flush=True)
    crop_queue = 16
    crop = crop_twin(args.bundle, tmp)
    proc, port = start(args.bundle, log=tmp / "server.err")
    cproc, cport = start(crop, "--max-queue", str(crop_queue), log=tmp / "crop.err")
    try:
        name = httpx.get(f"http://{HOST}:{port}/v1/model").json()["serving"]["name"]
        cname = httpx.get(f"http://{HOST}:{cport}/v1/model").json()["serving"]["name"]
        rss0, crss0 = rss_mb(proc.pid), rss_mb(cproc.pid)
        classes = [(*c, port) for c in build_classes(port, name, args.quick)] + [(*c, cport) for c in build_crop_classes(cport, cname, crop_queue)]
        rows, normal, health = asyncio.run(attack(classes))
        result["server"] = {"rss_start_mb": rss0, **_server_report(proc, port, tmp / "server.err")}
        result["crop_server"] = {"rss_start_mb": crss0, **_server_report(cproc, cport, tmp / "crop.err")}
    finally:
        for p in (proc, cproc):
            p.terminate()
            p.wait(timeout=60)
    for key, log in (("server", "server.err"), ("crop_server", "crop.err")):
        err = (tmp / log).read_text()
        result[key]["tracebacks"] = err.count("Traceback")
        result[key]["stderr_tail"] = err[-2000:]
    srv = result["server"]  # the main server's figures at the top level too, as before (the README is checked against them)
    result.update(healthz_after=srv["healthz_after"], metrics_5xx=srv["metrics_5xx"], server_rss_start_mb=srv["rss_start_mb"],
                  server_peak_rss_mb=srv["peak_rss_mb"], server_tracebacks=srv["tracebacks"] + result["crop_server"]["tracebacks"])
    result["classes"] = rows
    ok = [t for s, t in normal if s == 200]
    result["normal"] = {"requests": len(normal), "ok": len(ok), "p50_ms": 1e3 * float(np.median(ok)), "p99_ms": 1e3 * float(np.percentile(ok, 99)),
                        "max_ms": 1e3 * max(ok), "healthz_requests": len(health), "healthz_max_ms": 1e3 * max(t for _, t in health)}
    print("attack: the CLI on forged images", flush=True)
    result["cli"] = cli_attack(args.bundle, tmp)

    print("goodput: capacity with 64 clients, then 200 clients retrying at once on 503 (same server, --max-queue 64)", flush=True)
    png = digit_png()
    runs = {}
    # capacity measured before and after the overload runs (this machine's cores are shared: the mean of the two)
    for key, extra, clients in (("capacity_64_clients", [], 64), ("overload_200_retrying", [], 200),
                                ("overload_200_retrying_admit_wait_0", ["--admit-wait-ms", "0"], 200), ("capacity_64_clients_again", [], 64)):
        proc, port = start(args.bundle, "--max-queue", "64", *extra, log=tmp / f"{key}.err")
        try:
            cpu0 = cpu_seconds(proc.pid)
            runs[key] = asyncio.run(goodput_run(port, png, clients, args.goodput_s))
            runs[key]["server_cpu_s"] = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    cap, over, naive = runs["capacity_64_clients"], runs["overload_200_retrying"], runs["overload_200_retrying_admit_wait_0"]
    capacity = (cap["ok_per_s"] + runs["capacity_64_clients_again"]["ok_per_s"]) / 2
    result["goodput"] = {**runs, "capacity_ok_per_s": capacity, "ratio": over["ok_per_s"] / capacity, "ratio_admit_wait_0": naive["ok_per_s"] / capacity,
                         "load_average": os.getloadavg()}

    srv, crp = result["server"], result["crop_server"]
    cols = ["class", "cases", "statuses", "5xx but 503", "unexpected", "normal requests", "normal non-200", "normal p50 ms", "normal max ms",
            "healthz max ms", "wall_s"]
    lines = [table(rows, cols), "",
             f"cases: {sum(r['cases'] for r in rows)}; 5xx other than 503 in the attack: {sum(r['5xx but 503'] for r in rows)}; unexpected statuses: "
             f"{sum(len(r['unexpected']) for r in rows)}; tracebacks in the servers' stderr: {srv['tracebacks'] + crp['tracebacks']}; "
             f"5xx counted in /metrics: {srv['metrics_5xx'] or 'none'} (crop twin: {crp['metrics_5xx'] or 'none'}); /healthz after: "
             f"{srv['healthz_after']} and {crp['healthz_after']}",
             f"server RSS: {srv['rss_start_mb']:.0f} MB at start, peak (VmHWM) {srv['peak_rss_mb']:.0f} MB; crop twin "
             f"(shorter_center_crop): {crp['rss_start_mb']:.0f} MB at start, peak {crp['peak_rss_mb']:.0f} MB (limit 400 MB each)",
             f"normal clients during the attack: {result['normal']['ok']}/{result['normal']['requests']} digits answered 200, "
             f"p50 {result['normal']['p50_ms']:.1f} ms, p99 {result['normal']['p99_ms']:.1f} ms, max {result['normal']['max_ms']:.1f} ms; "
             f"/healthz max {result['normal']['healthz_max_ms']:.1f} ms over {result['normal']['healthz_requests']} (target: no stall over 1 s)",
             f"CLI (`edgeconv-runtime predict` on {result['cli']['cases']} forged files): exit codes {result['cli']['exit codes']}, "
             f"tracebacks {result['cli']['tracebacks']}, peak RSS {result['cli']['peak_rss_mb']:.0f} MB",
             f"goodput (--max-queue 64, {args.goodput_s:.0f} s each, {args.busy} busy-loop process(es) beside it, load average "
             f"{result['load_average_start'][0]:.1f} at the start): capacity {capacity:.0f} req/s with 64 clients (mean of "
             f"{cap['ok_per_s']:.0f} before and {runs['capacity_64_clients_again']['ok_per_s']:.0f} after); "
             f"200 clients retrying at once on 503: {over['ok_per_s']:.0f} req/s OK {over['codes']} -> ratio {result['goodput']['ratio']:.2f} "
             f"(target >= 0.80); the same without the admission wait (--admit-wait-ms 0): {naive['ok_per_s']:.0f} req/s OK {naive['codes']} "
             f"-> ratio {result['goodput']['ratio_admit_wait_0']:.2f}"]
    text = "\n".join(lines)
    print(text)
    path = write_json("attack.json", result)
    from edgeconv_runtime.fileio import atomic_write_text

    atomic_write_text(RESULTS / "attack.md", "# benchmarks/attack.py\n\n```\n" + text + "\n```\n")
    print(f"wrote {path} and {RESULTS / 'attack.md'}")


if __name__ == "__main__":
    main()
