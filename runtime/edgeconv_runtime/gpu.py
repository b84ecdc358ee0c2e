"""What NVIDIA GPU (if any) this machine has, without importing any CUDA framework."""
from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Optional


@functools.lru_cache(maxsize=1)
def gpu_info() -> Optional[dict]:
    """{'name', 'compute_capability', 'driver'} of GPU 0, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                name, cc, driver = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")[:3]]
                return {"name": name, "compute_capability": cc, "driver": driver}
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    model = jetson_model()
    if model:  # Jetsons have no nvidia-smi (before JetPack 6); the device tree names the board
        return {"name": model, "compute_capability": None, "driver": None}
    return None


def jetson_model() -> Optional[str]:
    try:
        with open("/proc/device-tree/model", "rb") as f:
            model = f.read().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return None
    return model if "jetson" in model.lower() or "nvidia" in model.lower() else None
