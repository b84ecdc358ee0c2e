"""The ``edgeconv`` command: thin click wrappers over library functions."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Callable, Optional

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


class DeferredOptions(click.Command):
    """A command whose options are built the first time it parses or prints help, not when this module is imported:
    their defaults and choices come from the dataclasses and names they fill (TrainConfig, DemoConfig, ExportRequest),
    whose modules import torch, and `edgeconv --version` or `edgeconv predict` must not pay for that."""

    def __init__(self, *args, options: Callable[[], list], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._options: Optional[Callable[[], list]] = options

    def get_params(self, ctx: click.Context) -> list:
        if self._options is not None:
            self.params = [*self._options(), *self.params]
            self._options = None
        return super().get_params(ctx)


def field_defaults(cls) -> dict:
    """{field name: default} of a dataclass's fields that have a plain default."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def field_option(defaults: dict, name: str, *decls: str, **attrs) -> click.Option:
    """The option filling field ``name`` (``--name`` unless ``decls`` say otherwise) with that field's default,
    shown in --help when it is not None."""
    attrs.setdefault("show_default", defaults[name] is not None)
    return click.Option([*(decls or (f"--{name.replace('_', '-')}",)), name], default=defaults[name], **attrs)


def train_options() -> list:
    from edgeconv_runtime.preprocess import RESIZE_POLICIES

    from .augment import PRESETS
    from .models.chollet import DOWNSAMPLING
    from .training import TrainConfig
    from .training.config import OPTIMIZERS, SCHEDULES, STRATEGIES

    d = field_defaults(TrainConfig) | {"data": None, "model": None, "out": None}  # required, but not with --resume
    o = functools.partial(field_option, d)
    return [
        o("data", help="Image-folder root, IDX directory, mnist-5k or fashion-mnist."),
        o("model", help="Model name (see `edgeconv models`)."),
        o("epochs"),
        o("out", type=click.Path(file_okay=False), help="Run directory to write."),
        click.Option(["--resume", "resume_dir"], type=click.Path(file_okay=False), help="Continue the run in this directory from its last epoch."),
        o("test_data", help="Take the test split from here (e.g. the official MNIST t10k files)."),
        o("batch_size", type=int, help="Default: the model's."),
        o("optimizer", type=click.Choice(OPTIMIZERS), help="Default: the model's."),
        o("lr", type=float, help="Learning rate. Default: the model's."),
        o("weight_decay"),
        o("lr_schedule", type=click.Choice(SCHEDULES)),
        o("augment", "--augment/--no-augment", help="The book's augmentation (rotation, shifts, shear, zoom, flip)."),
        o("augment_preset", type=click.Choice(list(PRESETS)), help="Default: the model's (digits: no flips)."),
        o("dropout", type=float, help="Dropout before the dense head. Default: the model's."),
        o("downsample", type=click.Choice(DOWNSAMPLING), help=f"Downsampling in the book's convnets (default {DOWNSAMPLING[0]})."),
        o("seed"),
        o("patience", type=int, help="Early stopping: epochs without a better validation loss."),
        o("val_fraction", help="Carved from train when there is no validation split."),
        o("size", type=int, help="Square input size for image folders. Default: the model's."),
        o("resize", type=click.Choice(RESIZE_POLICIES),
          help="Resize policy: stretch the whole image (the book's) or crop the centre after resizing the shorter side. Default: the model's."),
        o("label_smoothing"),
        o("threads", type=int, help="torch CPU threads."),
        o("force", is_flag=True, show_default=False, help="Overwrite a run directory that already holds a model."),
        o("strategy", type=click.Choice(STRATEGIES), help="Pretrained backbones: feature-extract (default), fine-tune, or scratch (random weights)."),
        o("unfreeze", help="fine-tune: top blocks to unfreeze in phase 2."),
        o("head_epochs", help="fine-tune: phase 1 epochs (head only)."),
        o("head_augment", "--head-augment/--no-head-augment",
          help="fine-tune with --augment: augment phase 1 too (the book's); --no-head-augment trains the head on cached features in seconds."),
        o("fine_tune_lr", type=float, help="fine-tune: phase 2 learning rate (default --lr / 10)."),
        o("ema", type=float, help="fine-tune: validate and keep an exponential moving average of phase-2 weights with this decay (e.g. 0.99)."),
        o("weights", type=click.Path(), help="Local ImageNet weights file for a backbone (offline use)."),
        o("channels_last", "--channels-last/--no-channels-last", help="NHWC layout for RGB models (faster CPU convolutions)."),
        o("bf16", is_flag=True, show_default=False, help="bfloat16 autocast in training where the CPU supports it (avx512_bf16/amx)."),
        o("qat", is_flag=True, show_default=False,
          help="Then quantization-aware training: fine-tune the best weights with fake quantization (OUT/qat.onnx, the bundle's INT8 graph)."),
        o("qat_epochs", help="--qat: epochs of quantization-aware training."),
        o("qat_lr", type=float, help="--qat: learning rate (default --lr / 100)."),
        o("qat_images", type=int, help="--qat: training images per epoch, a seeded sample (default all)."),
        click.Option(["--from", "from_run"], type=click.Path(file_okay=False), help="--qat on a run already trained: its directory."),
        click.Option(["--export", "export_targets"], help="Export after training, e.g. onnx,int8 (bundle in OUT/bundle)."),
    ]


def interruptible() -> None:
    """Make SIGINT (Ctrl-C, ``kill -INT``) stop training and keep the best checkpoint, explicitly: a
    process started as a background job (``edgeconv train ... &``, nohup) inherits SIGINT as ignored,
    and Python then leaves it ignored, so the run could only be killed, losing metrics.json."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@cli.command("train", cls=DeferredOptions, options=train_options)
@user_errors
def train_cmd(export_targets: Optional[str], resume_dir: Optional[str], from_run: Optional[str], **kw) -> None:
    """Train a model and write a run directory (model.pt, metrics.json, history, curves.png)."""
    from .training import TrainConfig, train

    interruptible()
    if from_run:
        _qat_only(from_run, resume_dir, export_targets, kw)
        return
    if resume_dir:
        _report(train(TrainConfig(data="", model="", out=resume_dir), resume=True))
        return
    missing = [f"--{n}" for n in ("data", "model", "out") if not kw[n]]
    if missing:
        raise EdgeconvError(f"missing {', '.join(missing)}; `edgeconv train --data DATA --model NAME --out DIR` (or --resume DIR)")
    if export_targets:
        from .exporting import parse_targets

        formats, precisions = parse_targets(export_targets)  # refuse bad targets before training, not after
    result = train(TrainConfig(**kw))
    _report(result)
    if result.metrics.get("qat"):
        _report_qat(result.metrics["qat"], result.out)
    if export_targets and int(os.environ.get("RANK", "0")) == 0:
        from .exporting import ExportRequest, export_run, format_manifest

        manifest = export_run(ExportRequest(checkpoint=str(result.out), out=str(result.out / "bundle"), formats=formats, precisions=precisions,
                                            force=True))
        click.echo(format_manifest(manifest.to_dict()))


def _qat_only(from_run: str, resume_dir: Optional[str], export_targets: Optional[str], kw: dict) -> None:
    """`edgeconv train --qat --from RUN`: quantization-aware training of a run already trained."""
    from pathlib import Path

    from .training.qat import QatSettings, qat_from_run

    if not kw["qat"]:
        raise EdgeconvError("--from RUN is for quantization-aware training of a trained run; add --qat")
    clash = [f"--{n}" for n in ("data", "model", "out") if kw[n]] + (["--resume"] if resume_dir else [])
    if clash:
        raise EdgeconvError(f"--from RUN takes the data, model and run directory from RUN; drop {', '.join(clash)}")
    if export_targets:
        from .exporting import parse_targets

        formats, precisions = parse_targets(export_targets)
    settings = QatSettings(kw["qat_epochs"], kw["qat_lr"], kw["threads"], images=kw["qat_images"])
    _report_qat(qat_from_run(from_run, settings), Path(from_run))
    if export_targets:
        from .exporting import ExportRequest, export_run, format_manifest

        manifest = export_run(ExportRequest(checkpoint=from_run, out=str(Path(from_run) / "bundle"), formats=formats, precisions=precisions, force=True))
        click.echo(format_manifest(manifest.to_dict()))


def _report_qat(q: dict, out) -> None:
    click.echo(f"qat: val_accuracy float {q['val_accuracy_float']:.4f}  INT8 {q['val_accuracy_int8']:.4f} "
               f"(before QAT {q['val_accuracy_int8_before']:.4f}; agrees with fake quantization on {q['fake_quant_top1_agreement']:.4f})  "
               f"best epoch {q['best_epoch']}/{q['epochs_run']}  {q['seconds']:.1f} s  -> {out}/{q['file']}")


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


def demo_options() -> list:
    from edgeconv_runtime.manifest import PRECISIONS

    from .pipeline import EMBEDDED_EPOCHS, TUNE_BUDGET_S, DemoConfig
    from .training.config import STRATEGIES, TrainConfig

    d = field_defaults(DemoConfig)
    o = functools.partial(field_option, d)
    return [
        o("data", help="Train on this instead of the embedded mnist-5k: image-folder root, IDX directory, mnist-5k or fashion-mnist "
                       "(as `edgeconv train --data`; the model's own training defaults)."),
        o("model", help="Model name (see `edgeconv models`). Default: chollet_mnist (28x28 data); an image folder needs one."),
        o("strategy", type=click.Choice(STRATEGIES), help="Pretrained backbones: feature-extract (default), fine-tune, or scratch (as `edgeconv train`)."),
        o("out", type=click.Path(file_okay=False)),
        o("epochs", type=int, help=f"Default: {EMBEDDED_EPOCHS} on the embedded mnist-5k, else `edgeconv train`'s ({field_defaults(TrainConfig)['epochs']})."),
        o("test_data", help="Take the test split from here. Default: without --data, ../shared/data/mnist when present, else a split "
                            "carved from mnist-5k; with --data, its own test split (else its validation split)."),
        click.Option(["--precision", "precisions"], default=",".join(d["precisions"]), show_default=True,
                     help=f"Comma list of {', '.join(PRECISIONS)}: exported, verified and benchmarked."),
        o("tune", is_flag=True, show_default=False,
          help=f"Then run the runtime's tuner on the bundle (edgeconv_runtime.tune, latency, {TUNE_BUDGET_S:.0f} s) and print its table."),
        o("json_path", "--json", type=click.Path(), help="Also write the summary rows as JSON."),
    ]


@cli.command("demo", cls=DeferredOptions, options=demo_options)
@user_errors
def demo_cmd(precisions: str, **kw) -> None:
    """The main job in one command: train, export (FP32 + INT8 by default), verify on this machine and benchmark
    against PyTorch eager; one table of accuracy and latency per backend and precision (exit status 1 when a precision
    fails to verify). Without --data: chollet_mnist on the embedded mnist-5k (`make demo`). With --data: any data
    `edgeconv train` reads, trained as it would, e.g.

    \b
      edgeconv demo --data ../shared/data/cats_and_dogs_small --model efficientnet_lite0 --strategy feature-extract
    """
    from .pipeline import DemoConfig, parse_precisions, run_demo, summary_table

    result = run_demo(DemoConfig(precisions=parse_precisions(precisions), **kw), progress=click.echo)
    click.echo("")
    click.echo(summary_table(result.rows))
    if result.tune_table is not None:
        click.echo("")
        click.echo(result.tune_table)
    click.echo(f"\nrun directory: {result.out}   bundle: {result.bundle}")
    sys.exit(result.exit_code)


def export_options() -> list:
    from edgeconv_export.bundle import FORMATS
    from edgeconv_export.precision import CALIBRATION_METHODS
    from edgeconv_runtime.manifest import PRECISIONS

    from .exporting import ExportRequest

    d = field_defaults(ExportRequest)
    o = functools.partial(field_option, d)
    return [
        click.Option(["--out"], required=True, type=click.Path(), help="Bundle directory to write."),
        click.Option(["--precision", "precision"], default=",".join(d["precisions"]), show_default=True,
                     help=f"Comma list of {', '.join(PRECISIONS)}."),
        click.Option(["--format", "fmt"], default=",".join(d["formats"]), show_default=True, help=f"Comma list of {', '.join(FORMATS)}."),
        o("calib_data", type=click.Path(), help="Folder of real images for INT8 calibration (default: the training split)."),
        o("calib_size", help="Calibration images (all if fewer)."),
        o("calibration_method", "--calib-method", type=click.Choice(CALIBRATION_METHODS)),
        o("val_data", help="Parity images (default: the checkpoint's validation split)."),
        o("opset"),
        o("max_accuracy_drop", help="Points an FP16/INT8 artifact may lose vs FP32."),
        o("max_agreement_drop", help="Without class labels for the parity images: points of top-1 agreement with FP32 it may lose."),
        o("max_float_nodes", help="Accuracy-aware INT8: quantized nodes that may be kept in float to meet the drop (0: off)."),
        o("batch_min", help="TensorRT profile."),
        o("batch_opt"),
        o("batch_max"),
        o("timing_cache", type=click.Path(), help="TensorRT timing cache file, reused across builds."),
        o("force", is_flag=True, show_default=False, help="Replace an existing bundle (only once the new one is complete)."),
        o("sign_key", type=click.Path(), help="Sign the bundle with this Ed25519 key (`edgeconv-runtime keygen NAME`); devices check it with --public-key."),
        o("trust_unsigned", is_flag=True, show_default=False, help="Export a checkpoint without weights_sha256 (its weights unchecked; loud warning)."),
    ]


@cli.command("export", cls=DeferredOptions, options=export_options)
@click.argument("checkpoint", type=click.Path())
@user_errors
def export_cmd(checkpoint: str, out: str, precision: str, fmt: str, **kw) -> None:
    """Export a trained model to a self-describing bundle, checking parity on real images."""
    from .exporting import ExportRequest, export_run, format_manifest, parse_targets

    formats, _ = parse_targets(fmt)
    _, precisions = parse_targets(precision)
    manifest = export_run(ExportRequest(checkpoint=checkpoint, out=out, precisions=precisions, formats=formats, **kw))
    click.echo(format_manifest(manifest.to_dict()))


def import_options() -> list:
    from edgeconv_export.importer import LAYOUTS, OUTPUT_KINDS, ImportRequest
    from edgeconv_export.precision import CALIBRATION_METHODS
    from edgeconv_runtime.preprocess import CHANNEL_ORDERS, RESIZE_POLICIES

    o = functools.partial(field_option, field_defaults(ImportRequest))
    return [
        click.Option(["--out"], required=True, type=click.Path(), help="Bundle directory to write."),
        o("labels", type=click.Path(), help="Class names, one a line, in the order of the model's outputs."),
        click.Option(["--model", "model_name"], help="torchvision:NAME or timm:NAME instead of an ONNX file."),
        click.Option(["--weights"], type=click.Path(), help="--model: local weights file (offline)."),
        o("size", help="H,W input size (needed when the graph's height/width are dynamic)."),
        o("mean", help="R,G,B mean after --scale, e.g. 0.485,0.456,0.406."),
        o("std", help="R,G,B std after --scale, e.g. 0.229,0.224,0.225."),
        o("channel_order", type=click.Choice(CHANNEL_ORDERS), help="Channel order the model takes."),
        o("layout", type=click.Choice(LAYOUTS), help="Input layout. Default: read from the graph."),
        o("resize", type=click.Choice(RESIZE_POLICIES)),
        o("scale", type=float, help="Pixel scale before mean/std."),
        o("calib_data", type=click.Path(), help="Folder of real images for INT8 calibration (and parity without --val-data)."),
        o("val_data", type=click.Path(), help="Folder of real images for parity (class sub-folders named like the labels give accuracy)."),
        o("calib_size", help="Calibration images (all if fewer)."),
        o("val_size", help="Parity images (all if fewer)."),
        o("precisions", "--precision", help="Comma list of fp32, fp16, int8. Default: fp32,fp16 (+int8 with --calib-data)."),
        o("output", type=click.Choice(OUTPUT_KINDS), help="What the model outputs. Default: probabilities when it ends in Softmax."),
        o("calib_method", type=click.Choice(CALIBRATION_METHODS)),
        o("max_accuracy_drop", help="Points an FP16/INT8 artifact may lose vs the source."),
        o("max_agreement_drop", help="Parity images without class folders: points of top-1 agreement with the source it may lose."),
        o("max_float_nodes", help="Accuracy-aware INT8: quantized nodes that may be kept in float to meet the drop (0: off)."),
        o("name", help="Model name in the bundle. Default: the file's stem."),
        o("force", is_flag=True, show_default=False, help="Replace an existing bundle (only once the new one is complete)."),
        click.Option(["--sign-key", "sign_key"], type=click.Path(), help="Sign the bundle with this Ed25519 key (`edgeconv-runtime keygen NAME`)."),
    ]


@cli.command("import", cls=DeferredOptions, options=import_options)
@click.argument("onnx_file", required=False, metavar="MODEL.onnx", type=click.Path())
@user_errors
def import_cmd(onnx_file: Optional[str], model_name: Optional[str], weights: Optional[str], **kw) -> None:
    """Import a classifier edgeconv did not train (an ONNX file, or --model torchvision:NAME / timm:NAME) into a checked bundle."""
    import time

    from .exporting import format_manifest
    from .importing import import_model

    t0 = time.perf_counter()
    sign_key = kw.pop("sign_key", None)
    if sign_key:
        from edgeconv_runtime.signing import load_private_key

        load_private_key(sign_key)  # refused now, not after the import
    manifest = import_model(onnx_file, model_name, weights, **kw)
    if sign_key:
        from edgeconv_runtime.signing import sign_bundle

        click.echo(f"signed: {sign_bundle(kw['out'], sign_key)}")
    for note in manifest.source.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(format_manifest(manifest.to_dict()))
    click.echo(f"imported in {time.perf_counter() - t0:.1f} s into {kw['out']}")


@cli.command("quant-report")
@click.argument("bundle", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Folder of real images (default: the bundle's reference images).")
@click.option("--images", type=int, default=16, show_default=True, help="Images to compare on (at most 64).")
@click.option("--variant", type=click.Choice(["default", "portable", "tensorrt"]), default="default", show_default=True,
              help="Which INT8 graph: the CPU one, the portable one, the TensorRT one.")
@click.option("--top", type=int, default=None, help="Print only the N worst tensors.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write every row as JSON.")
@user_errors
def quant_report_cmd(bundle: str, data: Optional[str], images: int, variant: str, top: Optional[int], json_path: Optional[str]) -> None:
    """Per quantized tensor: cosine and error between a bundle's INT8 and FP32 graphs on real images, worst first."""
    from edgeconv_export.quant_report import format_report, quant_report
    from edgeconv_runtime.fileio import atomic_write_json

    report = quant_report(bundle, data, variant, images)
    if json_path:
        atomic_write_json(json_path, report)
    click.echo(format_report(report, top))


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
