"""GPU identity (edgeconv_runtime.gpu) and Jetson power (edgeconv_runtime.jetson), checked on recorded output.

The nvidia-smi, /proc/driver/nvidia/version and tegrastats strings below and in tests/data/tegrastats/ were
recorded on real machines and published (each names where it comes from); the device-tree strings are constructed
(marked so). Nothing here fakes a GPU.
"""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest
from edgeconv_runtime import jetson
from edgeconv_runtime.gpu import (
    CudaUnavailable,
    format_cuda_version,
    gpu_info,
    hides_all_gpus,
    parse_nvrm_version,
    parse_smi_csv,
    query_cuda,
    select_smi_row,
    smi_row_to_info,
    tegra_compute_capability,
)
from edgeconv_runtime.jetson import (
    PowerSampler,
    parse_tegrastats,
    power_total,
    read_power,
)

TEGRASTATS = Path(__file__).parent / "data" / "tegrastats"

# `nvidia-smi --query-gpu=name,pci.bus,index,uuid --format=csv` on a 5-GPU rig (YoRyan/nuxhash pull request #10)
SMI_FIVE_GPUS = """name, pci.bus, index, uuid
GeForce GTX 1060 6GB, 0x01, 0, GPU-f3da2e71-6e43-729a-e3ae-f731ed96d50c
GeForce GTX 1080 Ti, 0x02, 1, GPU-15ea7bf9-1a0e-2d7f-9c62-c28e5ca1aaf1
GeForce GTX 1060 6GB, 0x03, 2, GPU-3dc4f2b0-6e1b-c088-c342-4367c334795a
GeForce GTX 1060 6GB, 0x09, 3, GPU-03ddeff3-19c4-6676-d02d-6942bd80630d
GeForce GTX 1060 6GB, 0x0A, 4, GPU-ff3318a7-f0dd-dc57-1fb8-cc95ba35c56e
"""
# `nvidia-smi --query-gpu=compute_cap,compute_mode,driver_version,name,index --format=csv`
# (triton-inference-server/server pull request #8070)
SMI_TWO_GPUS = """compute_cap, compute_mode, driver_version, name, index
7.0, Default, 570.86.15, NVIDIA TITAN V, 0
8.9, Default, 570.86.15, NVIDIA RTX 5880 Ada Generation, 1
"""
# `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv` (units kept; a public experiment log)
SMI_WITH_UNITS = """name, memory.total [MiB], memory.used [MiB]
NVIDIA GeForce RTX 4050 Laptop GPU, 6141 MiB, 51 MiB
"""


@pytest.fixture
def fresh_gpu_info():
    gpu_info.cache_clear()
    yield gpu_info
    gpu_info.cache_clear()


# --- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, hidden", [(None, False), ("0", False), ("1,0", False), ("GPU-15ea7bf9", False),
                                           ("", True), (" ", True), ("-1", True), ("-1,0", True), (",0", True)])
def test_which_cuda_visible_devices_values_hide_every_gpu(value, hidden):
    assert hides_all_gpus(value) is hidden


@pytest.mark.parametrize("value", ["", "-1"])
def test_gpu_info_is_none_when_cuda_visible_devices_hides_all(monkeypatch, fresh_gpu_info, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert fresh_gpu_info() is None


def _cuda_driver_loadable() -> bool:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def test_gpu_info_on_a_machine_without_cuda_is_none_without_error(monkeypatch, fresh_gpu_info):
    if _cuda_driver_loadable() or shutil.which("nvidia-smi") or jetson.jetson_model():
        pytest.skip("this machine has a CUDA driver, nvidia-smi or a Jetson device tree")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(CudaUnavailable, match="CUDA driver library could not be loaded"):
        query_cuda()
    assert fresh_gpu_info() is None


def test_gpu_info_is_cached_until_cleared(monkeypatch, fresh_gpu_info):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert fresh_gpu_info() is None
    assert fresh_gpu_info.cache_info().hits == 0
    fresh_gpu_info()
    assert fresh_gpu_info.cache_info().hits == 1


# --- nvidia-smi fallback -----------------------------------------------------------------------------------


def test_smi_csv_rows_keyed_by_header():
    rows = parse_smi_csv(SMI_FIVE_GPUS)
    assert len(rows) == 5
    assert rows[1] == {"name": "GeForce GTX 1080 Ti", "pci.bus": "0x02", "index": "1",
                       "uuid": "GPU-15ea7bf9-1a0e-2d7f-9c62-c28e5ca1aaf1"}
    assert parse_smi_csv("") == []


@pytest.mark.parametrize("visible, index", [
    (None, "0"),                                          # unset: CUDA ordinal 0 is the first row
    ("1", "1"), ("2,1", "2"), ("4", "4"),                 # by index: only the first entry is ordinal 0
    ("GPU-3dc4f2b0-6e1b-c088-c342-4367c334795a", "2"),    # by full UUID
    ("GPU-ff3318a7", "4"), ("gpu-FF3318A7,0", "4"),       # by unambiguous UUID prefix, any case
    ("MIG-GPU-15ea7bf9-1a0e-2d7f-9c62-c28e5ca1aaf1/1/0", "1"),  # a MIG instance runs on its parent GPU
])
def test_smi_row_for_cuda_visible_devices(visible, index):
    row = select_smi_row(parse_smi_csv(SMI_FIVE_GPUS), visible)
    assert row is not None and row["index"] == index


@pytest.mark.parametrize("visible", ["7", "-1", "", "GPU-", "GPU-f", "GPU-deadbeef", "MIG-4f6c1d2e-0000"])
def test_smi_row_none_where_cuda_would_see_no_device(visible):
    # "GPU-" and "GPU-f" match several UUIDs (GPU-f3da..., GPU-ff33...): ambiguous prefixes select nothing
    assert select_smi_row(parse_smi_csv(SMI_FIVE_GPUS), visible) is None


def test_smi_row_gives_compute_capability_and_driver():
    rows = parse_smi_csv(SMI_TWO_GPUS)
    info = smi_row_to_info(select_smi_row(rows, "1"))
    assert info == {"name": "NVIDIA RTX 5880 Ada Generation", "compute_capability": "8.9", "driver": "570.86.15",
                    "memory_mb": None, "source": "nvidia-smi"}
    assert smi_row_to_info(select_smi_row(rows, None))["compute_capability"] == "7.0"


def test_smi_header_units_are_dropped_and_memory_read():
    rows = parse_smi_csv(SMI_WITH_UNITS)
    assert rows == [{"name": "NVIDIA GeForce RTX 4050 Laptop GPU", "memory.total": "6141 MiB", "memory.used": "51 MiB"}]
    assert smi_row_to_info(rows[0])["memory_mb"] == 6141


# --- driver versions and the Jetson device tree -------------------------------------------------------------


def test_cuda_driver_version_integer():
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(11080) == "11.8"
    assert format_cuda_version(13000) == "13.0"
    assert format_cuda_version(0) is None


@pytest.mark.parametrize("text, version", [
    # Talos Linux docs, x86_64 proprietary module
    (("NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.65.01  Wed Mar 16 11:24:05 UTC 2022\n"
      "GCC version:  gcc version 12.2.0 (GCC)\n"), "515.65.01"),
    # a Jetson on JetPack 6 (open kernel module for aarch64), from a public test
    (("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  540.4.0  Release Build  "
      "(buildbrain@mobile-u64-6336-d8000)  Tue Jan  7 17:35:12 PST 2025\n"), "540.4.0"),
    ("", None),
])
def test_kernel_driver_release(text, version):
    assert parse_nvrm_version(text) == version


def test_compute_capability_from_tegra_soc():
    # constructed in the form of /proc/device-tree/compatible (NUL-separated tokens, the SoC last), the token
    # NVIDIA's jetson_clocks script greps for ("nvidia,tegra210", "nvidia,tegra186")
    assert tegra_compute_capability(b"nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00") == "8.7"
    assert tegra_compute_capability(b"nvidia,p3449-0000-b00+p3448-0000-b00\x00nvidia,jetson-nano\x00nvidia,tegra210\x00") == "5.3"
    assert tegra_compute_capability(b"raspberrypi,500\x00brcm,bcm2712\x00") is None
    assert tegra_compute_capability(None) is None


# --- tegrastats ----------------------------------------------------------------------------------------------

# Per data line of each recorded file: (total mW, method, rails, RAM used/total MB, GPU load %)
EXPECTED = {
    "orin_nano.txt": [
        (4824, "input rail VDD_IN", {"VDD_IN": 4824, "VDD_CPU_GPU_CV": 518, "VDD_SOC": 1475}, (3452, 7620), 0),
        (12479, "input rail VDD_IN", {"VDD_IN": 12479, "VDD_CPU_GPU_CV": 4667, "VDD_SOC": 2817}, (6185, 7620), 63),
    ],
    "orin_nx.txt": [
        (7280, "input rail VDD_IN", {"VDD_IN": 7280}, (2432, 15598), 0),
    ],
    "agx_orin.txt": [
        (5139 + 3268 + 5500, "sum of rails", {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500},
         (20642, 62817), 12),
        # VDDQ_VDD2_1V8AO is fed from VIN_SYS_5V0: reported, not added; the "NC" channels are dropped
        (2399 + 400 + 4032, "sum of rails",
         {"VDD_GPU_SOC": 2399, "VDD_CPU_CV": 400, "VIN_SYS_5V0": 4032, "VDDQ_VDD2_1V8AO": 301}, (1282, 62795), 0),
        (2412 + 1607 + 4707, "sum of rails", {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707},
         (18207, 62841), 0),
    ],
    "xavier_agx.txt": [
        (463 + 618 + 2936 + 0 + 309 + 3306, "sum of rails",
         {"GPU": 463, "CPU": 618, "SOC": 2936, "CV": 0, "VDDRQ": 309, "SYS5V": 3306}, (14700, 15692), 0),
    ],
    "nano.txt": [
        (4520, "input rail POM_5V_IN", {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}, (1180, 3965), 0),
    ],
    "tx2.txt": [
        (5297, "input rail VDD_IN", {"VDD_SYS_GPU": 182, "VDD_SYS_SOC": 730, "VDD_4V0_WIFI": 0, "VDD_IN": 5297,
                                     "VDD_SYS_CPU": 1917, "VDD_SYS_DDR": 1241}, (3276, 7859), 0),
    ],
}


def _recorded_lines(name: str) -> list:
    text = (TEGRASTATS / name).read_text()
    assert text.startswith("# board:"), f"{name} must say which board it was recorded on"
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_every_recorded_file_is_checked():
    assert sorted(p.name for p in TEGRASTATS.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tegrastats_rails_and_total_per_board(name):
    lines = _recorded_lines(name)
    assert len(lines) == len(EXPECTED[name])
    for line, (total, method, rails, ram, load) in zip(lines, EXPECTED[name]):
        got = parse_tegrastats(line)
        assert got["rails"] == rails
        assert got["total_mw"] == total
        assert got["method"] == method
        assert (got["ram_used_mb"], got["ram_total_mb"]) == ram
        assert got["gpu_load_pct"] == load


def test_input_rail_is_never_added_to_its_subrails():
    total, method, summed = power_total({"VDD_IN": 5000, "VDD_CPU_GPU_CV": 1000, "VDD_SOC": 1500})
    assert (total, method, summed) == (5000, "input rail VDD_IN", ["VDD_IN"])
    assert power_total({}) == (None, None, [])


def test_a_line_without_rails_has_no_power():
    got = parse_tegrastats("RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000] APE 150")
    assert got["rails"] == {} and got["total_mw"] is None and got["method"] is None
    assert got["ram_used_mb"] == 4722 and got["gpu_load_pct"] is None


def test_summary_averages_the_samples():
    lines = _recorded_lines("orin_nano.txt")
    summary = jetson.summarize_power([parse_tegrastats(l) for l in lines], "tegrastats")
    assert summary["samples"] == 2 and summary["mean_mw"] == (4824 + 12479) / 2
    assert summary["method"] == "input rail VDD_IN" and summary["rails_mean_mw"]["VDD_SOC"] == (1475 + 2817) / 2


def test_power_sampler_is_a_no_op_off_a_jetson():
    if jetson.jetson_model() is not None:
        pytest.skip("this machine is a Jetson")
    with PowerSampler() as sampler:
        pass
    assert sampler.source is None and sampler.mean_watts is None
    assert sampler.summary["reason"] == "not a Jetson"
    assert read_power(0.01)["mean_mw"] is None
    assert jetson.power_source() is None
