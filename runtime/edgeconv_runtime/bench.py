"""Benchmark protocol: per backend x precision x batch size, load and first-inference time apart
from steady state, model-only apart from end-to-end (JPEG bytes -> label), accuracy beside speed,
and the environment it ran in."""
from __future__ import annotations

import csv
import io
import os
import platform
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import BackendUnavailable, EdgeconvError
from .fileio import atomic_write_json, atomic_write_text
from .gpu import gpu_info
from .jetson import PowerSampler, jetson_facts, jetson_model
from .plain import BenchTarget, graph_target
from .versions import library_versions


@dataclass
class BenchConfig:
    bundle: str
    backends: Sequence[str] = ("auto",)
    precisions: Sequence[str] = ("fp32",)
    batch_sizes: Sequence[int] = (1, 8, 32)
    warmup: int = 10
    iterations: Optional[int] = None
    duration: Optional[float] = 2.0
    threads: Optional[int] = None
    data: Optional[str] = None
    end_to_end: bool = True
    progress: bool = True
    shape: Optional[tuple] = None  # a plain ONNX file's input shape for one item (no batch), where the graph leaves it open
    profile: bool = True  # `auto` without a precision runs the bundle's tuned profile for this device (False: ignore it)


def latency_stats(seconds: Sequence[float], batch: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "iterations": int(len(ms)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "p99_9_ms": float(np.percentile(ms, 99.9)),
        "stdev_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "throughput_ips": float(batch * len(ms) / (ms.sum() / 1e3)),
    }


def time_loop(fn, warmup: int, iterations: Optional[int], duration: Optional[float]) -> list:
    """Call ``fn`` ``warmup`` times untimed, then for ``iterations`` calls or ``duration`` seconds."""
    for _ in range(warmup):
        fn()
    times = []
    perf = time.perf_counter
    end = perf() + (duration or 0)
    while True:
        t = perf()
        fn()
        times.append(perf() - t)
        if iterations is not None:
            if len(times) >= iterations:
                break
        elif perf() >= end and len(times) >= 5:
            break
    return times


def environment(threads: Optional[int] = None) -> dict:
    env = {"os": f"{platform.system()} {platform.release()}", "machine": platform.machine(), "python": platform.python_version(),
           "cores": os.cpu_count(), "threads": threads}
    try:
        info = open("/proc/cpuinfo").read()
        env["cpu"] = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), None)
        flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
        env["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")) or f in ("neon", "asimd"))
    except OSError:
        pass
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    gpu = gpu_info()
    if gpu:
        env["gpu"] = gpu
    model = jetson_model()
    if model:
        env["jetson"] = jetson_facts(power_probe_s=0.5)  # records the power method (input rail or sum of rails)
    return env


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label:<40}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")


def _bundle_target(cfg: BenchConfig) -> BenchTarget:
    from .bundle import read_bundle
    from .fileio import sha256_file
    from .manifest import MANIFEST_NAME
    from .model import Model

    if cfg.shape:
        raise EdgeconvError("--shape is for plain ONNX files; a bundle records its input shape")
    bundle = read_bundle(cfg.bundle)
    ref = bundle.manifest.reference or {}
    if not ref.get("inputs"):
        raise EdgeconvError("the bundle has no reference inputs to benchmark with; re-export it")
    return BenchTarget(bundle.name, sha256_file(Path(cfg.bundle) / MANIFEST_NAME),  # the manifest holds every artifact's sha256
                   np.load(bundle.path(ref["inputs"]), allow_pickle=False).astype(np.float32),
                   lambda backend, precision: Model.load(cfg.bundle, backend=backend, precision=precision, threads=cfg.threads,
                                                         profile=cfg.profile),
                   [bundle.path(f).read_bytes() for f in ref.get("images", [])],
                   accuracy=(lambda model: model.evaluate(cfg.data)["accuracy"]) if cfg.data else None)


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every combination in ``cfg``; returns {"environment", "rows", "skipped"}."""
    import datetime as _dt

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    load_start = _loadavg()
    target = graph_target(cfg) if Path(cfg.bundle).suffix == ".onnx" else _bundle_target(cfg)
    rows, skipped = [], []
    batch_sizes = target.batch_sizes or list(cfg.batch_sizes)
    skipped += [{"backend": "batch", "precision": str(bs), "reason": f"the graph fixes its batch size to {batch_sizes[0]}"}
                for bs in cfg.batch_sizes if bs not in batch_sizes]
    combos = [(b, p) for b in cfg.backends for p in cfg.precisions]
    progress = _Progress(len(combos) * len(batch_sizes), cfg.progress)
    for backend, precision in combos:
        t0 = time.perf_counter()
        try:
            model = target.load(backend, precision)
        except (BackendUnavailable, EdgeconvError) as exc:
            skipped.append({"backend": backend, "precision": precision or "default", "reason": str(exc)})
            for _ in batch_sizes:
                progress.step(f"{backend} {precision} skipped")
            continue
        load_s = time.perf_counter() - t0
        x1 = target.inputs[: batch_sizes[0]] if target.batch_sizes else target.inputs[:1]
        t1 = time.perf_counter()
        model.run(x1)
        first_ms = (time.perf_counter() - t1) * 1e3
        accuracy = target.accuracy(model) if target.accuracy else None
        for bs in batch_sizes:
            row = {"backend": model.backend_name, "precision": getattr(model, "precision", None) or precision, "batch": bs, "load_s": load_s, "first_inference_ms": first_ms,
                   "threads": getattr(model.backend, "threads", None), **_timed(model, target.inputs, bs, cfg)}
            if cfg.end_to_end and target.jpeg_bytes:
                row.update(_end_to_end(model, target.jpeg_bytes, bs, cfg))
                row["e2e_over_model_p50"] = row["e2e_p50_ms"] / row["p50_ms"]
            row["accuracy"] = accuracy
            profile = (getattr(model, "info", None) or {}).get("profile")
            if profile:
                row["profile"] = profile["path"]
            rows.append(row)
            progress.step(f"{model.backend_name} {precision} batch {bs}")
        model.close()
    load_end = _loadavg()
    from .compare import device_label

    result = {"bundle": str(Path(cfg.bundle).resolve()), "model": target.name, "bundle_sha256": target.sha256,
              "timestamp": started, "seconds": round(time.perf_counter() - t_start, 3), "versions": library_versions(),
              "load": {"loadavg_1m_start": load_start, "loadavg_1m_end": load_end, "cpu_count": os.cpu_count()},
              "environment": environment(cfg.threads), "rows": rows, "skipped": skipped}
    result["environment"].setdefault("ram_gb", _ram_gb())
    result["device"] = device_label(result)
    return result


def _timed(model, inputs: np.ndarray, bs: int, cfg: BenchConfig) -> dict:
    """Model-only latency at batch ``bs`` (inputs tiled), with power where the device reports it."""
    x = np.ascontiguousarray(np.resize(inputs, (bs, *inputs.shape[1:])))
    with PowerSampler() as power:  # jtop or tegrastats on a Jetson; a no-op elsewhere
        times = time_loop(lambda: model.run(x), cfg.warmup, cfg.iterations, cfg.duration)
    row = latency_stats(times, bs)
    if power.mean_watts:
        row["watts"] = power.mean_watts
        row["images_per_watt"] = row["throughput_ips"] / power.mean_watts
        row["power_method"] = f"{power.source}: {power.summary['method']}"
    elif power.source:
        row["power_method"] = f"{power.source}: no reading ({power.summary['reason']})"
    return row


def _end_to_end(model, jpeg_bytes: list, bs: int, cfg: BenchConfig) -> dict:
    """JPEG bytes -> labels at batch ``bs``: decode, resize, normalise, run, softmax."""
    from .prediction import softmax
    from .preprocess import preprocess_images

    batch_bytes = [jpeg_bytes[i % len(jpeg_bytes)] for i in range(bs)]
    pre = model.preprocess

    def e2e():
        px = preprocess_images(batch_bytes, pre, strict=False)
        p = softmax(model.run(px))
        return [model.classes[i] for i in p.argmax(1)]

    stats = latency_stats(time_loop(e2e, max(1, cfg.warmup // 2), cfg.iterations, cfg.duration), bs)
    return {f"e2e_{k}": v for k, v in stats.items() if k != "iterations"}


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _ram_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
        return round(kb / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        return None


# (row key, heading, width): a row with the power column is 112 characters, inside a 120-column terminal
COLUMNS = (("backend", "backend", 20), ("precision", "precision", 9), ("batch", "batch", 5), ("p50_ms", "p50 ms", 9),
           ("p99_ms", "p99 ms", 9), ("throughput_ips", "images/s", 9), ("e2e_p50_ms", "e2e p50 ms", 10), ("load_s", "load s", 7),
           ("first_inference_ms", "first ms", 9), ("accuracy", "accuracy", 8))
POWER_COLUMN = ("images_per_watt", "img/s/W", 7)
TABLE_WIDTH = 120


def _cell(v, width: int) -> str:
    """A number in at most ``width`` characters (4 significant figures for small ones), text left-aligned, None as '-'."""
    if v is None or (isinstance(v, float) and v != v):
        return "-".rjust(width)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        s = str(v)
        return (s if len(s) <= width else s[: width - 1] + "~").ljust(width)
    if isinstance(v, int):
        return str(v).rjust(width)
    s = f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return s.rjust(width)


def format_table(result: dict) -> str:
    """One line per backend x precision x batch size, at most 120 columns; a figure not measured prints '-'."""
    cols = COLUMNS + ((POWER_COLUMN,) if any(r.get("images_per_watt") is not None for r in result["rows"]) else ())
    text = ("backend", "precision")
    lines = [" ".join(t.ljust(w) if k in text else t.rjust(w) for k, t, w in cols)]
    lines += [" ".join(_cell(r.get(k), w) for k, _, w in cols) for r in result["rows"]]
    for s in result["skipped"]:
        lines.append(textwrap.fill(f"skipped {s['backend']} {s['precision']}: {s['reason']}", TABLE_WIDTH, subsequent_indent="  "))
    return "\n".join(lines)


def write_outputs(result: dict, json_path=None, csv_path=None, plot_path=None) -> None:
    if json_path:
        atomic_write_json(json_path, result)
    if csv_path and result["rows"]:
        keys = list(dict.fromkeys(k for r in result["rows"] for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(result["rows"])
        atomic_write_text(csv_path, buf.getvalue())
    if plot_path:
        plot(result, plot_path)


def plot(result: dict, path) -> None:
    """Latency and throughput per batch size; the x axis names the measured batch sizes, the title the device."""
    from .compare import device_label, plot_compare

    plot_compare([{**result, "_label": device_label(result), "_file": Path(path).name}], path, title=result.get("model"))
