"""Helpers for benchmark scripts: where the shared data lives, table printing, JSON output."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECONV_DATA") or ROOT.parent / "shared" / "data").expanduser()  # `make data` fills it
RESULTS = ROOT / "benchmarks" / "results"


def cpu_meta() -> dict:
    """The CPU's model name, whether it has VNNI, and the flags that decide INT8 kernels: for every INT8 figure."""
    try:
        features = Path("/proc/cpuinfo").read_text()
    except OSError:
        features = ""
    name = next((l.split(":", 1)[1].strip() for l in features.splitlines() if l.startswith("model name")), platform.processor())
    return {"cpu": name, "vnni": "avx512_vnni" in features.split(),
            "flags": sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in features.split())}


def environment() -> dict:
    import torch

    cpu = cpu_meta()["cpu"]
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__), "python": platform.python_version()}


def table(rows: list, columns: list) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r.get(c, "") for c in columns]) for r in rows]
    return "\n".join(out)


def write_json(name: str, obj) -> Path:
    from edgeconv_runtime.fileio import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    atomic_write_json(path, obj)
    return path
