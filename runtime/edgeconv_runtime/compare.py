"""Put bench runs from several devices side by side: one table, one plot.

Each input is a JSON file written by ``edgeconv-runtime bench --json`` or ``edgeconv-runtime tune --json``; a run names
its device (GPU, Jetson board or CPU model) and carries per-row latency, throughput and, where power was measured,
images per watt. Tune rows add their configuration (INT8 graph, threads, options) and mark the one tune chose.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import EdgeconvError
from .fileio import atomic_write_bytes

COLUMNS = (("device", "device", 34), ("backend", "backend", 20), ("precision", "prec", 5), ("batch", "batch", 5),
           ("p50_ms", "p50 ms", 9), ("p99_ms", "p99 ms", 9), ("throughput_ips", "images/s", 10), ("images_per_watt", "img/s/W", 8))
CONFIG_COLUMN = ("config", "config (tune; * chosen)", 26)
TEXT_KEYS = ("device", "backend", "precision", "config")


def require_matplotlib():
    """pyplot, or a one-line error before any measuring starts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EdgeconvError("--plot needs matplotlib (pip install matplotlib); run without --plot or install it first") from exc
    return plt


def device_label(run: dict) -> str:
    """A short name for the machine a run measured: Jetson board, GPU, or CPU model and cores."""
    env = run.get("environment") or {}
    jetson = env.get("jetson") or {}
    board = jetson.get("board") or jetson.get("model") if isinstance(jetson, dict) else None
    if board:
        mode = jetson.get("nvpmodel") or jetson.get("power_mode")
        return f"{board}" + (f" ({mode})" if mode else "")
    gpu = env.get("gpu") or {}
    backends = {r.get("backend", "") for r in run.get("rows", [])}
    if gpu.get("name") and any(b != "onnxruntime-cpu" and not b.startswith("openvino") for b in backends):
        return str(gpu["name"])
    cpu = env.get("cpu") or env.get("machine") or "unknown CPU"
    cores = env.get("cores")
    return f"{cpu}" + (f", {cores} cores" if cores else "")


def load_run(path) -> dict:
    p = Path(path)
    try:
        run = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise EdgeconvError(f"cannot read bench results {p} ({str(exc).splitlines()[0][:120]}); pass files written by "
                            "`edgeconv-runtime bench --json` or `tune --json`")
    if not isinstance(run, dict) or not isinstance(run.get("rows"), list) or not all(isinstance(r, dict) for r in run["rows"]):
        raise EdgeconvError(f"{p} is not a bench result (no 'rows'); pass files written by `edgeconv-runtime bench --json` or `tune --json`")
    bad = next((r for r in run["rows"] if not all(k in r for k in ("backend", "precision", "batch"))), None)
    if bad is not None:
        raise EdgeconvError(f"{p} has a row without backend, precision and batch; pass files written by `edgeconv-runtime bench --json` or `tune --json`")
    run["_label"] = device_label(run)
    run["_file"] = p.name
    return run


def _labels(runs: Sequence[dict]) -> List[str]:
    """Device labels, made unique with the file name where two runs share a device."""
    labels = [r["_label"] for r in runs]
    return [f"{l} [{r['_file']}]" if labels.count(l) > 1 else l for l, r in zip(labels, runs)]


def _columns(rows: Sequence[dict]) -> tuple:
    """COLUMNS, with the configuration after the precision where a tune run is among the inputs."""
    if not any(r.get("config") for r in rows):
        return COLUMNS
    return COLUMNS[:3] + (CONFIG_COLUMN,) + COLUMNS[3:]


def compare_rows(runs: Sequence[dict]) -> List[dict]:
    rows = []
    for label, run in zip(_labels(runs), runs):
        for r in run["rows"]:
            row = {"device": label, **{k: r.get(k) for k, _, _ in COLUMNS if k != "device"}}
            if r.get("config") is not None:
                row["config"] = ("* " if r.get("chosen") else "") + str(r["config"])
            rows.append(row)
    return sorted(rows, key=lambda r: (str(r["backend"]), str(r["precision"]), r["batch"], r["device"], str(r.get("config") or "")))


def _cell(v, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return (f"{v:.0f}" if v >= 1000 else f"{v:.3g}" if v < 10 else f"{v:.1f}").rjust(width)
    s = str(v)
    if isinstance(v, int):
        return s.rjust(width)
    return (s if width == 0 or len(s) <= width else s[: width - 1] + "~").ljust(width)


def format_compare(rows: Sequence[dict], markdown: bool = False) -> str:
    cols = _columns(rows)
    if markdown:
        head = "| " + " | ".join(t for _, t, _ in cols) + " |"
        sep = "|" + "|".join("---" if k in TEXT_KEYS else "---:" for k, _, _ in cols) + "|"
        body = ["| " + " | ".join(_cell(r.get(k), 0).strip() for k, _, _ in cols) + " |" for r in rows]
        return "\n".join([head, sep, *body])
    head = " ".join(t.ljust(w) if k in TEXT_KEYS else t.rjust(w) for k, t, w in cols)
    return "\n".join([head, *(" ".join(_cell(r.get(k), w) for k, _, w in cols) for r in rows)])


def batch_axis(ax, sizes: Sequence[int]) -> None:
    """Log-2 x axis whose ticks name the real batch sizes measured (1, 8, 32), not 2^0..2^5."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(sizes))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(s) for s in sorted(set(sizes))])
    ax.set_xlabel("batch size")


def plot_compare(runs: Sequence[dict], path, title: Optional[str] = None) -> None:
    plt = require_matplotlib()
    import io

    labels = _labels(runs)
    has_power = any(r.get("images_per_watt") for run in runs for r in run["rows"])
    panels = [("p50_ms", "p50 latency (ms)"), ("throughput_ips", "throughput (images/s)")]
    if has_power:
        panels.append(("images_per_watt", "images/s per watt"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    sizes = sorted({r["batch"] for run in runs for r in run["rows"]})
    for ax, (key, panel_title) in zip(axes, panels):
        for label, run in zip(labels, runs):
            series = {}
            for r in run["rows"]:
                series.setdefault(f"{r['backend']} {r['precision']}" + (f" {r['config']}" if r.get("config") else ""), []).append(r)
            for name, rs in sorted(series.items()):
                rs = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r["batch"])
                if rs:
                    ax.plot([r["batch"] for r in rs], [r[key] for r in rs], "o-", label=f"{label}: {name}")
        batch_axis(ax, sizes)
        ax.set_title(panel_title)
        ax.set_ylim(bottom=0)  # throughput and latency read honestly from zero
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle((f"{title} on " if title else "") + " vs ".join(dict.fromkeys(labels)), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def compare(paths: Sequence[str], markdown: bool = False, plot_path: Optional[str] = None) -> str:
    if plot_path:
        require_matplotlib()
    if not paths:
        raise EdgeconvError("compare needs at least one bench JSON file (edgeconv-runtime bench --json FILE)")
    runs = [load_run(p) for p in paths]
    text = format_compare(compare_rows(runs), markdown)
    if plot_path:
        plot_compare(runs, plot_path)
    return text
