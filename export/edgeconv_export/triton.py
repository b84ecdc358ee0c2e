"""A Triton Inference Server model repository from a bundle: config.pbtxt, versioned model, labels.

Triton is the existing engine for serving fleets; we hand users a ready repository instead
of a hand-written config.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from pathlib import Path

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_directory
from edgeconv_runtime.manifest import MANIFEST_NAME, Manifest, read_manifest, resolve_inside

from .bundle import ExportInputs, ExportOptions, export_bundle
from .onnx import INPUT_NAME, OUTPUT_NAME


def model_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def config_pbtxt(name: str, platform: str, input_shape: tuple, num_classes: int, max_batch: int, preferred: list,
                 delay_us: int, instances: int, kind: str) -> str:
    dims = ", ".join(str(int(d)) for d in input_shape)
    pref = ", ".join(str(p) for p in preferred)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {pref} ]
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
"""


def write_triton_repo(bundle: Path, repo: Path, precision: str = "fp32", engine: bool = False, max_batch: int = 32,
                      delay_us: int = 5000, instances: int = 1) -> dict:
    """Write ``repo/<name>/{config.pbtxt, labels.txt, 1/model.onnx|model.plan}`` from a finished bundle."""
    manifest = read_manifest(bundle)
    fmt = "tensorrt" if engine else "onnx"
    art = manifest.find(fmt, precision)
    if art is None:
        raise EdgeconvError(f"the bundle has no {fmt} {precision} artifact for Triton; export it with --precision {precision}")
    name = model_name(manifest.name)
    mdir = repo / name
    (mdir / "1").mkdir(parents=True)
    target = "model.plan" if engine else "model.onnx"
    shutil.copyfile(resolve_inside(bundle, art.file), mdir / "1" / target)
    (mdir / "labels.txt").write_text("\n".join(manifest.classes) + "\n")
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    platform = "tensorrt_plan" if engine else "onnxruntime_onnx"
    kind = "KIND_GPU" if engine else "KIND_CPU"
    shape = manifest.input["shape"][1:]
    (mdir / "config.pbtxt").write_text(config_pbtxt(name, platform, shape, len(manifest.classes), max_batch, preferred, delay_us, instances, kind))
    shutil.copyfile(bundle / MANIFEST_NAME, mdir / "edgeconv_manifest.json")
    return {"name": name, "platform": platform, "precision": precision, "file": f"{name}/1/{target}", "max_batch_size": max_batch}


def export_triton(inputs: ExportInputs, out: str | Path, opts: ExportOptions) -> Manifest:
    """Format ``triton``: export a bundle aside (with the other formats in ``opts``, every parity gate included), then
    lay out its artifact of the last precision asked for as a model repository that replaces ``out`` atomically.
    Returns the bundle's manifest with ``triton`` set to what the repository serves."""
    bundle_opts = dataclasses.replace(opts, formats=tuple(f for f in opts.formats if f != "triton") or ("onnx",))
    precision = opts.precisions[-1] if opts.precisions else "fp32"
    with tempfile.TemporaryDirectory(prefix="edgeconv-triton-") as tmp:
        bundle = Path(tmp) / "bundle"
        manifest = export_bundle(inputs, bundle, bundle_opts)
        with atomic_directory(out, force=opts.force) as repo:
            manifest.triton = write_triton_repo(bundle, repo, precision=precision, engine="tensorrt" in bundle_opts.formats,
                                                max_batch=opts.batch_max)
    return manifest
