"""A Triton Inference Server model repository from a bundle: config.pbtxt, versioned model, labels.

Triton is the existing engine for serving fleets; we hand users a ready repository instead
of a hand-written config.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.manifest import MANIFEST_NAME, read_manifest, resolve_inside

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
