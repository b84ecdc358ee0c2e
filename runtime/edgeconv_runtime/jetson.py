"""NVIDIA Jetson facts: the board, L4T release, power mode, and power drawn while a measurement runs.

Power comes from ``jtop`` (jetson-stats) when it is installed and its service answers, else from ``tegrastats``.
The rails tegrastats prints differ per board (values in mW, "current/average", newer releases "mW" suffixed and
JetPack 7 "current/average/max"):

- Orin Nano / Orin NX, Xavier NX, TX2: ``VDD_IN`` (module input) beside sub-rails (VDD_CPU_GPU_CV, VDD_SOC, ...);
- Nano: ``POM_5V_IN`` (module input) beside POM_5V_GPU and POM_5V_CPU;
- AGX Orin: ``VDD_GPU_SOC``, ``VDD_CPU_CV``, ``VIN_SYS_5V0`` and ``VDDQ_VDD2_1V8AO`` (+ "NC" channels), no input rail;
- AGX Xavier: ``GPU``, ``CPU``, ``SOC``, ``CV``, ``VDDRQ``, ``SYS5V``, no input rail.

Where an input rail exists it is the total and the sub-rails are not added to it (NVIDIA forum, quoted in
jetson_stats issue #51: "POM_5V_IN ... represents the total power consumption. You don't need to add POM_5V_GPU and
POM_5V_CPU to it"). Otherwise the rails are summed, leaving out rails that are part of another one (VDDQ_VDD2_1V8AO
is fed from VIN_SYS_5V0 on AGX Orin, so energymon and others sum only the other three) and unconnected "NC" channels.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

# Rails that measure the whole module input: when one is present it alone is the total.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# Rails never added to a sum of rails: unconnected channels, and rails inside another rail.
NOT_SUMMED = {"NC": "not connected", "VDDQ_VDD2_1V8AO": "fed from VIN_SYS_5V0 (AGX Orin)"}

# "NAME 1234/1234", "NAME 1234mW/1234mW" or "NAME 1234mW/1234mW/1234mW"; the first value is the current one
_RAIL = re.compile(r"(?:(?<=\s)|^)([A-Z][A-Z0-9_]*) (-?\d+)(?:mW)?/(-?\d+)(?:mW)?(?:/(-?\d+)(?:mW)?)?(?=\s|$)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU_LOAD = re.compile(r"\bGR3D_FREQ (\d+)%")

DEVICE_TREE = Path("/proc/device-tree")


# --- board facts -----------------------------------------------------------------------------------------


def read_device_tree(name: str) -> Optional[bytes]:
    try:
        return (DEVICE_TREE / name).read_bytes()
    except OSError:
        return None


def jetson_model() -> Optional[str]:
    """The board name from the device tree ("NVIDIA Jetson Orin Nano Developer Kit"), None off a Jetson."""
    raw = read_device_tree("model")
    if raw is None:
        return None
    model = raw.rstrip(b"\x00").decode(errors="replace").strip()
    return model if "jetson" in model.lower() or "nvidia" in model.lower() else None


def l4t_release() -> Optional[str]:
    """First line of /etc/nv_tegra_release ("# R36 (release), REVISION: 4.0, ..."), None where absent."""
    try:
        lines = Path("/etc/nv_tegra_release").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return lines[0].strip() if lines else None


def nvpmodel_mode() -> Optional[str]:
    """``nvpmodel -q`` in one line ("NV Power Mode: MAXN 0"), None where it cannot be asked."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return " ".join(out.stdout.split()) or None


def jetson_facts(power_probe_s: float = 0.0) -> dict:
    """Board, L4T release, power mode and how power is measured here; with ``power_probe_s`` > 0 a short reading
    says which method (input rail or sum of rails) this board gives, and why there is none if there is none."""
    facts = {"model": jetson_model(), "l4t": l4t_release(), "nvpmodel": nvpmodel_mode(), "power_source": power_source()}
    if power_probe_s > 0 and facts["power_source"]:
        probe = read_power(power_probe_s)
        facts["power_source"] = probe["source"] or facts["power_source"]
        facts["power_method"] = probe["method"]
        facts["power_rails"] = sorted(probe["rails_mean_mw"])
        if probe["reason"]:
            facts["power_unavailable"] = probe["reason"]
    return facts


# --- tegrastats lines ------------------------------------------------------------------------------------


def power_total(rails: dict) -> tuple:
    """(total_mw, method, summed rail names) from {rail: mW}; (None, None, []) without rails.

    An input rail (VDD_IN, POM_5V_IN) is the total by itself; otherwise the rails are summed, except the ones in
    NOT_SUMMED, so nothing is counted twice.
    """
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name], f"input rail {name}", [name]
    summed = [name for name in rails if name not in NOT_SUMMED]
    if not summed:
        return None, None, []
    return sum(rails[name] for name in summed), "sum of rails", summed


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> {"rails": {name: mW}, "total_mw", "method", "summed", "ram_used_mb", "ram_total_mb",
    "gpu_load_pct"}; fields the line lacks are None (rails then {})."""
    rails = {}
    for m in _RAIL.finditer(line):
        name = m.group(1)
        if name == "NC":  # AGX Orin prints several unconnected channels under the same name
            continue
        rails[name] = int(m.group(2))
    total, method, summed = power_total(rails)
    ram = _RAM.search(line)
    load = _GPU_LOAD.search(line)
    return {
        "rails": rails,
        "total_mw": total,
        "method": method,
        "summed": summed,
        "ram_used_mb": int(ram.group(1)) if ram else None,
        "ram_total_mb": int(ram.group(2)) if ram else None,
        "gpu_load_pct": int(load.group(1)) if load else None,
    }


def summarize_power(samples: list, source: Optional[str]) -> dict:
    """Mean power over parsed samples (dicts from parse_tegrastats or the jtop reader)."""
    with_power = [s for s in samples if s.get("total_mw") is not None]
    if not with_power:
        return {"source": source, "samples": len(samples), "mean_mw": None, "method": None, "rails_mean_mw": {}}
    rail_names = sorted({name for s in with_power for name in s["rails"]})
    return {
        "source": source,
        "samples": len(with_power),
        "mean_mw": sum(s["total_mw"] for s in with_power) / len(with_power),
        "method": with_power[-1]["method"],
        "rails_mean_mw": {n: sum(s["rails"].get(n, 0) for s in with_power) / len(with_power) for n in rail_names},
    }


# --- sampling --------------------------------------------------------------------------------------------


def _jtop_class():
    try:
        from jtop import jtop  # jetson-stats, optional
    except Exception:  # noqa: BLE001 - a broken install must not break benchmarking
        return None
    return jtop


def power_source() -> Optional[str]:
    """"jtop", "tegrastats" or None: what PowerSampler will try first on this machine."""
    if jetson_model() is None:
        return None
    if _jtop_class() is not None:
        return "jtop"
    return "tegrastats" if shutil.which("tegrastats") else None


def _jtop_rails(power) -> dict:
    """{rail: mW} from ``jtop().power``: a dict {"rail": {...}, "tot": {...}} (jetson-stats 4+, the input rail is
    moved into "tot" with its name) or a tuple (total, rails) (jetson-stats 3)."""
    if isinstance(power, tuple) and len(power) == 2:
        rails_raw, total = power[1], {}
    elif isinstance(power, dict):
        rails_raw, total = power.get("rail", {}), power.get("tot", {})
    else:
        return {}
    rails = {}
    for name, values in dict(rails_raw).items():
        value = values.get("power", values.get("cur")) if isinstance(values, dict) else None
        if value is not None and name != "NC":
            rails[name] = int(value)
    if isinstance(total, dict) and total.get("name") and total.get("power") is not None:
        rails[total["name"]] = int(total["power"])
    return rails


class PowerSampler:
    """Samples board power while a measurement runs: ``with PowerSampler() as p: ...; p.summary``.

    Uses jtop when installed and its service answers, else ``tegrastats --interval N``; the tegrastats process is
    always terminated (then killed) on exit. Off a Jetson it does nothing and ``summary["mean_mw"]`` is None.
    """

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = int(interval_ms)
        self.samples: list = []
        self.source: Optional[str] = None
        self.reason: Optional[str] = None
        self._proc = None
        self._thread = None
        self._stop = threading.Event()

    def __enter__(self):
        if jetson_model() is None:
            self.reason = "not a Jetson"
            return self
        jtop_cls = _jtop_class()
        if jtop_cls is not None and self._start_jtop(jtop_cls):
            return self
        exe = shutil.which("tegrastats")
        if exe is None:
            self.reason = (self.reason + "; " if self.reason else "") + "tegrastats not found"
            return self
        try:
            self._proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.reason = f"tegrastats could not start: {exc}"
            return self
        self.source = "tegrastats"
        self._thread = threading.Thread(target=self._read_tegrastats, daemon=True)
        self._thread.start()
        return self

    def _start_jtop(self, jtop_cls) -> bool:
        try:
            board = jtop_cls(interval=max(self.interval_ms, 100) / 1000.0)
            board.start()
        except Exception as exc:  # noqa: BLE001 - JtopException (service not running) and friends: fall back
            self.reason = f"jtop unavailable: {exc}"
            return False
        self.source = "jtop"
        self._thread = threading.Thread(target=self._read_jtop, args=(board,), daemon=True)
        self._thread.start()
        return True

    def _read_jtop(self, board) -> None:
        try:
            while not self._stop.is_set() and board.ok():
                rails = _jtop_rails(board.power)
                total, method, summed = power_total(rails)
                self.samples.append({"rails": rails, "total_mw": total, "method": method, "summed": summed})
        except Exception as exc:  # noqa: BLE001
            self.reason = f"jtop stopped: {exc}"
        finally:
            try:
                board.close()
            except Exception:  # noqa: BLE001
                pass

    def _read_tegrastats(self) -> None:
        for line in self._proc.stdout:
            self.samples.append(parse_tegrastats(line))

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.source and not any(s.get("total_mw") is not None for s in self.samples) and self.reason is None:
            self.reason = f"{self.source} reported no power rails (tegrastats shows them only to root on some boards)"
        return False

    @property
    def summary(self) -> dict:
        out = summarize_power(self.samples, self.source)
        out["reason"] = self.reason if out["mean_mw"] is None else None
        return out

    @property
    def mean_watts(self) -> Optional[float]:
        mw = self.summary["mean_mw"]
        return mw / 1000.0 if mw is not None else None


def read_power(duration: float = 1.0, interval_ms: int = 200) -> dict:
    """Board power over the next ``duration`` seconds (see PowerSampler.summary)."""
    with PowerSampler(interval_ms) as sampler:
        if sampler.source:
            time.sleep(duration)
    return sampler.summary
