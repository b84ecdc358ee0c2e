"""Which ONNX Runtime build is installed here, and the one command that repairs a mixed install.

``onnxruntime`` (CPU only) and ``onnxruntime-gpu`` (CUDA and TensorRT providers) are two
distributions of the same ``onnxruntime`` package directory. pip installs both side by side
without a warning, the files written last win, and uninstalling either one deletes files the
other still needs. pip cannot express "one of these two", so the runtime depends on the CPU
build (``pip install ./runtime`` works on every machine) and the GPU install replaces it
(README, "Install on your device"). This module names what went wrong when that is not the case,
reading only package metadata and files, so it works even when ``import onnxruntime`` fails.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Dict, Optional

from .jetson import jetson_model, l4t_release

CPU_DIST = "onnxruntime"
GPU_DIST = "onnxruntime-gpu"
# every distribution on PyPI that ships the `onnxruntime` package directory
ORT_DISTS = (CPU_DIST, GPU_DIST, "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn", "onnxruntime-rocm",
             "onnxruntime-migraphx", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")
# JetPack 6 (L4T r36, CUDA 12.6, Python 3.10): the Jetson AI Lab index that NVIDIA's jetson-containers maintainers
# point to for onnxruntime-gpu (PyPI has no aarch64 CUDA wheel for Python 3.10, and its aarch64 wheels for newer
# Pythons are built for Grace servers, not Jetson GPUs). It mirrors PyPI, so it can serve as the only index.
JETSON_JP6_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"
# JetPack 5: the wheels ONNX Runtime's documentation points Jetson users to
JETSON_ZOO = "https://elinux.org/Jetson_Zoo#ONNX_Runtime"
# pip wheels of CUDA and cuDNN for the GPU build (ONNX Runtime's own extras; the backend preloads them)
GPU_REQUIREMENT = "onnxruntime-gpu[cuda,cudnn]"


def gpu_install_command(jetson: Optional[bool] = None) -> str:
    """The command that leaves exactly one onnxruntime build, the GPU one, in this environment.

    Both distributions are uninstalled first because removing only the CPU one deletes files the
    GPU one shares, and pip then believes the GPU one is still complete.
    """
    if jetson is None:
        jetson = jetson_model() is not None
    if not jetson:
        tail = f"pip install '{GPU_REQUIREMENT}'"
    elif sys.version_info < (3, 9) or re.search(r"\bR3[45]\b", l4t_release() or ""):  # JetPack 5 (L4T r35, Python 3.8)
        tail = f"pip install the onnxruntime_gpu cp38 wheel for your JetPack 5 from {JETSON_ZOO}"
    else:
        tail = f"pip install onnxruntime-gpu --index-url {JETSON_JP6_INDEX}"
    return f"pip uninstall -y {CPU_DIST} {GPU_DIST} && {tail}"


def installed_ort_dists() -> Dict[str, str]:
    """{distribution: version} of every onnxruntime build whose metadata pip left in this environment."""
    out = {}
    for name in ORT_DISTS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def module_build() -> Optional[str]:
    """The distribution whose files the importable ``onnxruntime`` package holds, without importing it.

    Every ONNX Runtime wheel writes ``capi/build_and_package_info.py`` with its ``package_name``;
    when two builds were installed over each other, this names the one whose files won.
    """
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "capi", "build_and_package_info.py"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"""^package_name\s*=\s*['"]([^'"]+)['"]""", text, re.M)
        if m:
            return m.group(1).replace("_", "-").lower()
    return None


def mixed_install_problem() -> Optional[str]:
    """One line describing two onnxruntime builds installed over each other, with the fix; None if there is one build."""
    dists = installed_ort_dists()
    if len(dists) < 2:
        return None
    names = " and ".join(f"{d} {v}" for d, v in dists.items())
    winner = module_build()
    won = f"; the `onnxruntime` module holds {winner}'s files" if winner else ""
    return f"{names} are both installed and share one `onnxruntime` module{won}; fix: {gpu_install_command()}"


def missing_provider_reason(provider: str, available: list) -> str:
    """Why this onnxruntime lists no ``provider``, and the command that gets a build which has it."""
    mixed = mixed_install_problem()
    if mixed:
        return mixed
    dists = installed_ort_dists()
    build = module_build() or (next(iter(dists)) if dists else "onnxruntime")
    if build == GPU_DIST or GPU_DIST in dists:
        # the GPU wheel's metadata is there but its provider is not: its files were overwritten or removed
        return (f"{GPU_DIST} is installed but this `onnxruntime` module has no {provider} (its files were overwritten by "
                f"another build); fix: {gpu_install_command()}")
    label = " ".join(filter(None, (build, dists.get(build))))
    listed = ", ".join(p.replace("ExecutionProvider", "") for p in available) or "none"
    return (f"this onnxruntime build ({label}, providers: {listed}) has no {provider}; "
            f"on a machine with an NVIDIA GPU run: {gpu_install_command()}")


def import_failure_reason(exc: BaseException) -> str:
    """One line for an ``import onnxruntime`` that raised (a broken CUDA install raises OSError/RuntimeError too)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    dists = installed_ort_dists()
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == "onnxruntime" and not dists:
        return f"onnxruntime is not installed (pip install onnxruntime; for an NVIDIA GPU: {gpu_install_command()})"
    mixed = mixed_install_problem()
    if mixed:
        return f"importing onnxruntime failed ({type(exc).__name__}: {first}): {mixed}"
    # the package is missing or incomplete (left as an empty namespace package), not failing inside a CUDA library
    gone = isinstance(exc, (ImportError, AttributeError)) and module_build() is None
    if gone and len(dists) == 1:  # pip's record says installed, the files are gone: removed with another build's files
        (dist, version), = dists.items()
        return (f"{dist} {version} is installed but its `onnxruntime` module is gone (uninstalling another onnxruntime build "
                f"removes the files they share); fix: pip install --force-reinstall --no-deps {dist}=={version}")
    return f"importing onnxruntime failed ({type(exc).__name__}: {first}); reinstall it, or fix the CUDA libraries it loads"
