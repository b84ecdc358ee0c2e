"""The main job end to end (``edgeconv demo``, ``make demo``): train, export (FP32 + INT8 by default), verify on this
machine, benchmark against PyTorch eager, and one table with accuracy and latency per backend and precision; on the
embedded MNIST default or on any data ``edgeconv train`` reads, optionally followed by the runtime's tuner."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edgeconv_runtime.bench import latency_stats, time_loop
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_json
from edgeconv_runtime.manifest import PRECISIONS, Manifest
from edgeconv_runtime.preprocess import normalize

from . import checkpoint as ckpt
from .data import inspect_source, load_dataset
from .exporting import ExportRequest, export_run, format_manifest
from .model_card import extend_card
from .training import TrainConfig, train

# the official MNIST test files, looked for beside the working directory and beside this checkout (../shared/data,
# the default data folder); $EDGECONV_DATA/mnist instead when that is set (`make data` fills it): mnist_test_dirs()
MNIST_TEST_DIRS = (Path("../shared/data/mnist"), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")


def mnist_test_dirs() -> tuple:
    data = os.environ.get("EDGECONV_DATA")
    return (Path(data).expanduser() / "mnist",) if data else MNIST_TEST_DIRS


EMBEDDED_DATA, EMBEDDED_MODEL, EMBEDDED_EPOCHS = "mnist-5k", "chollet_mnist", 30
TUNE_BUDGET_S = 60.0  # --tune: the runtime tuner's time budget


@dataclass
class DemoConfig:
    """The main job. Without ``data`` (and with chollet_mnist): the embedded default, chollet_mnist on mnist-5k with
    the recipe below, tested on the official MNIST test files when present. With ``data`` (anything ``edgeconv train
    --data`` reads) training is ``edgeconv train``'s with the same ``model``, ``strategy``, ``epochs`` and
    ``test_data``: the model's own defaults, the data's own test split unless ``test_data`` names one. Either way
    the run is exported to ``precisions`` and measured at ``batch_sizes``; ``tune`` then runs the runtime's tuner."""

    out: str = "runs/demo"
    epochs: Optional[int] = None  # None: 30 on the embedded default, else TrainConfig's default
    test_data: Optional[str] = None  # None: the official MNIST test files without `data` (mnist_test_dirs()), else the data's own split
    json_path: Optional[str] = None  # also write the training metrics and the summary rows here
    data: Optional[str] = None  # None: the embedded mnist-5k
    model: Optional[str] = None  # None: chollet_mnist on 28x28 array data (mnist-5k, IDX, fashion-mnist); an image folder needs one
    strategy: Optional[str] = None  # scratch | feature-extract | fine-tune; None: the model's (TrainConfig.resolved)
    precisions: tuple = ("fp32", "int8")
    tune: bool = False  # after export + verify: edgeconv_runtime.tune on the bundle, for latency
    # the embedded default's recipe (chollet_mnist on mnist-5k); other runs take the model's defaults, as `edgeconv train`
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    batch_size: int = 64
    augment_preset: str = "digits"
    dropout: float = 0.25
    batch_sizes: tuple = (1, 32)

    @property
    def embedded(self) -> bool:
        """Whether this is the embedded default (mnist-5k, chollet_mnist, the recipe above)."""
        return self.data is None and self.model in (None, EMBEDDED_MODEL)

    def resolved_model(self, info=None) -> str:
        """``model``, else chollet_mnist for 28x28 array data; an image folder without a model is refused."""
        if self.model:
            return self.model
        info = info or inspect_source(self.data or EMBEDDED_DATA)
        if info.kind != "arrays":
            raise EdgeconvError(f"--data {self.data} is an image folder: pass --model NAME (`edgeconv models` lists them), "
                                "e.g. --model efficientnet_lite0 --strategy feature-extract")
        return EMBEDDED_MODEL

    def train_config(self, test_data: Optional[str], info=None) -> TrainConfig:
        if self.embedded:
            epochs = EMBEDDED_EPOCHS if self.epochs is None else self.epochs
            return TrainConfig(data=EMBEDDED_DATA, model=EMBEDDED_MODEL, out=self.out, epochs=epochs, test_data=test_data,
                               optimizer=self.optimizer, lr=self.lr, lr_schedule=self.lr_schedule, batch_size=self.batch_size,
                               augment=True, augment_preset=self.augment_preset, dropout=self.dropout, strategy=self.strategy, force=True)
        epochs = {} if self.epochs is None else {"epochs": self.epochs}
        return TrainConfig(data=self.data or EMBEDDED_DATA, model=self.resolved_model(info), out=self.out, test_data=test_data,
                           strategy=self.strategy, force=True, **epochs)


def parse_precisions(spec) -> tuple:
    """'fp32,int8' (or a sequence of names) -> ('fp32', 'int8'); an unknown or missing precision is an error."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for name in (str(n).strip().lower() for n in names):
        if name not in PRECISIONS:
            raise EdgeconvError(f"unknown precision {name!r}; use a comma list of {', '.join(PRECISIONS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise EdgeconvError(f"no precision given; use a comma list of {', '.join(PRECISIONS)}")
    return tuple(out)


def load_tuner() -> tuple:
    """(TuneConfig, run_tune, format_tune_table) from the runtime's tuner, imported only for --tune; without it a one-line error."""
    try:
        from edgeconv_runtime.tune import TuneConfig, format_tune_table, run_tune
    except ImportError as exc:
        raise EdgeconvError(f"--tune needs the runtime's tuner, edgeconv_runtime.tune (TuneConfig, run_tune, format_tune_table), "
                            f"which this install cannot import ({' '.join(str(exc).split())}); run the demo without --tune") from None
    return TuneConfig, run_tune, format_tune_table


def evaluation_folder(data: str, test_data: Optional[str] = None) -> Optional[str]:
    """The folder of class sub-folders holding the split evaluation_split() measures accuracy on (``test_data``'s test
    split, else the data's test split, else its validation split), None when that split is no image folder of its own
    (array data, or a validation split carved from train)."""
    if test_data:
        info = inspect_source(test_data)
        name = "test" if "test" in info.splits else next(iter(info.splits))  # as load_dataset takes --test-data
    else:
        info = inspect_source(data)
        name = "test" if "test" in info.splits else "val"
    return str(info.splits[name]) if info.kind == "image-folder" and name in info.splits else None


def _test_split_words(test_data: Optional[str], info) -> str:
    if test_data:
        return test_data
    return "its test split" if "test" in info.splits else "its validation split" if "val" in info.splits else "a carved split"


@dataclass
class DemoResult:
    out: Path  # the run directory
    bundle: Path
    train: dict  # the run's metrics.json
    manifest: Manifest
    verify: dict = field(default_factory=dict)  # precision -> the runtime's verify report on this machine
    rows: list = field(default_factory=list)  # one per backend, precision and batch size: summary_table's rows
    tune: Optional[dict] = None  # --tune: run_tune's result (its "chosen" row, or None)
    tune_table: Optional[str] = None  # --tune: format_tune_table of it, printed after the summary table

    @property
    def exit_code(self) -> int:
        """0 when every exported precision verified on this machine, else 1."""
        return 0 if all(r.get("verify", "ok") == "ok" for r in self.rows) else 1


def default_test_data() -> Optional[str]:
    return next((str(d) for d in mnist_test_dirs() if d.is_dir()), None)


def run_demo(config: DemoConfig, progress: Callable[[str], None] = lambda line: None) -> DemoResult:
    """Train, export, verify and benchmark (then tune, with ``config.tune``); ``progress`` receives a line as each step
    starts and ends. Bad input (precision, data path, model, a missing tuner) is refused before training."""
    precisions = parse_precisions(config.precisions)
    tuner = load_tuner() if config.tune else None
    info = inspect_source(config.data or EMBEDDED_DATA)
    test_data = config.test_data or (default_test_data() if config.data is None else None)
    if config.test_data:
        inspect_source(config.test_data)  # a --test-data path that is not there: refused before training too
    tc = config.train_config(test_data, info)
    tc.resolved()  # an unknown model, strategy or epoch count: refused here, before anything is written
    n = 5 if tuner else 4
    progress(f"[1/{n}] train {tc.model} on {tc.data} ({tc.epochs} epochs), test on {_test_split_words(test_data, info)}")
    m = train(tc).metrics
    progress(f"      test_accuracy {m['test_accuracy']}  val_accuracy {m['val_accuracy']:.4f}  {m['train_seconds']:.1f} s  "
             f"{m['train_images_per_second']:.0f} img/s")
    out, bundle = Path(config.out), Path(config.out) / "bundle"
    progress(f"[2/{n}] export {' + '.join(p.upper() for p in precisions)} -> {bundle}")
    manifest = export_run(ExportRequest(checkpoint=config.out, out=str(bundle), precisions=precisions, force=True))
    progress(format_manifest(manifest.to_dict()))
    result = DemoResult(out, bundle, m, manifest)
    x, y, split = evaluation_split(out)
    progress(f"[3/{n}] verify + [4/{n}] bench on this machine ({len(y)} {split} images for accuracy)")
    result.rows = torch_eager_row(out, x, y, config.batch_sizes)
    for precision in precisions:
        rows, v = runtime_rows(bundle, precision, x, y, config.batch_sizes)
        result.rows += rows
        result.verify[precision] = v
        progress(f"      verify {precision}: {'OK' if v['ok'] else 'FAILED'} (max|diff| {v['max_abs_diff']:.2e}, "
                 f"top-1 agreement {v['top1_agreement']:.3f})")
    extend_card(out, bundle, export=[a.to_dict() for a in manifest.artifacts], benchmarks=result.rows)
    if config.json_path:
        atomic_write_json(config.json_path, {"train": m, "rows": result.rows})
    if tuner:
        tune_config, run_tune, format_tune_table = tuner
        images = evaluation_folder(tc.data, tc.test_data)
        progress(f"[5/{n}] tune {bundle} for latency ({TUNE_BUDGET_S:.0f} s budget{', images from ' + images if images else ''})")
        result.tune = run_tune(tune_config(bundle=str(bundle), data=images, objective="latency", budget_s=TUNE_BUDGET_S))
        result.tune_table = format_tune_table(result.tune)
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
