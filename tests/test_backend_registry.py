"""The backend registry is built from what each backend class declares (issue 23 §1): the derived views keep the
values they had when they were written by hand, and each declaration is one a user can act on."""
from __future__ import annotations

import re
from pathlib import Path

from edgeconv_runtime import backends
from edgeconv_runtime.backends import REGISTRY, auto_order, backend_for_file, triton_platform
from edgeconv_runtime.backends.base import Backend
from edgeconv_runtime.manifest import FORMATS, RUNTIME_PRECISIONS, VARIANTS
from edgeconv_runtime.v2 import PLATFORMS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = (ROOT / "runtime" / "pyproject.toml", ROOT / "pyproject.toml")  # the runtime's extras, repeated by the whole package


def test_the_derived_views_are_the_hand_written_ones():
    assert list(backends.BACKENDS) == ["onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "openvino-cpu"]
    assert backends.AUTO_ORDER == ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    gpu_first = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
    for p in ("fp32", "fp16", "int8"):
        assert auto_order(p) == gpu_first + ("onnxruntime-cpu", "openvino-cpu")
    assert auto_order("bf16") == ("openvino-cpu",)
    assert backends.BACKEND_PRECISIONS == {"openvino-cpu": ("fp32", "bf16", "int8")}
    assert backends.CPU_BACKENDS == ("onnxruntime-cpu", "openvino-cpu")
    assert PLATFORMS == {"tensorrt": "tensorrt_plan", "openvino-cpu": "openvino"}
    assert triton_platform("onnxruntime-cuda") == "onnxruntime_onnx" and triton_platform(None) == "onnxruntime_onnx"
    assert backend_for_file("b/model.int8.plan") == "tensorrt" and backend_for_file("model.int8.trt.onnx") == "onnxruntime-cpu"
    assert backend_for_file("model.pt") is None


def test_every_backend_declares_what_the_registry_and_auto_read():
    extras = [set(re.findall(r"^([A-Za-z0-9_-]+) = \[", p.read_text(), re.M)) for p in PYPROJECTS]
    assert sum(cls.base for cls in REGISTRY.values()) == 1  # one backend every install has
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Backend) and cls.name == name
        assert cls.extra is None or all(cls.extra in e for e in extras), (name, cls.extra)  # pip install 'edgeconv-runtime[EXTRA]' works
        for p in cls.precisions or ("fp32", "fp16", "int8"):
            assert p in RUNTIME_PRECISIONS
            fmt, stored, variant = cls.artifact_for(p)
            assert fmt in FORMATS and variant in (None, *VARIANTS) and stored in ("fp32", "fp16", "int8"), (name, p)
        ok, why = backends.available_backends()[name]
        assert isinstance(ok, bool) and why and "\n" not in why
