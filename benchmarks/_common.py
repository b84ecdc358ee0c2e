"""Helpers for benchmark scripts: where the shared data lives, table printing, JSON output."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECONV_DATA") or ROOT.parent / "shared" / "data").expanduser()  # `make data` fills it
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
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
