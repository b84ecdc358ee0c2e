"""Which NVIDIA GPU this process will really use, asked of CUDA itself, without importing any CUDA framework.

Order of sources:
1. the CUDA driver API (``libcuda.so.1`` through ctypes): it applies ``CUDA_VISIBLE_DEVICES`` itself, so CUDA
   ordinal 0 is the device TensorRT and ONNX Runtime will run on; it also works on a Jetson, which has no
   ``/dev/nvidia0`` and often no ``nvidia-smi``;
2. ``nvidia-smi``, when the driver library cannot be loaded or initialised, with ``CUDA_VISIBLE_DEVICES`` mapped to
   the right row (a ``GPU-`` UUID, possibly abbreviated; an index only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``);
3. the Jetson device tree (board name; compute capability from the SoC).

Note: ``cuInit`` in a parent process makes CUDA unusable in children made with ``fork``; this runtime does not fork
after asking, and nothing here creates a CUDA context.
"""
from __future__ import annotations

import csv
import ctypes
import functools
import io
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from .jetson import jetson_model, read_device_tree

# cuda.h: CUdevice_attribute values and the CUresult meaning "no CUDA-capable device is visible"
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CU_DEVICE_ATTRIBUTE_INTEGRATED = 18
CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100

# The GPU each Jetson SoC carries (device-tree "compatible" token -> CUDA compute capability)
TEGRA_COMPUTE_CAPABILITY = {"tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}

SMI_FIELDS = ("index", "uuid", "name", "compute_cap", "driver_version", "memory.total")


class CudaUnavailable(Exception):
    """The CUDA driver could not be loaded or answered with an error (the message says which)."""


@functools.lru_cache(maxsize=1)
def gpu_info() -> Optional[dict]:
    """The GPU this process will use (CUDA ordinal 0 after ``CUDA_VISIBLE_DEVICES``), or None where there is none.

    Keys: name, compute_capability ("9.0"), driver (kernel driver release where known), cuda_driver ("12.4", the
    CUDA version the driver supports; CUDA source only), memory_mb, integrated, source ("cuda" | "nvidia-smi" |
    "device-tree"), visible_devices (the CUDA_VISIBLE_DEVICES value, None when unset); cuda_error when CUDA itself
    failed and a fallback answered. Cached: call ``gpu_info.cache_clear()`` after changing the environment.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hides_all_gpus(visible):
        return None
    cuda_error = None
    try:
        info = query_cuda()
        if info is None:  # CUDA answered: no device is visible to this process; nvidia-smi would only mislead
            return None
        return {**info, "visible_devices": visible}
    except CudaUnavailable as exc:
        cuda_error = str(exc)
    info = query_nvidia_smi(visible) or query_device_tree(visible)
    if info is None:
        return None
    return {**info, "visible_devices": visible, "cuda_error": cuda_error}


def hides_all_gpus(visible: Optional[str]) -> bool:
    """True when ``CUDA_VISIBLE_DEVICES`` makes no GPU visible: "" or a first entry that is a negative index.

    CUDA enumerates the listed devices up to the first invalid entry, so only the first one decides whether
    ordinal 0 exists (CUDA Programming Guide, "CUDA Environment Variables").
    """
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    if not first:
        return True
    return bool(re.fullmatch(r"-\d+", first))


# --- source 1: the CUDA driver API -------------------------------------------------------------------------


def _load_libcuda():
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise CudaUnavailable(f"the CUDA driver library could not be loaded ({'; '.join(errors)})")


def _error_name(lib, code: int) -> str:
    try:
        fn = lib.cuGetErrorName
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        fn.restype = ctypes.c_int
        out = ctypes.c_char_p()
        if fn(code, ctypes.byref(out)) == CUDA_SUCCESS and out.value:
            return f"{out.value.decode()} ({code})"
    except (AttributeError, OSError):
        pass
    return f"CUDA error {code}"


def query_cuda() -> Optional[dict]:
    """GPU 0 as the CUDA driver sees it; None when CUDA reports no visible device; CudaUnavailable otherwise."""
    lib = _load_libcuda()
    c_int, byref = ctypes.c_int, ctypes.byref

    def call(fname: str, *args) -> None:
        fn = getattr(lib, fname, None)
        if fn is None:
            raise CudaUnavailable(f"the CUDA driver library has no {fname}; the NVIDIA driver is too old")
        fn.restype = ctypes.c_int
        code = fn(*args)
        if code != CUDA_SUCCESS:
            raise _CudaCallFailed(fname, code)

    try:
        version = c_int(0)
        call("cuDriverGetVersion", byref(version))  # allowed before cuInit
        call("cuInit", ctypes.c_uint(0))
        count = c_int(0)
        call("cuDeviceGetCount", byref(count))
        if count.value < 1:
            return None
        dev = c_int(0)
        call("cuDeviceGet", byref(dev), c_int(0))
        name = ctypes.create_string_buffer(256)
        call("cuDeviceGetName", name, c_int(len(name)), dev)
        major, minor, integrated = c_int(0), c_int(0), c_int(0)
        call("cuDeviceGetAttribute", byref(major), c_int(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), dev)
        call("cuDeviceGetAttribute", byref(minor), c_int(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR), dev)
        call("cuDeviceGetAttribute", byref(integrated), c_int(CU_DEVICE_ATTRIBUTE_INTEGRATED), dev)
        total = ctypes.c_size_t(0)
        call("cuDeviceTotalMem_v2", byref(total), dev)
    except _CudaCallFailed as exc:
        if exc.code == CUDA_ERROR_NO_DEVICE:
            return None
        raise CudaUnavailable(f"{exc.fname} failed: {_error_name(lib, exc.code)}") from None
    return {
        "name": name.value.decode(errors="replace").strip(),
        "compute_capability": f"{major.value}.{minor.value}",
        "driver": kernel_driver_version(),
        "cuda_driver": format_cuda_version(version.value),
        "memory_mb": int(total.value // (1024 * 1024)),
        "integrated": bool(integrated.value),
        "source": "cuda",
    }


class _CudaCallFailed(Exception):
    def __init__(self, fname: str, code: int):
        super().__init__(fname, code)
        self.fname, self.code = fname, code


def format_cuda_version(value: int) -> Optional[str]:
    """cuDriverGetVersion's integer (1000 * major + 10 * minor, e.g. 12040) as "12.4"."""
    if value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def parse_nvrm_version(text: str) -> Optional[str]:
    """The driver release from /proc/driver/nvidia/version ("...Kernel Module  550.54.15  ..." -> "550.54.15")."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def kernel_driver_version() -> Optional[str]:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            return parse_nvrm_version(f.read())
    except OSError:
        return None


# --- source 2: nvidia-smi ----------------------------------------------------------------------------------


def parse_smi_csv(text: str) -> list:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv[,nounits]`` output (with its header line) as dicts.

    Header names lose their unit suffix ("memory.total [MiB]" -> "memory.total"); "[N/A]"/"N/A" become None.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    reader = csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    header = [re.sub(r"\s*\[.*\]$", "", h.strip()) for h in next(reader)]
    rows = []
    for values in reader:
        if len(values) != len(header):
            continue
        row = {}
        for key, value in zip(header, values):
            value = value.strip()
            row[key] = None if value in ("N/A", "[N/A]", "[Not Supported]") else value
        rows.append(row)
    return rows


def select_smi_row(rows: list, visible: Optional[str]) -> Optional[dict]:
    """The nvidia-smi row that CUDA ordinal 0 is, given ``CUDA_VISIBLE_DEVICES``, when CUDA counts in nvidia-smi's
    PCI bus order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``; smi_row_for_cuda decides when it may be asked).

    Unset: the first row. An index picks the row with that index; a "GPU-..." UUID, full
    or an unambiguous prefix, picks the row whose uuid starts with it; "MIG-GPU-<uuid>/..." picks its parent GPU.
    Anything else (empty, negative, unknown, ambiguous) selects nothing, as CUDA would see no device.
    """
    if not rows:
        return None
    if visible is None:
        return rows[0]
    first = visible.split(",")[0].strip()
    if re.fullmatch(r"\d+", first):
        return next((r for r in rows if (r.get("index") or "").strip() == str(int(first))), None)
    if first.startswith("MIG-GPU-"):
        first = first[len("MIG-"):].split("/")[0]
    if first.upper().startswith("GPU-"):
        matches = [r for r in rows if (r.get("uuid") or "").lower().startswith(first.lower())]
        return matches[0] if len(matches) == 1 else None
    return None


def smi_row_for_cuda(rows: list, visible: Optional[str], device_order: Optional[str]) -> Optional[dict]:
    """The nvidia-smi row of CUDA ordinal 0, where nvidia-smi's order can be trusted to be CUDA's.

    nvidia-smi numbers GPUs in PCI bus order; CUDA does too only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its default,
    FASTEST_FIRST, puts the fastest GPU first, and CUDA_VISIBLE_DEVICES indexes count in that order). So an index,
    or no CUDA_VISIBLE_DEVICES at all, names a row only under PCI_BUS_ID, on a one-GPU machine, or where every GPU is
    the same model (then any of them answers alike). A ``GPU-`` UUID names its row in any order. Otherwise the GPU
    is there but which one CUDA takes is unknown: a row whose name and compute capability are None.
    """
    if not rows:
        return None
    first = (visible or "").split(",")[0].strip()
    ordinal_order = re.fullmatch(r"\d+", first) or visible is None  # an index, or CUDA's ordinal 0 of all GPUs
    if not ordinal_order or (device_order or "").strip().upper() == "PCI_BUS_ID" or len(rows) == 1:
        return select_smi_row(rows, visible)
    if visible is not None and int(first) >= len(rows):
        return None  # past the last GPU: CUDA sees no device, whatever its order
    if len({(r.get("name"), r.get("compute_cap")) for r in rows}) == 1:
        return rows[0]  # all alike: whichever CUDA takes, this is its model
    return {**rows[0], "index": None, "uuid": None, "name": None, "compute_cap": None, "memory.total": None}


def smi_row_to_info(row: dict) -> dict:
    memory = re.match(r"\s*(\d+(?:\.\d+)?)", row.get("memory.total") or "")  # "6141" (nounits) or "6141 MiB"
    memory_mb = int(float(memory.group(1))) if memory else None
    return {
        "name": row.get("name"),
        "compute_capability": row.get("compute_cap"),
        "driver": row.get("driver_version"),
        "memory_mb": memory_mb,
        "source": "nvidia-smi",
    }


def query_nvidia_smi(visible: Optional[str]) -> Optional[dict]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    fields = list(SMI_FIELDS)
    for attempt in range(2):  # drivers before ~510 do not know "compute_cap": ask again without it
        try:
            out = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,nounits"],
                                 capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            row = smi_row_for_cuda(parse_smi_csv(out.stdout), visible, os.environ.get("CUDA_DEVICE_ORDER"))
            return smi_row_to_info(row) if row else None
        if attempt == 0 and "compute_cap" in (out.stdout + out.stderr):
            fields.remove("compute_cap")
            continue
        return None
    return None


# --- source 3: the Jetson device tree ----------------------------------------------------------------------


def tegra_compute_capability(compatible: Optional[bytes]) -> Optional[str]:
    """Compute capability of the GPU in the SoC named by /proc/device-tree/compatible (NUL-separated tokens)."""
    if not compatible:
        return None
    for token in compatible.decode(errors="replace").split("\x00"):
        soc = token.strip().split(",")[-1]
        if soc in TEGRA_COMPUTE_CAPABILITY:
            return TEGRA_COMPUTE_CAPABILITY[soc]
    return None


def query_device_tree(visible: Optional[str]) -> Optional[dict]:
    if visible is not None and visible.split(",")[0].strip() not in ("0",):
        return None  # a Jetson has exactly one GPU, ordinal 0
    model = jetson_model()
    if not model:
        return None
    return {"name": model, "compute_capability": tegra_compute_capability(read_device_tree("compatible")),
            "driver": kernel_driver_version(), "memory_mb": None, "integrated": True, "source": "device-tree"}
