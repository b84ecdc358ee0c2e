"""Benchmark protocol: per backend x precision x batch size, load and first-inference time apart
from steady state, model-only apart from end-to-end (JPEG bytes -> label), accuracy beside speed,
and the environment it ran in."""
from __future__ import annotations

import csv
import io
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import BackendUnavailable, EdgeconvError
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from .gpu import gpu_info, jetson_model


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
        env["jetson"] = jetson_facts()
    return env


def jetson_facts() -> dict:
    facts = {"model": jetson_model()}
    try:
        facts["l4t"] = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    except OSError:
        facts["l4t"] = None
    try:
        import subprocess

        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
        facts["nvpmodel"] = " ".join(out.stdout.split()) or None
    except (OSError, subprocess.SubprocessError):
        facts["nvpmodel"] = None
    return facts


class Tegrastats:
    """Samples tegrastats on a Jetson while a measurement runs: mean power in watts."""

    def __init__(self):
        self.proc = None
        self.samples: list = []

    def __enter__(self):
        import shutil
        import subprocess

        if jetson_model() and shutil.which("tegrastats"):
            self.proc = subprocess.Popen(["tegrastats", "--interval", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            import re

            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=5)
            for line in out.splitlines():
                # e.g. "VDD_IN 5012mW/5012mW" (Orin) or "POM_5V_IN 3200/3200" (Nano/Xavier)
                m = re.search(r"(?:VDD_IN|POM_5V_IN)\s+(\d+)(?:mW)?/", line)
                if m:
                    self.samples.append(int(m.group(1)) / 1000.0)

    @property
    def mean_watts(self) -> Optional[float]:
        return float(np.mean(self.samples)) if self.samples else None


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


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every combination in ``cfg``; returns {"environment", "rows", "skipped"}."""
    from .bundle import read_bundle
    from .model import Model, softmax
    from .preprocess import preprocess_images

    bundle = read_bundle(cfg.bundle)
    ref = bundle.manifest.get("reference") or {}
    root = Path(cfg.bundle)
    ref_x = np.load(root / ref["inputs"]).astype(np.float32) if ref.get("inputs") else None
    if ref_x is None:
        raise EdgeconvError("the bundle has no reference inputs to benchmark with; re-export it")
    jpeg_bytes = [(root / f).read_bytes() for f in ref.get("images", [])]
    rows, skipped = [], []
    combos = [(b, p) for b in cfg.backends for p in cfg.precisions]
    progress = _Progress(len(combos) * len(cfg.batch_sizes), cfg.progress)
    for backend, precision in combos:
        t0 = time.perf_counter()
        try:
            model = Model.load(cfg.bundle, backend=backend, precision=precision, threads=cfg.threads)
        except (BackendUnavailable, EdgeconvError) as exc:
            skipped.append({"backend": backend, "precision": precision, "reason": str(exc)})
            for _ in cfg.batch_sizes:
                progress.step(f"{backend} {precision} skipped")
            continue
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        model.run(ref_x[:1])
        first_ms = (time.perf_counter() - t1) * 1e3
        accuracy = model.evaluate(cfg.data)["accuracy"] if cfg.data else None
        for bs in cfg.batch_sizes:
            x = np.ascontiguousarray(np.resize(ref_x, (bs, *ref_x.shape[1:])))
            with Tegrastats() as tegra:
                times = time_loop(lambda: model.run(x), cfg.warmup, cfg.iterations, cfg.duration)
            row = {"backend": model.backend_name, "precision": precision, "batch": bs, "load_s": load_s, "first_inference_ms": first_ms,
                   "threads": getattr(model.backend, "threads", None), **latency_stats(times, bs)}
            if tegra.mean_watts:
                row["watts"] = tegra.mean_watts
                row["images_per_watt"] = row["throughput_ips"] / tegra.mean_watts
            if cfg.end_to_end and jpeg_bytes:
                batch_bytes = [jpeg_bytes[i % len(jpeg_bytes)] for i in range(bs)]
                pre = model.preprocess

                def e2e():
                    px = preprocess_images(batch_bytes, pre, strict=False)
                    p = softmax(model.run(px))
                    return [model.classes[i] for i in p.argmax(1)]

                e2e_stats = latency_stats(time_loop(e2e, max(1, cfg.warmup // 2), cfg.iterations, cfg.duration), bs)
                row.update({f"e2e_{k}": v for k, v in e2e_stats.items() if k != "iterations"})
                row["e2e_over_model_p50"] = row["e2e_p50_ms"] / row["p50_ms"]
            row["accuracy"] = accuracy
            rows.append(row)
            progress.step(f"{model.backend_name} {precision} batch {bs}")
        model.close()
    return {"bundle": str(Path(cfg.bundle).resolve()), "model": bundle.name, "environment": environment(cfg.threads), "rows": rows, "skipped": skipped}


COLUMNS = ("backend", "precision", "batch", "p50_ms", "p99_ms", "throughput_ips", "e2e_p50_ms", "load_s", "first_inference_ms", "accuracy")


def format_table(result: dict) -> str:
    lines = [" ".join(f"{c:>18}" for c in COLUMNS)]
    for r in result["rows"]:
        vals = []
        for c in COLUMNS:
            v = r.get(c)
            vals.append(f"{v:>18.4f}" if isinstance(v, float) else f"{str(v):>18}")
        lines.append(" ".join(vals))
    for s in result["skipped"]:
        lines.append(f"skipped {s['backend']} {s['precision']}: {s['reason']}")
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EdgeconvError("--plot needs matplotlib (pip install matplotlib)") from exc
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    series = {}
    for r in result["rows"]:
        series.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        a1.plot([r["batch"] for r in rs], [r["p50_ms"] for r in rs], "o-", label=label)
        a2.plot([r["batch"] for r in rs], [r["throughput_ips"] for r in rs], "o-", label=label)
    for ax, title in ((a1, "p50 latency (ms)"), (a2, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
