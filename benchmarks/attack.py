"""Attack run against `edgeconv-runtime serve` on loopback and against the runtime CLI (bounded in count and time).

Classes: forged image headers (huge-canvas PNG/GIF/WebP/JPEG/BMP, made here), a real PNG decompression bomb,
deep-nested JSON (v1 and v2), oversized bodies with and without Content-Length, huge headers, slowloris (slow
headers and slow bodies), garbage bytes, wrong content types, many concurrent big-but-legal images, and the CLI on
the forged images. For each: cases tried, statuses seen, 5xx count, tracebacks in the server's stderr; the server's
peak RSS (VmHWM) and the latency of normal requests sent all along. Then goodput under overload: capacity with 64
well-behaved clients, then 200 clients that retry at once on 503 against the same server (--max-queue 64); >= 0.8.

    python benchmarks/attack.py BUNDLE [--quick]

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
    return classes


async def prober(port: int, png: bytes, stop: asyncio.Event, out: list) -> None:
    """A normal client: one real digit every 100 ms on its own keep-alive connection, all along the attack."""
    req = http_request("/v1/predict", png, "image/png")
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


async def attack(port: int, model_name: str, quick: bool) -> tuple:
    classes = build_classes(port, model_name, quick)
    png = digit_png()
    rows, normal_all = [], []
    for name, cases, allowed in classes:
        stop, normal = asyncio.Event(), []
        probe = asyncio.create_task(prober(port, png, stop, normal))
        t0 = time.perf_counter()
        concurrency = 64 if name in ("slowloris", "concurrent big legal images") else 8
        statuses = await asyncio.wait_for(bounded([c() for c in cases], concurrency), 180)
        wall = time.perf_counter() - t0
        stop.set()
        await probe
        seen = {}
        for s in statuses:
            seen[s] = seen.get(s, 0) + 1
        ok_lat = [t for s, t in normal if s == 200]
        rows.append({"class": name, "cases": len(cases), "statuses": dict(sorted(seen.items())), "5xx": sum(v for k, v in seen.items() if k.startswith("5") and k != "503" and k != "504"),
                     "5xx incl 503/504": sum(v for k, v in seen.items() if k.startswith("5")),
                     "unexpected": sorted(set(seen) - allowed), "wall_s": round(wall, 1),
                     "normal requests": len(normal), "normal non-200": len(normal) - len(ok_lat),
                     "normal p50 ms": round(1e3 * float(np.median(ok_lat)), 1) if ok_lat else None,
                     "normal max ms": round(1e3 * max(ok_lat), 1) if ok_lat else None})
        normal_all += normal
        print(f"  {name}: {len(cases)} cases in {wall:.1f} s, statuses {rows[-1]['statuses']}", flush=True)
    return rows, normal_all


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="an exported bundle (the mnist one is enough)")
    ap.add_argument("--quick", action="store_true", help="fewer cases per class")
    ap.add_argument("--goodput-s", type=float, default=10.0)
    ap.add_argument("--goodput-only", action="store_true", help="only the goodput measurement (nothing written)")
    args = ap.parse_args()
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="edgeconv-attack-"))
    result = {"args": vars(args)}
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
    print("attack: server with the default limits", flush=True)
    proc, port = start(args.bundle, log=tmp / "server.err")
    try:
        name = httpx.get(f"http://{HOST}:{port}/v1/model").json()["serving"]["name"]
        rss0 = rss_mb(proc.pid)
        rows, normal = asyncio.run(attack(port, name, args.quick))
        result["healthz_after"] = httpx.get(f"http://{HOST}:{port}/healthz").status_code
        result["metrics_5xx"] = {m.group(1): float(m.group(2)) for m in re.finditer(r'^edgeconv_http_responses_total\{status="(5\d\d)"\} (\S+)$',
                                                                                     httpx.get(f"http://{HOST}:{port}/metrics").text, re.M)}
        result["server_rss_start_mb"], result["server_peak_rss_mb"] = rss0, rss_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    err = (tmp / "server.err").read_text()
    result["server_tracebacks"] = err.count("Traceback")
    result["server_stderr_tail"] = err[-2000:]
    result["classes"] = rows
    ok = [t for s, t in normal if s == 200]
    result["normal"] = {"requests": len(normal), "ok": len(ok), "p50_ms": 1e3 * float(np.median(ok)), "p99_ms": 1e3 * float(np.percentile(ok, 99)),
                        "max_ms": 1e3 * max(ok)}
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

    cols = ["class", "cases", "statuses", "5xx", "unexpected", "normal requests", "normal non-200", "normal p50 ms", "normal max ms", "wall_s"]
    lines = [table(rows, cols), "",
             f"5xx other than 503/504 in the attack: {sum(r['5xx'] for r in rows)}; tracebacks in the server's stderr: {result['server_tracebacks']}; "
             f"5xx counted in /metrics: {result['metrics_5xx'] or 'none'}; /healthz after: {result['healthz_after']}",
             f"server RSS: {result['server_rss_start_mb']:.0f} MB at start, peak (VmHWM) {result['server_peak_rss_mb']:.0f} MB (limit 400 MB)",
             f"normal requests during the attack: {result['normal']['ok']}/{result['normal']['requests']} answered 200, "
             f"p50 {result['normal']['p50_ms']:.1f} ms, p99 {result['normal']['p99_ms']:.1f} ms, max {result['normal']['max_ms']:.1f} ms",
             f"CLI (`edgeconv-runtime predict` on {result['cli']['cases']} forged files): exit codes {result['cli']['exit codes']}, "
             f"tracebacks {result['cli']['tracebacks']}, peak RSS {result['cli']['peak_rss_mb']:.0f} MB",
             f"goodput (--max-queue 64, {args.goodput_s:.0f} s each): capacity {capacity:.0f} req/s with 64 clients (mean of "
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
