"""Load and fault figures for `edgeconv-runtime serve` (loopback only, bounded in count and time).

1. 64 concurrent clients, 5,000 requests of real cats-vs-dogs JPEGs to an INT8 bundle: errors,
   answers that differ from the runtime's direct prediction, p50/p99 latency, throughput;
   dynamic batching on (--max-batch 32) vs off (--max-batch 1): throughput ratio (target >= 1.5x).
2. Overload: 200 concurrent clients against a small queue: status counts (only 200/503 allowed),
   server RSS before/after, /healthz afterwards.

    python benchmarks/serve_load.py BUNDLE [--data ../shared/data/cats_and_dogs_small/test] [--requests 5000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, table, write_json  # noqa: E402


def start(bundle: str, *args, stderr=subprocess.PIPE) -> tuple:
    """(process, url) of `edgeconv-runtime serve` on a free loopback port, once /readyz answers 200."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeconv_runtime", "serve", bundle, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    url = f"http://127.0.0.1:{m.group(1)}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mean_batch(url: str) -> float:
    """Mean images per inference from the server's own /metrics."""
    import httpx

    text = httpx.get(url + "/metrics").text
    val = {k: float(m.group(1)) for k in ("sum", "count") if (m := re.search(rf"^edgeconv_batch_size_{k} (\S+)$", text, re.M))}
    return val.get("sum", 0) / max(val.get("count", 0), 1)


def model_only(bundle: str, precision: str, max_batch: int) -> dict:
    """The model's own batch gain in this process, with the server's settings (no ORT spin-waiting)."""
    from edgeconv_runtime import Model

    model = Model.load(bundle, precision=precision, spin=False)
    x = np.zeros((max_batch, *model.preprocess.input_shape), dtype=np.float32)
    out = {}
    for b in sorted({1, 8, max_batch}):
        xb = x[:b]
        model.run(xb)
        best = float("inf")
        for _ in range(5):  # best of 5 blocks of ~64 images
            n = max(2, 64 // b)
            t = time.perf_counter()
            for _ in range(n):
                model.run(xb)
            best = min(best, (time.perf_counter() - t) / (n * b))
        out[b] = 1.0 / best
    model.close()
    return {"images_per_s": out, "batch_gain": max(out.values()) / out[1]}


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """A memory figure of /proc/PID/status in MB: VmRSS now, VmHWM the peak."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _read_response(reader) -> tuple:
    """One HTTP/1.1 response: (status, body, keep_alive). Handles Content-Length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


async def roundtrip(conn, host: str, port: int, request: bytes) -> tuple:
    """Send one pre-built request on a keep-alive connection (opened when ``conn`` is None) and read the answer.

    Returns (conn, status, body): ``conn`` is None again when the server closed the connection. A connection
    error propagates with the connection closed, so the caller counts it and reconnects on the next request.
    """
    try:
        if conn is None:
            conn = await asyncio.open_connection(host, port)
        conn[1].write(request)
        status, body, keep = await _read_response(conn[0])
    except (OSError, asyncio.IncompleteReadError, ValueError):
        if conn:
            conn[1].close()
        raise
    if not keep:
        conn[1].close()
        conn = None
    return conn, status, body


async def load(url: str, bodies: list, expected: list, requests: int, concurrency: int) -> dict:
    """`concurrency` keep-alive HTTP/1.1 clients on asyncio streams, sending pre-built requests.

    The load generator shares this machine's cores with the server, so it is kept lean: httpx costs
    about a millisecond of CPU per request in Python, which would cap the server's measured throughput.
    Every 200 answer is parsed and compared with the runtime's direct prediction for that image.
    """
    host, port = url.split("//")[1].split(":")
    port = int(port)
    wire = [(f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    lat, codes, errors, mismatches = [], {}, [], 0
    counter = iter(range(requests))

    async def worker():
        nonlocal mismatches
        conn = None
        for i in counter:
            k = i % len(bodies)
            t = time.perf_counter()
            try:
                conn, status, body = await roundtrip(conn, host, port, wire[k])
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn = None
                continue
            lat.append(time.perf_counter() - t)
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                top = json.loads(body)["predictions"][0]["top"][0]
                if top["label"] != expected[k][0] or abs(top["probability"] - expected[k][1]) > 1e-4:
                    mismatches += 1
        if conn:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"requests": requests, "concurrency": concurrency, "codes": codes, "mismatches": mismatches,
            "connection_errors": len(errors), "first_connection_errors": errors[:3],
            "errors": sum(v for c, v in codes.items() if c != 200) + len(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": codes.get(200, 0) / wall, "wall_s": wall}


def run_load(*args) -> dict:
    try:  # uvloop when the serve extra installed it: less client CPU on the shared cores
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(load(*args))
    except ImportError:
        return asyncio.run(load(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--data", default=str(SHARED / "cats_and_dogs_small" / "test"))
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="server --max-batch with batching on")
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    args = ap.parse_args()
    from edgeconv_runtime import Model

    files = sorted(p for p in Path(args.data).rglob("*.jpg"))
    bodies = [f.read_bytes() for f in files]
    model = Model.load(args.bundle, precision=args.precision)
    expected = [(p.labels[0], p.probabilities[0]) for p in model.predict(bodies, top_k=1)]
    model.close()
    results = {}
    on = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    for mode, extra in (("batching on", on), ("batching off", ["--max-batch", "1"])):
        proc, url = start(args.bundle, "--precision", args.precision, "--max-queue", "1024", *extra)
        try:
            cpu0, client0 = cpu_seconds(proc.pid), os.times()
            results[mode] = r = run_load(url, bodies, expected, args.requests, args.concurrency)
            client1 = os.times()
            r["server_cpu_ms_per_request"] = 1e3 * (cpu_seconds(proc.pid) - cpu0) / args.requests
            r["client_cpu_ms_per_request"] = 1e3 * ((client1.user + client1.system) - (client0.user + client0.system)) / args.requests
            r["mean_batch"] = mean_batch(url)
            r["server_rss_mb"] = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    # overload: a small queue, no batching, 200 clients
    proc, url = start(args.bundle, "--precision", args.precision, "--max-batch", "1", "--max-queue", "8")
    try:
        before = rss_mb(proc.pid)
        over = run_load(url, bodies, expected, 2000, 200)
        import httpx

        over.update(rss_before_mb=before, rss_after_mb=rss_mb(proc.pid), healthz_after=httpx.get(url + "/healthz").status_code)
        results["overload"] = over
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows = [{"run": k, "requests": v["requests"], "clients": v["concurrency"], "codes": v["codes"], "mismatches": v["mismatches"],
             "p50 ms": f"{v['p50_ms']:.1f}", "p99 ms": f"{v['p99_ms']:.1f}", "req/s": f"{v['throughput_rps']:.1f}",
             "mean batch": f"{v.get('mean_batch', 0):.1f}", "server CPU ms/req": f"{v.get('server_cpu_ms_per_request', 0):.2f}",
             "client CPU ms/req": f"{v.get('client_cpu_ms_per_request', 0):.2f}"} for k, v in results.items()]
    print(table(rows, list(rows[0])))
    ratio = results["batching on"]["throughput_rps"] / results["batching off"]["throughput_rps"]
    o = results["overload"]
    ceiling = model_only(args.bundle, args.precision, args.max_batch)
    print(f"batching on/off throughput: {ratio:.2f}x (target >= 1.5x)")
    print("model alone, same process settings, images/s by batch: "
          + ", ".join(f"b{b} {v:.0f}" for b, v in ceiling["images_per_s"].items()) + f" -> best/b1 {ceiling['batch_gain']:.2f}x")
    print(f"overload: statuses {o['codes']}, server RSS {o['rss_before_mb']:.0f} -> {o['rss_after_mb']:.0f} MB, /healthz after: {o['healthz_after']}")
    path = write_json("serve_load.json", {"results": results, "batching_ratio": ratio, "model_only": ceiling, "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
