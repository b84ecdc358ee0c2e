"""The ``edgeconv`` command: thin click wrappers over library functions."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from edgeconv_runtime.errors import EdgeconvError

from . import __version__


def user_errors(fn):
    """Print EdgeconvError as one line (no traceback) and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeconvError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(__version__, "--version", prog_name="edgeconv", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log each epoch.")
def cli(verbose: bool) -> None:
    """edgeconv: train image classifiers, export them, run them on a device."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def models_cmd(as_json: bool) -> None:
    """List registered models with parameter counts and input size."""
    from .models import count_parameters, create_model, get_model_entry, list_models

    rows = []
    for name in list_models():
        e = get_model_entry(name)
        ex = e.listed_example
        m = create_model(name, **ex)
        c, (h, w) = ex["in_channels"], ex["input_size"]
        rows.append({"name": name, "parameters": count_parameters(m), "input": f"{h}x{w}x{c}", "classes": ex["num_classes"], "pretrained": e.pretrained, "description": e.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<22} {'parameters':>12} {'input':>11} {'classes':>7}  description")
    for r in rows:
        click.echo(f"{r['name']:<22} {r['parameters']:>12,} {r['input']:>11} {r['classes']:>7}  {r['description']}")


def train_options(fn):
    opts = [
        click.option("--data", default=None, help="Image-folder root, IDX directory, mnist-5k or fashion-mnist."),
        click.option("--model", "model_name", default=None, help="Model name (see `edgeconv models`)."),
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--out", default=None, type=click.Path(file_okay=False), help="Run directory to write."),
        click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False), help="Continue the run in this directory from its last epoch."),
        click.option("--test-data", default=None, help="Take the test split from here (e.g. the official MNIST t10k files)."),
        click.option("--batch-size", type=int, default=None, help="Default: the model's."),
        click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "adamw", "sgd"]), default=None, help="Default: the model's."),
        click.option("--lr", type=float, default=None, help="Learning rate. Default: the model's."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--lr-schedule", type=click.Choice(["none", "cosine", "onecycle"]), default="none", show_default=True),
        click.option("--augment/--no-augment", default=False, show_default=True, help="The book's augmentation (rotation, shifts, shear, zoom, flip)."),
        click.option("--augment-preset", type=click.Choice(["book", "light", "digits"]), default=None, help="Default: the model's (digits: no flips)."),
        click.option("--dropout", type=float, default=None, help="Dropout before the dense head. Default: the model's."),
        click.option("--downsample", type=click.Choice(["max", "avg", "stride"]), default=None, help="Downsampling in the book's convnets (default max)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--patience", type=int, default=None, help="Early stopping: epochs without a better validation loss."),
        click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Carved from train when there is no validation split."),
        click.option("--size", type=int, default=None, help="Square input size for image folders. Default: the model's."),
        click.option("--resize", type=click.Choice(["stretch", "shorter_center_crop"]), default=None,
                     help="Resize policy: stretch the whole image (the book's) or crop the centre after resizing the shorter side. Default: the model's."),
        click.option("--label-smoothing", type=float, default=0.0, show_default=True),
        click.option("--threads", type=int, default=None, help="torch CPU threads."),
        click.option("--force", is_flag=True, help="Overwrite a run directory that already holds a model."),
        click.option("--strategy", type=click.Choice(["scratch", "feature-extract", "fine-tune"]), default=None,
                     help="Pretrained backbones: feature-extract (default), fine-tune, or scratch (random weights)."),
        click.option("--unfreeze", type=int, default=3, show_default=True, help="fine-tune: top blocks to unfreeze in phase 2."),
        click.option("--head-epochs", type=int, default=10, show_default=True, help="fine-tune: phase 1 epochs (head only)."),
        click.option("--head-augment/--no-head-augment", default=True, show_default=True,
                     help="fine-tune with --augment: augment phase 1 too (the book's); --no-head-augment trains the head on cached features in seconds."),
        click.option("--fine-tune-lr", type=float, default=None, help="fine-tune: phase 2 learning rate (default --lr / 10)."),
        click.option("--ema", type=float, default=None, help="fine-tune: validate and keep an exponential moving average of phase-2 weights with this decay (e.g. 0.99)."),
        click.option("--weights", type=click.Path(), default=None, help="Local ImageNet weights file for a backbone (offline use)."),
        click.option("--channels-last/--no-channels-last", default=True, show_default=True, help="NHWC layout for RGB models (faster CPU convolutions)."),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast in training where the CPU supports it (avx512_bf16/amx)."),
        click.option("--export", "export_targets", default=None, help="Export after training, e.g. onnx,int8 (bundle in OUT/bundle)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def interruptible() -> None:
    """Make SIGINT (Ctrl-C, ``kill -INT``) stop training and keep the best checkpoint, explicitly: a
    process started as a background job (``edgeconv train ... &``, nohup) inherits SIGINT as ignored,
    and Python then leaves it ignored, so the run could only be killed, losing metrics.json."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@cli.command("train")
@train_options
@user_errors
def train_cmd(model_name: str | None, export_targets: str | None, resume_dir: str | None, **kw) -> None:
    """Train a model and write a run directory (model.pt, metrics.json, history, curves.png)."""
    from .train import TrainConfig, train

    interruptible()
    if resume_dir:
        result = train(TrainConfig(data="", model="", out=resume_dir), resume=True)
        _report(result)
        return
    missing = [f"--{n}" for n, v in (("data", kw["data"]), ("model", model_name), ("out", kw["out"])) if not v]
    if missing:
        raise EdgeconvError(f"missing {', '.join(missing)}; `edgeconv train --data DATA --model NAME --out DIR` (or --resume DIR)")

    if export_targets:
        from .exporting import parse_targets

        targets = parse_targets(export_targets)  # refuse bad targets before training, not after
    result = train(TrainConfig(model=model_name, **kw))
    _report(result)
    if export_targets and int(os.environ.get("RANK", "0")) == 0:
        from .exporting import ExportRequest, export_run

        manifest = export_run(ExportRequest(checkpoint=str(result.out), out=str(result.out / "bundle"), formats=targets[0], precisions=targets[1], force=True))
        click.echo(format_manifest(manifest.to_dict()))


def _report(result) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    m = result.metrics
    test = f"{m['test_accuracy']:.4f}" if m["test_accuracy"] is not None else "n/a"
    click.echo(
        f"{m['model']}: test_accuracy {test}  val_accuracy {m['val_accuracy']:.4f}  best epoch {m['best_epoch']}/{m['epochs_run']}  "
        f"{m['train_seconds']:.1f} s  {m['train_images_per_second']:.0f} img/s  -> {result.out}"
    )
    if m["interrupted"]:
        sys.exit(130)


@cli.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--test-data", default=None, help="Default: ../shared/data/mnist when present, else a split carved from mnist-5k.")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Also write the summary rows as JSON.")
@user_errors
def demo_cmd(out: str, epochs: int, test_data: str | None, json_path: str | None) -> None:
    """The main job on its embedded default: chollet_mnist on mnist-5k, trained, exported
    (FP32 + INT8), verified and benchmarked against PyTorch eager."""
    from edgeconv_runtime.fileio import atomic_write_json

    from .exporting import ExportRequest, export_run
    from .pipeline import evaluation_split, runtime_rows, summary_table, torch_eager_row
    from .train import TrainConfig, train

    if test_data is None:
        for cand in (Path("../shared/data/mnist"), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"):
            if cand.is_dir():
                test_data = str(cand)
                break
    click.echo(f"[1/4] train chollet_mnist on mnist-5k ({epochs} epochs), test on {test_data or 'a carved split'}")
    cfg = TrainConfig(
        data="mnist-5k", model="chollet_mnist", out=out, epochs=epochs, test_data=test_data,
        optimizer="adam", lr=2e-3, lr_schedule="cosine", batch_size=64, augment=True, augment_preset="digits", dropout=0.25, force=True,
    )
    result = train(cfg)
    m = result.metrics
    click.echo(f"      test_accuracy {m['test_accuracy']}  val_accuracy {m['val_accuracy']:.4f}  {m['train_seconds']:.1f} s  {m['train_images_per_second']:.0f} img/s")
    bundle = Path(out) / "bundle"
    click.echo(f"[2/4] export FP32 + INT8 -> {bundle}")
    manifest = export_run(ExportRequest(checkpoint=out, out=str(bundle), precisions=("fp32", "int8"), force=True))
    click.echo(format_manifest(manifest.to_dict()))
    x, y, split = evaluation_split(Path(out))
    click.echo(f"[3/4] verify + [4/4] bench on this machine ({len(y)} {split} images for accuracy)")
    rows = torch_eager_row(Path(out), x, y)
    for precision in ("fp32", "int8"):
        r, v = runtime_rows(bundle, precision, x, y)
        rows += r
        click.echo(f"      verify {precision}: {'OK' if v['ok'] else 'FAILED'} (max|diff| {v['max_abs_diff']:.2e}, top-1 agreement {v['top1_agreement']:.3f})")
    click.echo("")
    click.echo(summary_table(rows))
    from .model_card import extend_card

    extend_card(Path(out), bundle, export=[a.to_dict() for a in manifest.artifacts], benchmarks=rows)
    if json_path:
        atomic_write_json(json_path, {"train": m, "rows": rows})
    click.echo(f"\nrun directory: {out}   bundle: {bundle}")
    if not all(r.get("verify", "ok") == "ok" for r in rows):
        sys.exit(1)


@cli.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--precision", "precision", default="fp32", show_default=True, help="Comma list of fp32, fp16, int8.")
@click.option("--format", "fmt", default="onnx", show_default=True, help="Comma list of onnx, tensorrt.")
@click.option("--calib-data", default=None, type=click.Path(), help="Folder of real images for INT8 calibration (default: the training split).")
@click.option("--calib-size", default=500, show_default=True, type=int, help="Calibration images (all if fewer).")
@click.option("--calib-method", default="minmax", show_default=True, type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--val-data", default=None, help="Parity images (default: the checkpoint's validation split).")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=float, help="Points an FP16/INT8 artifact may lose vs FP32.")
@click.option("--batch-min", default=1, show_default=True, type=int, help="TensorRT profile.")
@click.option("--batch-opt", default=8, show_default=True, type=int)
@click.option("--batch-max", default=32, show_default=True, type=int)
@click.option("--timing-cache", default=None, type=click.Path(), help="TensorRT timing cache file, reused across builds.")
@click.option("--force", is_flag=True, help="Replace an existing bundle (only once the new one is complete).")
@user_errors
def export_cmd(checkpoint, out, precision, fmt, **kw) -> None:
    """Export a trained model to a self-describing bundle, checking parity on real images."""
    from .exporting import ExportRequest, export_run, parse_targets

    formats, _ = parse_targets(fmt)
    _, precisions = parse_targets(precision)
    manifest = export_run(ExportRequest(checkpoint=checkpoint, out=out, precisions=precisions, formats=formats, **kw))
    click.echo(format_manifest(manifest.to_dict()))


def format_manifest(m: dict) -> str:
    lines = [f"bundle {m['name']}: {len(m['classes'])} classes, input {m['input']['shape']}, parity on {m['parity']['images']} real images, {m['export_seconds']:.1f} s"]
    for a in m["artifacts"]:
        p = a.get("parity") or {}
        extra = ""
        if p:
            extra = f"  max|diff| {p['max_abs_diff']:.2e}  top1 agree {p['top1_agreement']:.4f}  acc {p['accuracy']:.4f}"
        lines.append(f"  {a['file']:<20} {a['precision']:<5} {a['bytes'] / 1e6:8.2f} MB{extra}")
    if m.get("triton"):
        t = m["triton"]
        lines.append(f"  Triton model repository: {t['file']} ({t['platform']}, {t['precision']}, max_batch_size {t['max_batch_size']})")
    return "\n".join(lines)


def _runtime_passthrough(command: str):
    @cli.command(command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
                 help=f"Same as `edgeconv-runtime {command}` (torch-free runtime).")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def passthrough(args) -> None:
        from edgeconv_runtime.cli import main as runtime_main

        runtime_main([command, *args], prog="edgeconv")  # usage lines say `edgeconv predict`, as typed

    return passthrough


for _command in ("predict", "evaluate", "verify", "bench"):
    _runtime_passthrough(_command)


def main() -> None:
    cli(prog_name="edgeconv")


if __name__ == "__main__":
    main()
