"""The main job end to end (``edgeconv demo``, ``make demo``): train, export FP32 + INT8, verify on this
machine, benchmark against PyTorch eager, and one table with accuracy and latency per backend and precision."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edgeconv_runtime.bench import latency_stats, time_loop
from edgeconv_runtime.fileio import atomic_write_json
from edgeconv_runtime.manifest import Manifest
from edgeconv_runtime.preprocess import normalize

from . import checkpoint as ckpt
from .data import load_dataset
from .exporting import ExportRequest, export_run, format_manifest
from .model_card import extend_card
from .training import TrainConfig, train

# the official MNIST test files, looked for beside the working directory and beside this checkout (../shared/data,
# the default data folder); $EDGECONV_DATA/mnist instead when that is set (`make data` fills it): mnist_test_dirs()
MNIST_TEST_DIRS = (Path("../shared/data/mnist"), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")


def mnist_test_dirs() -> tuple:
    data = os.environ.get("EDGECONV_DATA")
    return (Path(data).expanduser() / "mnist",) if data else MNIST_TEST_DIRS


@dataclass
class DemoConfig:
    """The main job on its embedded default: chollet_mnist on mnist-5k with the recipe below, exported to
    ``precisions`` and measured at ``batch_sizes``."""

    out: str = "runs/demo"
    epochs: int = 30
    test_data: Optional[str] = None  # None: the official MNIST test files when present (mnist_test_dirs()), else a carved split
    json_path: Optional[str] = None  # also write the training metrics and the summary rows here
    data: str = "mnist-5k"
    model: str = "chollet_mnist"
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    batch_size: int = 64
    augment_preset: str = "digits"
    dropout: float = 0.25
    precisions: tuple = ("fp32", "int8")
    batch_sizes: tuple = (1, 32)

    def train_config(self, test_data: Optional[str]) -> TrainConfig:
        return TrainConfig(data=self.data, model=self.model, out=self.out, epochs=self.epochs, test_data=test_data,
                           optimizer=self.optimizer, lr=self.lr, lr_schedule=self.lr_schedule, batch_size=self.batch_size,
                           augment=True, augment_preset=self.augment_preset, dropout=self.dropout, force=True)


@dataclass
class DemoResult:
    out: Path  # the run directory
    bundle: Path
    train: dict  # the run's metrics.json
    manifest: Manifest
    verify: dict = field(default_factory=dict)  # precision -> the runtime's verify report on this machine
    rows: list = field(default_factory=list)  # one per backend, precision and batch size: summary_table's rows

    @property
    def exit_code(self) -> int:
        """0 when every exported precision verified on this machine, else 1."""
        return 0 if all(r.get("verify", "ok") == "ok" for r in self.rows) else 1


def default_test_data() -> Optional[str]:
    return next((str(d) for d in mnist_test_dirs() if d.is_dir()), None)


def run_demo(config: DemoConfig, progress: Callable[[str], None] = lambda line: None) -> DemoResult:
    """Train, export, verify and benchmark; ``progress`` receives a line as each step starts and ends."""
    test_data = config.test_data or default_test_data()
    progress(f"[1/4] train {config.model} on {config.data} ({config.epochs} epochs), test on {test_data or 'a carved split'}")
    m = train(config.train_config(test_data)).metrics
    progress(f"      test_accuracy {m['test_accuracy']}  val_accuracy {m['val_accuracy']:.4f}  {m['train_seconds']:.1f} s  "
             f"{m['train_images_per_second']:.0f} img/s")
    out, bundle = Path(config.out), Path(config.out) / "bundle"
    progress(f"[2/4] export {' + '.join(p.upper() for p in config.precisions)} -> {bundle}")
    manifest = export_run(ExportRequest(checkpoint=config.out, out=str(bundle), precisions=config.precisions, force=True))
    progress(format_manifest(manifest.to_dict()))
    result = DemoResult(out, bundle, m, manifest)
    x, y, split = evaluation_split(out)
    progress(f"[3/4] verify + [4/4] bench on this machine ({len(y)} {split} images for accuracy)")
    result.rows = torch_eager_row(out, x, y, config.batch_sizes)
    for precision in config.precisions:
        rows, v = runtime_rows(bundle, precision, x, y, config.batch_sizes)
        result.rows += rows
        result.verify[precision] = v
        progress(f"      verify {precision}: {'OK' if v['ok'] else 'FAILED'} (max|diff| {v['max_abs_diff']:.2e}, "
                 f"top-1 agreement {v['top1_agreement']:.3f})")
    extend_card(out, bundle, export=[a.to_dict() for a in manifest.artifacts], benchmarks=result.rows)
    if config.json_path:
        atomic_write_json(config.json_path, {"train": m, "rows": result.rows})
    return result


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
