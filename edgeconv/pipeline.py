"""The main job end to end: train, export FP32 + INT8, verify on this machine, benchmark against
PyTorch eager, and one table with accuracy and latency per backend and precision."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgeconv_runtime.bench import latency_stats, time_loop
from edgeconv_runtime.preprocess import normalize

from . import checkpoint as ckpt
from .data import load_dataset


def torch_eager_row(run_dir: Path, x_test: np.ndarray, y_test: np.ndarray, batch_sizes=(1, 32), duration: float = 1.5) -> list:
    """PyTorch eager figures for the trained checkpoint, measured like the runtime's bench."""
    t0 = time.perf_counter()
    model, _ = ckpt.model_from_checkpoint(ckpt.load_checkpoint(run_dir))
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(x_test[i : i + 512])) for i in range(0, len(x_test), 512)]).numpy()
    acc = float((logits.argmax(1) == y_test).mean())
    rows = []
    for bs in batch_sizes:
        xb = torch.from_numpy(np.ascontiguousarray(x_test[:bs]))
        with torch.inference_mode():
            times = time_loop(lambda: model(xb), 10, None, duration)
        rows.append({"backend": "pytorch-eager", "precision": "fp32", "batch": bs, "accuracy": acc, "load_s": load_s, **latency_stats(times, bs)})
    return rows


def runtime_rows(bundle: Path, precision: str, x_test: np.ndarray, y_test: np.ndarray, batch_sizes=(1, 32), duration: float = 1.5) -> tuple:
    from edgeconv_runtime import Model

    t0 = time.perf_counter()
    model = Model.load(bundle, precision=precision)
    load_s = time.perf_counter() - t0
    verify = model.verify()
    logits = np.concatenate([model.run(x_test[i : i + 512]) for i in range(0, len(x_test), 512)])
    acc = float((logits.argmax(1) == y_test).mean())
    rows = []
    for bs in batch_sizes:
        xb = np.ascontiguousarray(x_test[:bs])
        times = time_loop(lambda: model.run(xb), 10, None, duration)
        rows.append({"backend": model.backend_name, "precision": precision, "batch": bs, "accuracy": acc, "load_s": load_s,
                     "verify": "ok" if verify["ok"] else "FAILED", **latency_stats(times, bs)})
    return rows, verify


def evaluation_split(run_dir: Path):
    """The run's test split (else validation) as preprocessed arrays."""
    ck = ckpt.load_checkpoint(run_dir)
    data = ck["data"]
    _, pre = ckpt.model_from_checkpoint(ck)
    ds = load_dataset(data["source"], pre, test_data=data.get("test_source"), val_fraction=data.get("val_fraction", 0.1), seed=data.get("seed", 0))
    split = ds.test if ds.test is not None else ds.val
    return normalize(split.pixels, pre), split.labels, split.name


def summary_table(rows: list) -> str:
    head = f"{'backend':<18} {'precision':<9} {'batch':>5} {'accuracy':>9} {'p50 ms':>9} {'p99 ms':>9} {'images/s':>10} {'verify':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<18} {r['precision']:<9} {r['batch']:>5} {r['accuracy']:>9.4f} {r['p50_ms']:>9.4f} {r['p99_ms']:>9.4f} "
                     f"{r['throughput_ips']:>10.0f} {r.get('verify', '-'):>7}")
    return "\n".join(lines)
