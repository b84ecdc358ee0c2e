"""Bench runs carry what makes them comparable; `compare` puts several devices in one table and plot."""
import json
import subprocess
import sys

import pytest

from edgeconv_runtime.bench import BenchConfig, run_bench
from edgeconv_runtime.compare import compare_rows, format_compare, load_run


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_runs(mnist_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    paths = []
    for i, (threads, sizes) in enumerate(((1, (1, 8)), (2, (1, 8, 32)))):
        r = run_bench(BenchConfig(str(mnist_bundle), ("onnxruntime-cpu",), ("fp32",), sizes, warmup=2, iterations=20, duration=None,
                                  threads=threads, end_to_end=False, progress=False))
        # a second device, as a Jetson run would record it (the numbers are this machine's)
        if i == 1:
            r["environment"]["jetson"] = {"board": "NVIDIA Jetson Orin Nano", "nvpmodel": "15W"}
            for row in r["rows"]:
                row["watts"] = 7.5
                row["images_per_watt"] = row["throughput_ips"] / 7.5
        p = d / f"run{i}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


def test_bench_json_records_what_makes_runs_comparable(two_runs, mnist_bundle):
    r = json.loads(two_runs[0].read_text())
    for key in ("timestamp", "bundle_sha256", "versions", "load", "device", "environment"):
        assert r[key], key
    assert r["versions"]["onnxruntime"] and "openvino" in r["versions"] and "tensorrt" in r["versions"]
    assert len(r["bundle_sha256"]) == 64 and r["environment"]["ram_gb"] > 0 and r["environment"]["cpu_flags"] is not None


def test_compare_table_and_plot(two_runs, tmp_path):
    png = tmp_path / "cmp.png"
    r = cli("compare", *two_runs, "--plot", png)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "Jetson Orin Nano (15W)" in r.stdout and len(lines) == 1 + 5  # header + 2 + 3 rows
    assert max(len(l) for l in lines) <= 120 and "None" not in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = compare_rows([load_run(p) for p in two_runs])
    watts = [x for x in rows if x["images_per_watt"]]
    assert len(watts) == 3 and all(x["device"].startswith("NVIDIA Jetson") for x in watts)
    md = format_compare(rows, markdown=True).splitlines()
    assert md[0].startswith("| device") and md[1].startswith("|---") and len(md) == 7


def test_plot_axes_name_real_batch_sizes_and_start_at_zero(two_runs, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeconv_runtime import compare as cmp

    captured = {}
    real_close = plt.close

    def keep(fig):  # inspect the figure the plot function drew before it is closed
        captured["fig"] = fig
        real_close(fig)

    plt.close = keep
    try:
        cmp.plot_compare([load_run(p) for p in two_runs], tmp_path / "x.png")
    finally:
        plt.close = real_close
    axes = captured["fig"].axes
    assert len(axes) == 3  # latency, throughput, and per watt because one run measured power
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "32"]
        assert ax.get_ylim()[0] == 0
    assert "Jetson Orin Nano" in captured["fig"]._suptitle.get_text()


def test_plot_without_matplotlib_is_refused_before_measuring(mnist_bundle, tmp_path):
    blocker = tmp_path / "site"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(blocker))
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "bench", str(mnist_bundle), "--duration", "30", "--json", str(out),
                        "--plot", str(tmp_path / "b.png")], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "--plot needs matplotlib" in r.stderr and not out.exists()


def test_compare_refuses_files_that_are_not_bench_runs(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    r = cli("compare", bad)
    assert r.returncode == 2 and "is not a bench result" in r.stderr and r.stderr.count("\n") == 1
