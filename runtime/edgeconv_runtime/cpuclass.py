"""Which class of CPU this is, as far as 8-bit integer arithmetic is concerned.

ONNX Runtime multiplies uint8 activations by int8 weights with different instructions per CPU:
- ``x86-vnni`` (AVX512-VNNI or AVX-VNNI: VPDPBUSD) and ``arm64`` (SDOT/UDOT): four products summed straight into int32, exact;
- ``x86-novnni`` (AVX2, AVX-512 without VNNI: VPMADDUBSW): pairs of products summed in int16 with saturation, so an INT8
  graph whose pair sums pass 32767 gives other answers there than where it was checked.
An INT8 graph records the classes it was validated on; ``Model.load`` runs it only on those (``variant_for``).
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Optional

CPU_CLASSES = ("x86-vnni", "x86-novnni", "arm64")
ENV_OVERRIDE = "EDGECONV_CPU_CLASS"  # force a class (tests; a CPU that hides its flags)


def _numpy_features() -> Optional[dict]:
    """numpy's own CPUID reading: right under emulators too, where /proc/cpuinfo shows the host's flags."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features  # numpy < 2
        except ImportError:
            return None
    return dict(features)


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=None)
def _detect() -> str:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine not in ("x86_64", "amd64", "i686", "i386", "x86"):
        return machine or "unknown"
    features = _numpy_features()
    if features is not None and "AVX512VNNI" in features:
        vnni = bool(features.get("AVX512VNNI") or features.get("AVXVNNI"))
    else:
        vnni = bool({"avx512_vnni", "avx_vnni"} & _cpuinfo_flags())
    return "x86-vnni" if vnni else "x86-novnni"


def cpu_class() -> str:
    """``x86-vnni``, ``x86-novnni``, ``arm64`` (or the machine name of any other CPU)."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    return forced or _detect()
